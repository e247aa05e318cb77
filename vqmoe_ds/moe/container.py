"""DeepSpeed's MoE container around our experts: `deepspeed_experts` builds a real ``deepspeed.moe.layer.MoE`` whose
gate slot holds `GroupOnlyGate`.

Why a DeepSpeed ``MoE`` at all, when routing and dispatch are ours: the engine recognises expert parameters only
inside one (``allreduce=False`` and the expert group name on every expert parameter), and from that it builds the
MoE parameter groups, lets ZeRO 1/2 shard expert and non-expert states over their own data-parallel groups, and
saves one checkpoint file per expert; ``set_deepspeed_parallelism`` hands the layer its expert-parallel group
through the gate.  What the container does not do here is dispatch: its ``MOELayer`` forward and stock
``TopKGate`` never run.  The gate slot holds a module without parameters (a stock gate's ``wg`` would be an unused
parameter in every optimizer group) that only receives the group.  Used by `MoELayer` and the vision `SoftMoE`.
"""
from __future__ import annotations

from torch import nn


class GroupOnlyGate(nn.Module):
    """Stands in DeepSpeed's gate slot: receives the expert-parallel group, has no parameters, never routes."""

    def __init__(self, owner: str):
        super().__init__()
        self.owner = owner
        self.ep_group = None

    def _set_ep_group(self, ep_group):
        import torch.distributed as dist

        from .layer import expert_parallel_rank

        size = dist.get_world_size(ep_group)
        if dist.get_rank(ep_group) != expert_parallel_rank(size):
            raise RuntimeError("expert-parallel groups are not laid out as consecutive ranks (was "
                               "use_data_before_expert_parallel set?): vqmoe_ds needs the default layout to give "
                               "each rank its experts' initialisation")
        self.ep_group = ep_group

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.owner} routes and dispatches itself: call the {self.owner}, not its DeepSpeed MoE "
                           f"container")


def deepspeed_experts(expert: nn.Module, hidden_size: int, num_experts: int, ep_size: int, owner: str):
    """A ``deepspeed.moe.layer.MoE`` holding ``num_experts`` copies of ``expert`` (this rank's share at
    ``ep_size``), with `GroupOnlyGate` in its gate slot.  Its ``deepspeed_moe.experts.deepspeed_experts`` are the
    local experts; ``deepspeed_moe.ep_group`` is the expert-parallel group once the engine (or
    ``vqmoe_ds.parallel.setup_expert_parallel``) set it."""
    from deepspeed.moe.layer import MoE

    moe = MoE(hidden_size=hidden_size, expert=expert, num_experts=num_experts, ep_size=ep_size, k=1)
    moe.deepspeed_moe.gate = GroupOnlyGate(owner)
    return moe


__all__ = ["GroupOnlyGate", "deepspeed_experts"]
