"""SMoE-Dropout router: a frozen, randomly initialised router whose k grows during training.

k(step) = k_start + floor((k_end - k_start) * min(step / k_steps, 1)).  The router is never trained
(no balance loss: nothing could act on it, though the
tokens still receive gradients through the gate values); the combine weights are those of the top-k router (the
probability at k = 1, renormalised over the k chosen experts above unless ``normalize`` is off).  The step lives in a buffer, so the schedule resumes exactly from a checkpoint.
"""
from __future__ import annotations

import torch

from .base import Routing
from .topk import TopKRouter


class SMoEDropoutRouter(TopKRouter):
    def __init__(self, hidden_size: int, num_experts: int, k_start: int = 1, k_end: int = None, k_steps: int = 1000,
                 normalize: bool = True, options=None):
        super().__init__(hidden_size, num_experts, k_start, balance_loss_coef=0.0, normalize=normalize, options=options)
        self.k_start, self.k_end, self.k_steps = k_start, k_end or num_experts, max(1, k_steps)
        self.wg.weight.requires_grad_(False)

    def current_k(self) -> int:
        frac = min(self.step_now / self.k_steps, 1.0)
        return self.k_start + int((self.k_end - self.k_start) * frac)

    def forward(self, x_TD: torch.Tensor, ids_T=None, seq_len=None) -> Routing:
        # W is frozen; x still gets gate gradients.  No balance loss (build_router sets balancing "none"): the
        # auxiliary loss is the z-loss alone, when asked for
        routing = self.route(self.logits(x_TD), self.current_k(), seq_len)
        routing.stats["k"] = torch.tensor(routing.experts_TK.shape[1])
        return routing
