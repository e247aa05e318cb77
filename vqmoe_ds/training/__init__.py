"""Training: the shared configs and DeepSpeed config resolution (`config`), the one loop (`loop`), language
modelling as its task (`lm`, behind ``pretrain_vqmoe.py``), data (`data`), metrics, logs, plots, pre-emption and
launch helpers."""
