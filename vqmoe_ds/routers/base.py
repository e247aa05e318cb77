"""The one interface every router implements.

A router looks at the tokens ``x_TD`` of one MoE layer (and, if it routes by token identity, their ids
``ids_T``) and says, for each token, which experts it goes to and with what combine weight::

    routing = router(x_TD, ids_T)
    routing.experts_TK   # long [T, k]: expert id of each of the token's k routes (global ids, 0..N-1)
    routing.weights_TK   # float [T, k]: combine weight of each route (differentiable)
    routing.aux_loss     # scalar: the router's auxiliary loss, already weighted (balance, VQ, distillation)
    routing.stats        # detached numbers for logging

Routers know nothing about capacity, dispatch or expert parallelism: the layer turns a routing into
expert buffers (`vqmoe_ds.moe.dispatch`), so every router runs with either expert implementation and at any
expert-parallel size unchanged.  Routers with a schedule (StableMoE's stages, SMoE-Dropout's growing k) keep the training
step in a buffer, so it is saved and restored with the model; the training loop calls
``set_step(model, step)`` once per optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn


@dataclass
class Routing:
    experts_TK: torch.Tensor
    weights_TK: torch.Tensor
    aux_loss: torch.Tensor
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)
    # VQ routers: the straight-through quantized tokens (x~ of eq. 5) and the code of each token
    quantized_TD: Optional[torch.Tensor] = None
    codes_T: Optional[torch.Tensor] = None
    # every weight is a constant 1 (VQ, hash, cluster): the combine skips the multiplication
    unit_weights: bool = False


class Router(nn.Module):
    """Base class: subclasses implement ``forward(x_TD, ids_T=None) -> Routing``."""

    num_experts: int

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=True)

    def set_step(self, step: int) -> None:
        self.step.fill_(int(step))
        self._step_host = int(step)

    @property
    def step_now(self) -> int:
        """The step as a Python int: the value last given to `set_step` (no device sync), else the buffer's."""
        host = getattr(self, "_step_host", None)
        return int(self.step) if host is None else host

    def _load_from_state_dict(self, *args, **kwargs):
        self._step_host = None  # the buffer is replaced: read it again
        super()._load_from_state_dict(*args, **kwargs)


def balance_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss: N * sum_e f_e * P_e.

    f_e is the share of routes sent to expert e (over all k choices), P_e the mean router probability of
    e.  It equals 1 for a perfectly uniform router and grows as load concentrates.
    """
    T, K = experts_TK.shape
    f_E = torch.zeros(num_experts, dtype=probs_TE.dtype, device=probs_TE.device)
    f_E.index_add_(0, experts_TK.reshape(-1), torch.ones(T * K, dtype=probs_TE.dtype, device=probs_TE.device))
    f_E = f_E / (T * K)
    P_E = probs_TE.mean(0)
    return num_experts * (f_E * P_E).sum()


def set_step(model: nn.Module, step: int) -> None:
    """Tell every scheduled router of ``model`` the current optimizer step."""
    for m in model.modules():
        if isinstance(m, Router):
            m.set_step(step)
