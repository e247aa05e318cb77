"""Training-free VQMoE: a pretrained top-k SMoE becomes a VQMoE model without any training.

Each MoE layer keeps its router and experts; it gains a codebook with one code per expert (K = N, code i ->
expert i, since the layer maps code c to expert c mod N) initialised from the router's expert embeddings, the
rows of W_e, and a mixing gate W_g = 0 with bias (0, b):

  * ``discrete_share = 0``: b = -1e4, so softmax gives g_d = exp(-1e4) = 0 exactly in fp32/bf16 and
    g_c = 1 exactly: the discrete route is still dispatched but adds 0 x FFN(x~), and the model computes what
    the source computes (as long as capacity drops no route: the extra route changes the capacity and the
    priority order; dropless layers reproduce exactly);
  * ``discrete_share = p > 0``: b = log(p / (1 - p)), every token mixes g_d = p of its code's expert in.

The discrete-only view (eq. 7) of the converted model routes each token to the expert whose embedding is its
nearest code (L2 or cosine) -- the router's top-1 by a nearest-neighbour rule instead of the dot product.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from ..models import ModelConfig
from ..checkpoint import CheckpointError

OFF_LOGIT = -1.0e4  # exp(-1e4) underflows to exactly 0 in fp32 and bf16


def gate_bias(discrete_share: float) -> Tuple[float, float]:
    if not 0.0 <= discrete_share < 1.0:
        raise CheckpointError(f"--discrete-share {discrete_share} must lie in [0, 1): 0 turns the discrete path off")
    if discrete_share == 0.0:
        return 0.0, OFF_LOGIT
    return 0.0, math.log(discrete_share / (1.0 - discrete_share))


def vqmoe_config(src: ModelConfig, distance: str = "l2") -> ModelConfig:
    if src.moe.get("router", "topk") != "topk" or not src.is_moe:
        raise CheckpointError(f"conversion needs a top-k SMoE checkpoint (router topk), this one has router "
                              f"{src.moe.get('router')!r}: pretrain with --router topk")
    if distance not in ("l2", "cosine"):
        raise CheckpointError(f"--distance {distance!r}: choose l2 or cosine")
    n = src.moe.get("num_experts", 8)
    moe = dict(src.moe, router="vqmoe", codebook_size=n, codebook_dim=None, vq_kind="codebook", vq_distance=distance,
               vqmoe_mode="pretrain", vq_ema=False, vq_kmeans_init=False, freeze_vq=False)
    return src.replace(moe=moe)


def convert_state(src_sd: Dict[str, torch.Tensor], src: ModelConfig, dst_sd: Dict[str, torch.Tensor],
                  discrete_share: float = 0.0) -> Dict[str, torch.Tensor]:
    """The converted model's state dict: every source tensor copied, then per MoE layer the codebook = W_e and
    W_g = (0, bias).  ``dst_sd`` (the freshly built converted model's state) supplies the new buffers."""
    out = {k: v.clone() for k, v in dst_sd.items()}
    for k, v in src_sd.items():
        if k not in out:
            raise CheckpointError(f"source key {k} has no place in the converted model: the checkpoint and its "
                                  f"model_config disagree")
        out[k] = v.clone()
    b_c, b_d = gate_bias(discrete_share)
    for i in src.moe_layer_ids():
        p = f"blocks.{i}.ffn."
        w_e = src_sd[p + "router.wg.weight"]
        out[p + "vq_router.quantizer.codebook"] = w_e.clone().float()
        out[p + "mix.weight"] = torch.zeros_like(out[p + "mix.weight"])
        out[p + "mix.bias"] = torch.tensor([b_c, b_d], dtype=out[p + "mix.bias"].dtype)
    return out
