"""XMoE router: tokens projected to a low-dimensional hypersphere, cosine scores against expert embeddings
on the same sphere, divided by a learnable temperature; then top-k with the balance loss.

Routing on a small sphere keeps the router from collapsing all token representations toward the expert
embeddings (the representation-collapse argument of the XMoE paper).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .topk import TopKRouter


class XMoERouter(TopKRouter):
    def __init__(self, hidden_size: int, num_experts: int, k: int = 1, dim: int = 16, init_temperature: float = 0.07,
                 balance_loss_coef: float = 0.01, normalize: bool = True, options=None):
        super().__init__(hidden_size, num_experts, k, balance_loss_coef, normalize=normalize, options=options)
        del self.wg
        self.proj = nn.Linear(hidden_size, dim, bias=False)
        self.expert_emb = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.orthogonal_(self.expert_emb, gain=0.32)
        # temperature is learned in log space so it stays positive; shape [1], not a 0-dim scalar, because
        # DeepSpeed's initial broadcast views every parameter as bytes, which a 0-dim tensor cannot do
        self.log_temperature = nn.Parameter(torch.full((1,), math.log(init_temperature)))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        z_TC = F.normalize(F.linear(x_TD.float(), self.proj.weight.float()), dim=-1)  # fp32 in a bf16 model too
        e_EC = F.normalize(self.expert_emb.float(), dim=-1)
        return (z_TC @ e_EC.t()) / self.log_temperature.exp()
