"""Moving routed tokens to their experts and back: capacity and the sorted (dropless-capable) dispatch over
DeepSpeed's expert-parallel all-to-all.

A layer's routes are flat: route r reads row ``rows_R[r]`` of the layer's token matrix ``X_ND``, goes to
expert ``experts_R[r]`` and is added, times ``weights_R[r]``, to output token ``tokens_R[r]``.  Route order
is priority order: when an expert is over capacity, the routes that come first are kept.

Why not DeepSpeed's ``MOELayer`` dispatch (bench/deepspeed_gate.py runs our routing through it, for the
comparison): it pads every expert to the capacity C and runs the expert MLPs on the padding too
(with capacity factor 1.25, a quarter more expert FLOPs than the routed tokens need), and its equal-split
all-to-all forces one capacity on every rank.  Here routes are sorted by expert, each expert runs on
exactly its tokens, and the all-to-all is the uneven ``all_to_all_single`` of ``deepspeed.comm`` on
DeepSpeed's own expert-parallel group.  bench/moe_layer.py measures both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from ..kernels.counts import bincount


@dataclass
class RouteGrid:
    """Routes of the rows of a token matrix X: row s has up to k' routes; ``valid_KS`` marks real ones.

    Flattened choice-major (all rows' first route, then all second routes, ...), this is the priority
    order under a capacity limit.
    """

    experts_KS: torch.Tensor  # long
    weights_KS: torch.Tensor  # float, differentiable
    valid_KS: Optional[torch.Tensor] = None  # bool; None: all valid
    unit_weights: bool = False  # every weight is a constant 1 (the discrete-only VQ router): no multiplication
    valid_index: Optional[torch.Tensor] = None  # long: flat positions of the valid routes, known from shapes alone

    def flat(self):
        K, S = self.experts_KS.shape
        rows = torch.arange(S, device=self.experts_KS.device).repeat(K)
        experts, weights = self.experts_KS.reshape(-1), self.weights_KS.reshape(-1)
        if self.valid_KS is None:
            return rows, experts, weights
        if self.valid_index is not None:  # no boolean indexing: no device-to-host sync
            v = self.valid_index
            return rows.index_select(0, v), experts.index_select(0, v), weights.index_select(0, v)
        v = self.valid_KS.reshape(-1)
        return rows[v], experts[v], weights[v]


def capacity_for(num_routes: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """Routes one expert may take: ceil(capacity_factor * routes / experts), at least ``min_capacity``."""
    return max(int(math.ceil(capacity_factor * num_routes / num_experts)), min_capacity)


@dataclass
class Plan:
    """Which routes survive the capacity limit, and where each sits in its expert's buffer."""

    keep_R: torch.Tensor  # bool, route order
    position_R: torch.Tensor  # long: 0-based slot of the route in its expert's queue (route order)
    order_M: torch.Tensor  # long: kept route ids sorted by expert (stable: priority order within an expert)
    counts_E: torch.Tensor  # long: kept routes per expert
    capacity: Optional[int]  # None: dropless
    keep_M: Optional[torch.Tensor] = None  # bool: with order_M over all routes, which survive (see plan_routes)


def plan_routes(experts_R: torch.Tensor, num_experts: int, capacity: Optional[int], sync_free: bool = False) -> Plan:
    """The dispatch order and capacity decisions of the routes ``experts_R`` (priority order).

    ``sync_free``: under a capacity the dropped routes stay in ``order_M`` (with ``keep_M`` False) instead of
    being removed, so no tensor's size depends on the data and nothing is read back to the host; the experts
    then also compute the dropped rows (at most the dropped fraction more work) and ``combine`` gives them
    weight 0.  For the grouped GEMM on one expert-parallel rank."""
    R = experts_R.numel()
    order_R = torch.argsort(experts_R, stable=True)
    counts_E = bincount(experts_R, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_e = experts_R[order_R]
    position_sorted = torch.arange(R, device=experts_R.device) - starts_E[sorted_e]
    position_R = torch.empty_like(position_sorted).scatter_(0, order_R, position_sorted)
    if capacity is None:
        return Plan(torch.ones(R, dtype=torch.bool, device=experts_R.device), position_R, order_R, counts_E, None)
    keep_sorted = position_sorted < capacity
    keep_R = position_R < capacity
    if sync_free:
        return Plan(keep_R, position_R, order_R, counts_E, capacity, keep_M=keep_sorted)
    return Plan(keep_R, position_R, order_R[keep_sorted], counts_E.clamp(max=capacity), capacity)


class _AllToAllV(torch.autograd.Function):
    """Uneven all-to-all; its backward is the all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits: List[int], in_splits: List[int], group):
        import deepspeed.comm as ds_comm

        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        ds_comm.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits,
                                  group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAllV.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


class SortedDispatch:
    """dispatch -> (experts) -> combine for one forward.  ``dispatch`` returns the expert inputs of the
    local experts, concatenated expert by expert, and how many rows each has; ``combine`` takes the expert
    outputs in the same layout back to the tokens."""

    def __init__(self, num_experts: int, ep_size: int, ep_group):
        self.num_experts, self.ep_size, self.ep_group = num_experts, ep_size, ep_group
        self.num_local = num_experts // ep_size

    def dispatch(self, X_ND: torch.Tensor, rows_R: torch.Tensor, experts_R: torch.Tensor, plan: Plan,
                 host_counts: bool = True):
        """(x_MD, counts): the local experts' rows, sorted by local expert, and how many each has: a list
        (``host_counts``, for the loop over experts) or a device tensor (for the grouped GEMM; with one rank
        this avoids the host sync of the list)."""
        self.plan = plan
        x_MD = X_ND.index_select(0, rows_R.index_select(0, plan.order_M))
        if self.ep_size == 1:
            return x_MD, (plan.counts_E.tolist() if host_counts else plan.counts_E)
        P, L = self.ep_size, self.num_local
        send_counts = plan.counts_E.view(P, L)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.ep_group)
        self.in_splits = send_counts.sum(1).tolist()
        self.out_splits = recv_counts.sum(1).tolist()
        recv = _AllToAllV.apply(x_MD, self.out_splits, self.in_splits, self.ep_group)
        # received rows are source-rank major; regroup them local-expert major for contiguous expert runs
        local_expert = torch.repeat_interleave(torch.arange(L, device=recv.device).repeat(P), recv_counts.reshape(-1))
        self.regroup = torch.argsort(local_expert, stable=True)
        local_counts = recv_counts.sum(0)
        return recv.index_select(0, self.regroup), (local_counts.tolist() if host_counts else local_counts)

    def combine(self, y_chunks: List[torch.Tensor], tokens_R: torch.Tensor, weights_R: torch.Tensor,
                num_tokens: int, unit_weights: bool = False):
        """Expert outputs (chunks in dispatch order: one per local expert, or one for all) -> weighted sum per
        token.

        With one rank the chunks are added into the tokens one by one (no concatenated copy of all expert
        outputs); ``unit_weights`` (the routes' weights are a constant 1, the VQ router's) skips the
        multiplication."""
        plan = self.plan
        tokens_M = tokens_R.index_select(0, plan.order_M)
        w_M = weights_R.index_select(0, plan.order_M)
        unweighted = unit_weights and not w_M.requires_grad and plan.keep_M is None
        if plan.keep_M is not None:  # dropped routes computed but not combined
            w_M = torch.where(plan.keep_M, w_M, torch.zeros((), dtype=w_M.dtype, device=w_M.device))
        if self.ep_size > 1:
            y_MD = torch.cat(y_chunks)
            back = torch.empty_like(self.regroup)
            back[self.regroup] = torch.arange(self.regroup.numel(), device=back.device)
            y_chunks = [_AllToAllV.apply(y_MD.index_select(0, back), self.in_splits, self.out_splits, self.ep_group)]
        d = y_chunks[0].shape[1]
        # accumulated in fp32 whatever the experts' dtype (a bf16 sum of k weighted outputs would round each add),
        # filled in place: no copy of a fresh zero tensor
        out_TD = y_chunks[0].new_zeros(num_tokens, d, dtype=torch.float32)
        start = 0
        for y_nD in y_chunks:
            # an expert without rows is added too (0 rows): its parameters stay in the graph and get a zero
            # gradient.  Skipped, they would get none on this rank only, and ZeRO's gradient buckets (which hold
            # the parameters that have gradients) would differ between the ranks that replicate the expert.
            n = y_nD.shape[0]
            rows = tokens_M[start:start + n]
            src = y_nD.float() if unweighted else y_nD.float() * w_M[start:start + n].float().unsqueeze(1)
            out_TD.index_add_(0, rows, src)
            start += n
        return out_TD.to(y_chunks[0].dtype)

