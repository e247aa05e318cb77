"""GPT with MoE / VQMoE feed-forward layers (pre-norm, Megatron-style fused QKV, causal SDPA).

    idx_BT -> wte (+ wpe) -> [Block] x n_layer -> ln_f -> lm_head -> logits_BTV

A block is two residual lines; the FFN slot is whatever `MoEConfig.build()` returns for that layer (dense
FFN or an MoE layer with any router) and also returns its auxiliary loss, summed over the blocks.

The block by configuration (`ModelConfig`): LayerNorm or RMSNorm (``normalization``), GELU or SwiGLU MLPs
(``swiglu``), learned absolute positions (``wpe``) or rotary embeddings on queries and keys (``rope``, base
``rotary_base``, the halves-rotation form of GPT-NeoX / Llama / OLMoE), a norm of queries and keys before
attention (``qk_norm``: per head, or over the whole projection as OLMoE does), linears with or without biases,
tied or untied output layer.  The defaults build the original block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import estimate_mfu, flops_per_token, init_weights
from .configs import ModelConfig


def make_norm(cfg: ModelConfig, width: int) -> nn.Module:
    """The configured norm over the last ``width`` features (LayerNorm with a bias, RMSNorm without)."""
    if cfg.normalization == "RMSNorm":
        return nn.RMSNorm(width, eps=cfg.norm_epsilon)
    return nn.LayerNorm(width, eps=cfg.norm_epsilon)


def rope_tables(T: int, head_dim: int, base: float, device=None):
    """(cos_Td, sin_Td) of the rotary embedding for positions 0..T-1: frequency i of dimension pair
    (i, i + d/2) is base^(-2i/d), the halves form (GPT-NeoX, Llama, OLMoE)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs_Tf = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    emb_Td = torch.cat([freqs_Tf, freqs_Tf], dim=-1)
    return emb_Td.cos(), emb_Td.sin()


def apply_rope(x_BHTd, cos_Td, sin_Td):
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat([-x_BHTd[..., half:], x_BHTd[..., :half]], dim=-1)
    return x_BHTd * cos_Td.to(x_BHTd.dtype) + rotated * sin_Td.to(x_BHTd.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.attn_dropout
        bias = cfg.add_bias_linear
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=bias)  # fused QKV
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":  # over each head's d features, or over the whole D-wide projection (OLMoE)
            width = cfg.head_dim if cfg.qk_norm == "head" else cfg.d_model
            self.q_norm, self.k_norm = make_norm(cfg, width), make_norm(cfg, width)

    def forward(self, x_BTD, rope=None):
        B, T, D = x_BTD.shape
        q, k, v = self.c_attn(x_BTD).split(D, dim=2)
        if self.qk_norm == "hidden":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTd, k_BHTd, v_BHTd = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm == "head":
            q_BHTd, k_BHTd = self.q_norm(q_BHTd), self.k_norm(k_BHTd)
        if rope is not None:
            q_BHTd, k_BHTd = apply_rope(q_BHTd, *rope), apply_rope(k_BHTd, *rope)
        y_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, is_causal=True,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.c_proj(y_BHTd.transpose(1, 2).reshape(B, T, D)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1, self.ln2 = make_norm(cfg, cfg.d_model), make_norm(cfg, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ffn = cfg.moe_config(layer).build()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD, mask_BT=None, ids_BT=None, rope=None):
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD), rope)
        y_BTD, aux = self.ffn(self.ln2(x_BTD), mask_BT, ids_BT)
        return x_BTD + self.drop(y_BTD), aux


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.model == "gpt"
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = cfg.position_embedding_type == "rope"
        if not self.rope:
            self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        init_weights(self, cfg.init_std, cfg.n_layer)

    def forward(self, idx_BT, targets_BT=None, mems=None, mask_BT=None):
        """(logits_BTV, loss, aux, mems): loss = mean NLL over targets (None without targets), aux = the
        summed, already weighted auxiliary losses of the MoE layers; GPT keeps no memory (mems is None).
        ``mask_BT``: False marks padding, which the MoE layers do not route (no capacity, no aux loss)."""
        B, T = idx_BT.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context {self.cfg.seq_len}")
        rope = None
        if self.rope:
            rope = rope_tables(T, self.cfg.head_dim, self.cfg.rotary_base, idx_BT.device)
            x_BTD = self.drop(self.wte(idx_BT))
        else:
            x_BTD = self.drop(self.wte(idx_BT) + self.wpe(torch.arange(T, device=idx_BT.device)))
        aux = x_BTD.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x_BTD, a = block(x_BTD, mask_BT, idx_BT, rope)
            aux = aux + a
        logits_BTV = self.lm_head(self.ln_f(x_BTD))
        loss = None
        if targets_BT is not None:
            loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())
        return logits_BTV, loss, aux, None

    def flops_per_token(self) -> float:
        return flops_per_token(self.cfg)

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        return estimate_mfu(self.cfg, tokens_per_second, peak_flops)
