"""The pretraining driver: flags and checks (`arguments`), data (`data`), metrics, checkpoints, logs, plots
and the loop (`trainer`).  Entry point: ``pretrain_vqmoe.py`` -> `trainer.main`."""
