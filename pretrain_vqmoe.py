#!/usr/bin/env python
"""Pretrain a GPT or Transformer-XL language model with MoE / VQMoE layers on DeepSpeed.

    torchrun --nproc_per_node=2 pretrain_vqmoe.py --config tiny --router vqmoe --moe-expert-parallel-size 2 \
        --deepspeed_config ds_configs/cpu_fp32.json --train-iters 200 --out-dir runs/tiny

Also runs under ``deepspeed --num_gpus N`` and ``mpirun -np N``.  See docs/training.md.
"""
import os

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))

from vqmoe_ds.training.lm import main  # noqa: E402

if __name__ == "__main__":
    from vqmoe_ds.parallel import exit_process

    exit_process(main())
