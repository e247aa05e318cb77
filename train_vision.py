#!/usr/bin/env python
"""Train a ViT with MoE / VQMoE / SoftMoE layers on image classification with DeepSpeed.

    torchrun --nproc_per_node=2 train_vision.py --config tiny --router vqmoe --moe-expert-parallel-size 2 \
        --deepspeed_config ds_configs/cpu_fp32.json --train-iters 300 --lr 1e-3 --out-dir runs/vit_tiny

Datasets: --dataset synthetic (default, no download) | cifar10 | cifar100 | stl10 | svhn | folder with
--data-path (tools/get_vision_data.py fetches the first four).  Also runs under ``deepspeed --num_gpus N``
and ``mpirun -np N``.  See docs/vision.md.
"""
import os

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))

from vqmoe_ds.vision.task import main  # noqa: E402

if __name__ == "__main__":
    from vqmoe_ds.parallel import exit_process

    exit_process(main())
