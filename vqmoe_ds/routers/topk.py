"""Top-k softmax router (the SMoE baseline) with the Switch/GShard balance loss.

p = softmax(W_e x); each token goes to its k most probable experts.  The combine weight of a route:

  * k = 1: the router probability p_e itself (Switch Transformer).  Renormalising a single probability would
    make every weight exactly 1, and the router would then get no gradient from the task at all;
  * k >= 2: p_e / sum of the k chosen p (GShard, Mixtral; ``normalize=True``) or p_e as is (OLMoE, Qwen-MoE;
    ``normalize=False``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router, Routing, balance_loss


class TopKRouter(Router):
    def __init__(self, hidden_size: int, num_experts: int, k: int = 2, balance_loss_coef: float = 0.01,
                 jitter: float = 0.0, normalize: bool = True):
        super().__init__(num_experts)
        self.k = k
        self.balance_loss_coef = balance_loss_coef
        self.jitter = jitter
        self.normalize = normalize
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.wg.weight, std=0.02)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_TD = x_TD.float()
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        return F.linear(x_TD, self.wg.weight.float())

    def combine_weights(self, top_TK: torch.Tensor) -> torch.Tensor:
        """The chosen experts' probabilities as combine weights (see the module docstring)."""
        if self.normalize and top_TK.shape[1] > 1:
            return top_TK / top_TK.sum(-1, keepdim=True)
        return top_TK

    def route(self, logits_TE: torch.Tensor, k: int) -> Routing:
        probs_TE = logits_TE.softmax(-1)
        top_TK, experts_TK = probs_TE.topk(k, dim=-1)
        bal = balance_loss(probs_TE, experts_TK, self.num_experts)
        return Routing(experts_TK, self.combine_weights(top_TK), self.balance_loss_coef * bal,
                       {"balance_loss": bal.detach()})

    def forward(self, x_TD: torch.Tensor, ids_T=None) -> Routing:
        return self.route(self.logits(x_TD), self.k)
