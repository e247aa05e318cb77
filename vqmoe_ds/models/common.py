"""What both models share: weight init that leaves the MoE layers' own init alone, FLOPs per token, the
parameter report, and the per-layer MoE statistics for logging."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from ..moe import MoELayer
from .configs import ModelConfig, count_params


def init_weights(model: nn.Module, std: float, n_layer: int) -> None:
    """N(0, std) for our Linear/Embedding weights, zero biases, unit LayerNorms; output projections of the
    residual branches (named ``c_proj``/``o_net``) get std/sqrt(2 n_layer) (GPT-2).  Modules inside an
    `MoELayer` are skipped: the layer initialises its experts per global expert id and its routers itself."""
    inside_moe = {id(m) for layer in model.modules() if isinstance(layer, MoELayer) for m in layer.modules()}
    for name, m in model.named_modules():
        if id(m) in inside_moe or any(p.is_meta for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Linear):
            s = std / math.sqrt(2 * n_layer) if name.endswith(("c_proj", "o_net")) else std
            nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add), PaLM-style:
    6 x (active matmul parameters: attention projections, active experts, dense FFNs, routers, output layer)
    + attention's score and value products over the context (GPT: seq_len; TXL: tgt_len + mem_len, with
    the relative term BD as a third product and r_net's projection of the klen position embeddings)."""
    p = count_params(cfg)
    D, L, V = cfg.d_model, cfg.n_layer, cfg.vocab_size
    matmul = p["active"] - p["embedding"] + V * D  # the output layer is a matmul even when tied
    if cfg.model == "gpt":
        attn_fwd = L * 4 * D * cfg.seq_len
    else:
        klen = cfg.seq_len + cfg.mem_len
        matmul -= L * D * D  # r_net runs over klen positions per segment, not per token: counted below
        attn_fwd = L * (6 * D * klen + 2 * D * D * klen / cfg.seq_len)
    return 6.0 * matmul + 3.0 * attn_fwd


def estimate_mfu(cfg: ModelConfig, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over ``peak_flops`` (e.g. 312e12 for an A100 in
    bf16, or a measured fp32 matmul peak on CPU cores)."""
    return flops_per_token(cfg) * tokens_per_second / peak_flops


def param_report(model: nn.Module, cfg: ModelConfig) -> str:
    """One line: built parameters of this rank and the formula's total / active per token."""
    built = sum(p.numel() for p in model.parameters())
    c = count_params(cfg)
    return (f"parameters: total {c['total'] / 1e6:.2f}M, active per token {c['active'] / 1e6:.2f}M "
            f"(experts {c['experts'] / 1e6:.2f}M, non-expert {c['non_expert'] / 1e6:.2f}M); this rank holds "
            f"{built / 1e6:.2f}M")


def moe_layers(model: nn.Module) -> List[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def moe_stats(model: nn.Module) -> List[Dict[str, torch.Tensor]]:
    """``stats()`` of every MoE layer, in depth order (detached)."""
    return [m.stats() for m in moe_layers(model)]
