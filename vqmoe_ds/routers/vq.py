"""VQ router: the token's nearest code picks its expert, i_exp = i_cb mod N (so K need not equal N).

One route per token with weight 1; the auxiliary loss is alpha x the quantizer's VQ loss (eq. 8).  The
routing also carries x~ (straight-through quantized tokens) for the discrete path of eq. 5.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Router, Routing


class VQRouter(Router):
    def __init__(self, quantizer: nn.Module, num_experts: int, alpha: float = 0.08):
        super().__init__(num_experts)
        self.quantizer = quantizer
        self.alpha = alpha

    def forward(self, x_TD: torch.Tensor, ids_T=None, seq_len=None) -> Routing:
        q = self.quantizer(x_TD)
        experts_TK = (q.codes_T % self.num_experts).unsqueeze(1)
        weights_TK = torch.ones(experts_TK.shape, dtype=torch.float32, device=x_TD.device)
        return Routing(experts_TK, weights_TK, self.alpha * q.loss, dict(q.stats), q.quantized_TD, q.codes_T,
                       unit_weights=True)
