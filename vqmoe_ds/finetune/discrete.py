"""The fine-tuning modes as model transformations: eq. 7's discrete-only VQMoE (the continuous router and the
mixing gate W_g removed, the codebook frozen), and the SMoE-Dropout protocol (every routing parameter frozen)."""
from __future__ import annotations

from typing import List

import torch

from ..checkpoint import CheckpointError
from ..models import ModelConfig, moe_layers


def vqmoe_layer_ids(cfg: ModelConfig) -> List[int]:
    return [i for i in range(cfg.n_layer) if cfg.moe_config(i).router == "vqmoe"]


# options of the continuous router that the discrete path has no use for (it has no router logits and no top-k
# choice), set to their "off" values when the continuous path is removed: z-loss, sigmoid scores, the expert bias of
# aux-loss-free balancing and forced balancing
CONTINUOUS_ONLY = {"z_loss_coef": 0.0, "score_function": "softmax", "expert_bias": False,
                   "force_load_balancing": False}


def discrete_only_config(cfg: ModelConfig, freeze_vq: bool = True) -> ModelConfig:
    """Eq. 7: every VQMoE layer keeps only its discrete path (``vqmoe_mode="discrete_only"``), codebook frozen.
    The continuous router's own options (`CONTINUOUS_ONLY`, e.g. an imported OLMoE's z-loss) go with it."""
    if not vqmoe_layer_ids(cfg):
        raise CheckpointError(f"the discrete path needs a VQMoE checkpoint (router vqmoe or vq), this model's router "
                              f"is {cfg.moe.router!r}: use --mode full or frozen_router")
    changes = {"freeze_vq": freeze_vq}
    if cfg.moe.router == "vqmoe":
        changes["vqmoe_mode"] = "discrete_only"
    given = cfg.moe.settings()
    changes.update({name: off for name, off in CONTINUOUS_ONLY.items() if name in given})  # a default is off already
    return cfg.replace_moe(**changes)


def absent_path_keys(cfg_src: ModelConfig, cfg_dst: ModelConfig, prefix: str = "") -> List[str]:
    """Key patterns of the source that the destination drops on purpose: the continuous router and mixing gate
    W_g of layers that went from VQMoE's pretrain mode to discrete-only."""
    out = []
    for i in range(cfg_src.n_layer):
        a, b = cfg_src.moe_config(i), cfg_dst.moe_config(i)
        if a.router == "vqmoe" and a.vqmoe_mode == "pretrain" and b.vqmoe_mode == "discrete_only":
            out += [f"{prefix}blocks.{i}.ffn.router.*", f"{prefix}blocks.{i}.ffn.mix.*"]
    return out


def freeze_routing(model: torch.nn.Module) -> int:
    """Freeze every routing parameter of every MoE layer; returns how many parameters were frozen."""
    n = 0
    for layer in moe_layers(model):
        for part in (layer.router, layer.vq_router, layer.mix):
            if part is None:
                continue
            for p in part.parameters():
                n += p.numel() if p.requires_grad else 0
                p.requires_grad_(False)
        if layer.vq_router is not None and hasattr(layer.vq_router.quantizer, "freeze"):
            layer.vq_router.quantizer.freeze()  # also stops EMA / k-means / dead-code updates
    return n
