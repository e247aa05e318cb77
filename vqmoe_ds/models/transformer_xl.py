"""Transformer-XL (Dai et al., 2019) with MoE / VQMoE feed-forward layers, pre-LayerNorm.

Relative positions, the Transformer-XL way: the score of query i on key j is

    (q_i + u) . k_j          (content:  term AC)
  + (q_i + v) . W_r R_{i-j}   (position: term BD; R = sinusoidal embedding of the distance i - j)

with learned biases u, v per head.  BD is computed for all keys against the embeddings of distances
klen-1 ... 0 and lined up by the *relative shift* (`rel_shift`).  Segment memory: each layer attends over
``[mem; x]``, where mem holds the (detached) inputs of that layer for the last ``mem_len`` positions of the
previous segments, so context reaches ``n_layer x mem_len`` tokens back without back-propagating there.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import estimate_mfu, flops_per_token, init_weights
from .configs import ModelConfig


def sinusoid_KD(pos_K: torch.Tensor, d_model: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_model, 2, dtype=torch.float32, device=pos_K.device) / d_model))
    angles = pos_K.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rel_shift(x_BHQK: torch.Tensor) -> torch.Tensor:
    """Line up scores computed against distances (klen-1, ..., 0): out[..., i, j] = x[..., i, j + Q-1-i]
    for j <= i + (K - Q), i.e. the entry of distance (i + K - Q) - j.  Entries above that are garbage that
    the causal mask removes."""
    B, H, Q, K = x_BHQK.shape
    padded = torch.cat([x_BHQK.new_zeros(B, H, Q, 1), x_BHQK], dim=-1)  # [B, H, Q, K+1]
    return padded.view(B, H, K + 1, Q)[:, :, 1:].reshape(B, H, Q, K)


class RelMultiHeadAttn(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H = cfg.d_model, cfg.n_head
        self.n_head, self.d_head = H, D // H
        self.qkv_net = nn.Linear(D, 3 * D, bias=False)  # fused QKV
        self.r_net = nn.Linear(D, D, bias=False)  # position embeddings -> per-head position keys
        self.o_net = nn.Linear(D, D, bias=False)
        self.u = nn.Parameter(torch.zeros(H, self.d_head))  # content bias
        self.v = nn.Parameter(torch.zeros(H, self.d_head))  # position bias
        self.attn_drop, self.drop = nn.Dropout(cfg.attn_dropout), nn.Dropout(cfg.dropout)

    def forward(self, h_BKD: torch.Tensor, pos_KD: torch.Tensor, qlen: int) -> torch.Tensor:
        """h_BKD: LayerNormed [mem; x] (K = mlen + qlen keys); returns the attention output of the last qlen."""
        B, K, D = h_BKD.shape
        H, Dh = self.n_head, self.d_head
        q, k, v = self.qkv_net(h_BKD).split(D, dim=-1)
        q_BQHd = q[:, -qlen:].reshape(B, qlen, H, Dh)
        k_BKHd, v_BKHd = k.reshape(B, K, H, Dh), v.reshape(B, K, H, Dh)
        r_KHd = self.r_net(pos_KD).reshape(K, H, Dh)
        AC_BHQK = torch.einsum("bqhd,bkhd->bhqk", q_BQHd + self.u, k_BKHd)
        BD_BHQK = rel_shift(torch.einsum("bqhd,khd->bhqk", q_BQHd + self.v, r_KHd))
        score = (AC_BHQK + BD_BHQK) / math.sqrt(Dh)
        future_QK = torch.triu(torch.ones(qlen, K, dtype=torch.bool, device=h_BKD.device), diagonal=1 + K - qlen)
        prob = self.attn_drop(F.softmax(score.float().masked_fill(future_QK, float("-inf")), dim=-1).to(q.dtype))
        y_BQD = torch.einsum("bhqk,bkhd->bqhd", prob, v_BKHd).reshape(B, qlen, D)
        return self.drop(self.o_net(y_BQD))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = RelMultiHeadAttn(cfg)
        self.ffn = cfg.moe_config(layer).build()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD, mem_BMD, pos_KD, mask_BT=None, ids_BT=None):
        x_BTD = x_BTD + self.attn(self.ln1(torch.cat([mem_BMD, x_BTD], dim=1)), pos_KD, x_BTD.shape[1])
        y_BTD, aux = self.ffn(self.ln2(x_BTD), mask_BT, ids_BT)
        return x_BTD + self.drop(y_BTD), aux


class TransformerXL(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.model == "txl"
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        init_weights(self, cfg.init_std, cfg.n_layer)

    def init_mems(self, batch_size: int, device=None, dtype=None) -> List[torch.Tensor]:
        p = self.wte.weight
        return [torch.zeros(batch_size, 0, self.cfg.d_model, device=device or p.device, dtype=dtype or p.dtype)
                for _ in range(self.cfg.n_layer)]

    def forward(self, idx_BT, targets_BT=None, mems: Optional[List[torch.Tensor]] = None, mask_BT=None):
        """(logits_BTV, loss, aux, new_mems).  ``mems``: one [B, M, D] tensor per layer from the previous
        segment (None: no memory); ``new_mems`` keeps the last ``mem_len`` inputs of each layer, detached
        (None when mem_len is 0).  ``mask_BT``: False marks padding, which the MoE layers do not route."""
        B, T = idx_BT.shape
        if mems is None:
            mems = self.init_mems(B)
        M = mems[0].shape[1]
        x_BTD = self.drop(self.wte(idx_BT) * math.sqrt(self.cfg.d_model))
        pos_KD = self.drop(sinusoid_KD(torch.arange(M + T - 1, -1, -1, device=idx_BT.device), self.cfg.d_model)
                           .to(x_BTD.dtype))
        aux = x_BTD.new_zeros((), dtype=torch.float32)
        new_mems = []
        for block, mem_BMD in zip(self.blocks, mems):
            if self.cfg.mem_len:
                new_mems.append(torch.cat([mem_BMD, x_BTD], dim=1)[:, -self.cfg.mem_len:].detach())
            x_BTD, a = block(x_BTD, mem_BMD.to(x_BTD.dtype), pos_KD, mask_BT, idx_BT)
            aux = aux + a
        logits_BTV = self.lm_head(self.ln_f(x_BTD))
        loss = None
        if targets_BT is not None:
            loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())
        return logits_BTV, loss, aux, (new_mems if self.cfg.mem_len else None)

    def flops_per_token(self) -> float:
        return flops_per_token(self.cfg)

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        return estimate_mfu(self.cfg, tokens_per_second, peak_flops)
