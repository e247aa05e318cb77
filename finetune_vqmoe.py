#!/usr/bin/env python
"""Fine-tune a pretrained GPT / Transformer-XL (VQ)MoE model as a sequence classifier on DeepSpeed.

    torchrun --nproc_per_node=2 finetune_vqmoe.py --load runs/tiny --mode discrete --task sst2 \
        --train SST-2/train.tsv --test SST-2/dev.tsv --deepspeed_config ds_configs/cpu_fp32.json \
        --moe-expert-parallel-size 2 --train-iters 200 --out-dir runs/ft_sst2

Also runs under ``deepspeed --num_gpus N`` and ``mpirun -np N``.  See docs/finetune.md.
"""
import os

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))

from vqmoe_ds.finetune.task import main  # noqa: E402

if __name__ == "__main__":
    from vqmoe_ds.parallel import exit_process

    exit_process(main())
