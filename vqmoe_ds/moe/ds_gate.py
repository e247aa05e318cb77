"""`DeepSpeedGate`: any vqmoe_ds routing, spoken in DeepSpeed's gate contract.

``deepspeed.moe.sharded_moe.MOELayer.forward`` calls ``gate(x, used_token, True, use_tutel)`` and unpacks
``(l_aux, capacity, num_experts, indices[k, S], locations[k, S], gates[k, S], exp_counts[E])`` with -1 in
``indices`` for a dropped route (DeepSpeed 0.19.8; the version is pinned because this contract changed).
Putting this gate in ``moe.deepspeed_moe.gate`` makes DeepSpeed's own dispatch and equal-split all-to-all
carry our routes.

Two ways to use it:
  * standalone, ``DeepSpeedGate(router=TopKRouter(...))``: the gate routes the tokens it is given, so a
    stock ``deepspeed.moe.layer.MoE`` runs any of our routers;
  * inside `MoELayer` (``dispatcher="deepspeed"``): the layer has already routed (VQMoE needs x~ before
    dispatch) and hands the gate a `RouteGrid` through ``pending``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .dispatch import RouteGrid, agree_capacity, capacity_for, plan_routes
from ..kernels.counts import bincount


class DeepSpeedGate(nn.Module):
    def __init__(self, num_experts: int, capacity_factor: float = 1.25, eval_capacity_factor: float = 2.0,
                 min_capacity: int = 4, drop_tokens: bool = True, router: Optional[nn.Module] = None):
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.drop_tokens = min_capacity, drop_tokens
        self.router = router
        self.ep_group = None
        self.pending: Optional[RouteGrid] = None
        self.agree = False  # capacity = its largest value over the ep group (ranks route different token counts)
        self.last_routing = None

    def _set_ep_group(self, ep_group):
        import torch.distributed as dist

        from .layer import expert_parallel_rank

        size = dist.get_world_size(ep_group)
        if dist.get_rank(ep_group) != expert_parallel_rank(size):
            raise RuntimeError("expert-parallel groups are not laid out as consecutive ranks (was "
                               "use_data_before_expert_parallel set?): vqmoe_ds needs the default layout to give "
                               "each rank its experts' initialisation")
        self.ep_group = ep_group

    def forward(self, x_SD: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        if not sparse_routes or use_tutel:
            raise ValueError("DeepSpeedGate speaks the sparse-routes contract only: use deepspeed>=0.19.8 MOELayer "
                             "without Tutel")
        if used_token is not None:
            raise ValueError("DeepSpeedGate does not support used_token masks: drop masked tokens before the layer")
        aux = x_SD.new_zeros((), dtype=torch.float32)
        if self.pending is not None:
            grid, self.pending = self.pending, None
        elif self.router is not None:
            routing = self.router(x_SD)
            self.last_routing = routing
            grid, aux = RouteGrid(routing.experts_TK.t(), routing.weights_TK.t()), routing.aux_loss
        else:
            raise RuntimeError("DeepSpeedGate has no router and no pending routes")
        K, S = grid.experts_KS.shape
        valid = grid.valid_KS if grid.valid_KS is not None else torch.ones(K, S, dtype=torch.bool, device=x_SD.device)
        experts_R = grid.experts_KS.reshape(-1)[valid.reshape(-1)]
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = capacity_for(experts_R.numel(), self.num_experts, cf, self.min_capacity) if self.drop_tokens else None
        if capacity is not None and self.agree:
            capacity = agree_capacity(torch.full((1,), capacity, device=x_SD.device), self.ep_group)
        plan = plan_routes(experts_R, self.num_experts, capacity)
        if capacity is None:
            capacity = agree_capacity(plan.counts_E, self.ep_group)
        indices = torch.full((K * S,), -1, dtype=torch.int32, device=x_SD.device)
        locations = torch.zeros(K * S, dtype=torch.int32, device=x_SD.device)
        gates = torch.zeros(K * S, dtype=torch.float32, device=x_SD.device)
        vflat = valid.reshape(-1)
        kept = torch.zeros_like(vflat)
        kept[vflat] = plan.keep_R
        kept_experts = grid.experts_KS.reshape(-1)[kept]
        indices[kept] = kept_experts.to(torch.int32)
        locations[vflat] = plan.position_R.to(torch.int32)
        locations[~kept] = 0
        gates = gates.masked_scatter(kept, grid.weights_KS.reshape(-1)[kept].float())
        exp_counts = bincount(experts_R, self.num_experts).detach()
        return (aux, torch.tensor(capacity), self.num_experts, indices.view(K, S), locations.view(K, S),
                gates.view(K, S), exp_counts)
