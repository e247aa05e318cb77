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
    """N(0, std) for our Linear/Embedding weights, zero biases, unit norms; output projections of the
    residual branches (attention's ``c_proj``/``o_net``, the dense FFN's ``fc2``) get std/sqrt(2 n_layer)
    (GPT-2).  Modules inside an `MoELayer` are skipped: the layer initialises its experts per global expert id
    (their ``fc2`` with the same depth-scaled std, ``MoEConfig.output_init_std``) and its routers itself."""
    inside_moe = {id(m) for layer in model.modules() if isinstance(layer, MoELayer) for m in layer.modules()}
    for name, m in model.named_modules():
        if id(m) in inside_moe or any(p.is_meta for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Linear):
            s = std / math.sqrt(2 * n_layer) if name.endswith(("c_proj", "o_net", "fc2")) else std
            nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.RMSNorm):
            nn.init.ones_(m.weight)


def flops_per_token(cfg: ModelConfig, batch_size: int = 1, causal: bool = False) -> float:
    """Training FLOPs per token of one forward + backward, counted from the matrix products the model computes
    (2 FLOPs per multiply-add; elementwise work, softmaxes and norms are not counted, as torch's
    ``FlopCounterMode`` does not count them).  A product whose weight and input both need gradients costs 3x its
    forward (forward, input gradient, weight gradient); one with only one of them 2x; a detached one 1x.

      * attention: the QKV and output projections, and the T x T score and value products in full -- what the
        math kernel and Transformer-XL's einsums compute; with ``causal`` only the products of each query with the
        keys at or before it, (T + 1) / 2 on average (what a causal flash kernel computes, give or take its blocks).
        Transformer-XL projects QKV for its memory rows too (klen = tgt_len + mem_len per segment), computes
        AC, BD and PV over klen, and r_net projects the klen relative positions once per batch of
        ``batch_size`` segments;
      * rotary embeddings and the norms (queries' and keys' too) are elementwise: not counted;
      * FFN (2 matrices of D x F, SwiGLU 3): dense, or per MoE layer the routed experts (k routes per token, VQMoE k + 1, discrete-only 1,
        SMoE-Dropout its final k; dropless), the shared expert and its gate, and the routing products: the router (XMoE: its projection and
        expert embeddings; StableMoE: the learned router and the distilled one on the detached token;
        SMoE-Dropout: a frozen router), VQMoE's mixing gate W_g, the codebook's projections and the nearest-code
        distances to the K codes (detached: forward only);
      * the output layer (a matrix product even when tied to the embedding).
    """
    from .configs import routes_per_token

    D, L, V, T = cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.seq_len
    fwd = lambda macs: 2.0 * macs  # noqa: E731
    total = 3 * fwd(D * V)  # output layer
    for i in range(L):
        if cfg.model == "gpt":
            keys = (T + 1) / 2 if causal else T  # causal: the keys at or before the query, on average
            total += 3 * fwd(4 * D * D + 2 * keys * D)  # qkv + out projection, scores + values
        else:
            klen = T + cfg.mem_len
            keys = cfg.mem_len + (T + 1) / 2 if causal else klen
            total += 3 * fwd(3 * D * D * klen / T + D * D + 3 * keys * D)  # qkv over klen rows, o_net, AC BD PV
            total += 2 * fwd(D * D * klen / (T * batch_size))  # r_net over constant positions: weight gradient only
        m = cfg.moe_config(i)
        mats = 3 if m.activation == "swiglu" else 2  # an MLP's matrices of D x F: SwiGLU's gate, up and down
        if m.router == "dense":
            total += 3 * fwd(mats * D * m.ffn_hidden_size)
            continue
        E = m.num_experts
        total += 3 * fwd(routes_per_token(m) * mats * D * m.ffn_hidden_size)
        if m.shared_expert_size:  # the shared expert and its gate
            total += 3 * fwd(mats * D * m.shared_expert_size
                             + {"add": 0, "gate": D, "residual": 2 * D}[m.shared_expert_mode])
        discrete_only = m.router == "vqmoe" and m.vqmoe_mode == "discrete_only"
        if m.router in ("topk", "vqmoe") and not discrete_only:
            total += 3 * fwd(D * E)
        elif m.router == "xmoe":
            total += 3 * fwd(D * m.xmoe_dim + m.xmoe_dim * E)
        elif m.router == "stablemoe":
            dd = m.stablemoe_distill_dim  # the distilled router reads the detached token: its first product has no
            total += 3 * fwd(D * E) + 2 * fwd(D * dd) + 3 * fwd(dd * E)  # input gradient, its second one does
        elif m.router == "smoe_dropout":
            total += 2 * fwd(D * E)
        elif m.router == "cluster":
            total += fwd(D * E)  # distances to the fixed centroids (detached)
        if m.router == "vqmoe":
            C = m.codebook_dim or D
            if not discrete_only:
                total += 3 * fwd(D * 2)  # mixing gate W_g
            if C != D:
                total += 3 * fwd(2 * D * C)  # in- and out-projection
            levels = {"codebook": 1, "residual": m.vq_num_quantizers}.get(m.vq_kind, 0)
            total += levels * fwd(C * m.codebook_size)  # distances to the codes (LFQ's internals not counted)
    return total


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
