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

The source's router options go to the converted model's continuous path unchanged (it is the same top-k router):
score function, renormalisation and scaling of the top-k weights, balance and z-loss, expert bias (its buffer is
copied), forced balancing, shared experts, jitter, capacity.  `carried_options` lists those that differ from the
defaults, and `conversion_notices` says where the converted model can differ from the source.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

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
    if src.moe.router != "topk" or not src.is_moe:
        raise CheckpointError(f"conversion needs a top-k SMoE checkpoint (router topk), this one has router "
                              f"{src.moe.router!r}: pretrain with --router topk")
    if distance not in ("l2", "cosine"):
        raise CheckpointError(f"--distance {distance!r}: choose l2 or cosine")
    n = src.moe.num_experts
    return src.replace_moe(router="vqmoe", codebook_size=n, codebook_dim=None, vq_kind="codebook", vq_distance=distance,
                           vqmoe_mode="pretrain", vq_ema=False, vq_kmeans_init=False, freeze_vq=False)


# the top-k router's options and the layer settings around it that the conversion carries to the continuous path
ROUTER_OPTIONS = ("top_k", "norm_topk_prob", "top1_weight", "score_function", "topk_scaling_factor",
                  "balance_loss_coef", "load_balancing_type", "z_loss_coef", "expert_bias", "bias_update_rate", "force_load_balancing",
                  "shared_expert_size", "shared_expert_mode", "router_jitter", "drop_tokens", "capacity_factor",
                  "eval_capacity_factor", "min_capacity")


def carried_options(src: ModelConfig) -> Dict[str, Any]:
    """The source's router options that differ from MoEConfig's defaults: they go to the continuous path."""
    from ..moe.config import MoEConfig

    m = src.moe_config(src.moe_layer_ids()[0])
    default = MoEConfig(hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size)
    return {k: getattr(m, k) for k in ROUTER_OPTIONS if getattr(m, k) != getattr(default, k)}


def conversion_notices(src: ModelConfig, discrete_share: float) -> List[str]:
    """Where the converted model can differ from the source (one line each), for the tool to print."""
    m = src.moe_config(src.moe_layer_ids()[0])
    out = []
    if m.drop_tokens:
        out.append(f"the source drops routes beyond capacity (capacity factor {m.capacity_factor}, eval "
                   f"{m.eval_capacity_factor}): the discrete route takes capacity too, so the converted model equals the "
                   f"source only where no route is dropped (a dropless source, --no-drop-tokens, is reproduced exactly)")
    dropped = [k for k in ("z_loss_coef", "expert_bias", "force_load_balancing") if getattr(m, k)] + \
        (["score_function"] if m.score_function != "softmax" else [])
    if dropped:
        out.append(f"the discrete-only view (eq. 7, --eval, embed.py --discrete-only, fine-tuning --mode discrete) has no "
                   f"continuous router, so it runs without the source's {', '.join(dropped)}")
    return out


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
