"""Parallelism set-up outside a DeepSpeed engine (tests, benchmarks, evaluation scripts).

Inside training, ``deepspeed.initialize`` does this itself: it calls ``set_deepspeed_parallelism`` on every
``deepspeed.moe.layer.MoE``, which creates DeepSpeed's expert-parallel and expert-data-parallel groups.
"""
from __future__ import annotations

from torch import nn


def setup_expert_parallel(model: nn.Module) -> nn.Module:
    """Create DeepSpeed's expert-parallel groups for every MoE layer of ``model`` (needs
    ``deepspeed.init_distributed()`` first) — what the engine does at initialisation."""
    from deepspeed.moe.layer import MoE

    for m in model.modules():
        if isinstance(m, MoE) and m.deepspeed_moe.ep_group is None:
            m.set_deepspeed_parallelism()
    return model
