"""The stock-DeepSpeed comparison of bench/moe_layer.py: `DeepSpeedGate` speaks DeepSpeed's gate contract for one
of our routers, so a stock ``deepspeed.moe.layer.MoE`` (its ``MOELayer`` dispatch: every expert padded to one
capacity, the equal-split all-to-all) runs our routing.  The library itself never dispatches this way
(vqmoe_ds/moe/dispatch.py says why); the benchmark measures what the sorted dispatch saves against it, and
tests/test_bench_deepspeed_gate.py checks that both compute the same layer.

``deepspeed.moe.sharded_moe.MOELayer.forward`` calls ``gate(x, used_token, True, use_tutel)`` and unpacks
``(l_aux, capacity, num_experts, indices[k, S], locations[k, S], gates[k, S], exp_counts[E])`` with -1 in
``indices`` for a dropped route (DeepSpeed 0.19.8; the version is pinned because this contract changed).

    moe = deepspeed.moe.layer.MoE(hidden_size=D, expert=ExpertMLP(D, H), num_experts=E, k=1, ...)
    moe.deepspeed_moe.gate = DeepSpeedGate(E, router=TopKRouter(MoEConfig(...)))
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from vqmoe_ds.kernels.counts import bincount
from vqmoe_ds.moe.dispatch import RouteGrid, capacity_for, plan_routes


class DeepSpeedGate(nn.Module):
    def __init__(self, num_experts: int, capacity_factor: float = 1.25, eval_capacity_factor: float = 2.0,
                 min_capacity: int = 4, drop_tokens: bool = True, router: Optional[nn.Module] = None):
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.drop_tokens = min_capacity, drop_tokens
        self.router = router
        self.ep_group = None
        self.last_routing = None

    def _set_ep_group(self, ep_group):
        self.ep_group = ep_group

    def forward(self, x_SD: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        if not sparse_routes or use_tutel:
            raise ValueError("DeepSpeedGate speaks the sparse-routes contract only: use deepspeed>=0.19.8 MOELayer "
                             "without Tutel")
        if used_token is not None:
            raise ValueError("DeepSpeedGate does not support used_token masks: drop masked tokens before the layer")
        if self.router is None:
            raise RuntimeError("DeepSpeedGate has no router: give it one of vqmoe_ds.routers")
        routing = self.router(x_SD)
        self.last_routing = routing
        grid, aux = RouteGrid(routing.experts_TK.t(), routing.weights_TK.t()), routing.aux_loss
        K, S = grid.experts_KS.shape
        valid = grid.valid_KS if grid.valid_KS is not None else torch.ones(K, S, dtype=torch.bool, device=x_SD.device)
        experts_R = grid.experts_KS.reshape(-1)[valid.reshape(-1)]
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = capacity_for(experts_R.numel(), self.num_experts, cf, self.min_capacity) if self.drop_tokens else None
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


def agree_capacity(counts_E: torch.Tensor, ep_group) -> int:
    """Dropless capacity for an equal-split all-to-all: the largest expert load over the ep group."""
    cap = counts_E.max().reshape(1).clone()
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(cap, op=dist.ReduceOp.MAX, group=ep_group)
    return int(cap.item())
