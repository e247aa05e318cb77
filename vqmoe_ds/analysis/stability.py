"""Routing stability across the checkpoints of one run: the share of the same tokens whose first expert is
unchanged between consecutive checkpoints.  Why: routing fluctuation (StableMoE's argument) means a token's
expert keeps changing while training, so the expert it trains is not the one that will serve it; the VQ path's
assignment is a nearest code and should move less."""
from __future__ import annotations

from typing import List, Sequence

import torch


def routing_stability(experts_a_T: torch.Tensor, experts_b_T: torch.Tensor) -> float:
    """Share of tokens with the same expert in both assignments (same tokens, same order)."""
    if experts_a_T.shape != experts_b_T.shape:
        raise ValueError(f"assignments of {tuple(experts_a_T.shape)} and {tuple(experts_b_T.shape)} tokens: "
                         f"probe the same tokens in every checkpoint")
    return float((experts_a_T == experts_b_T).float().mean())


def stability_series(assignments: Sequence[torch.Tensor]) -> List[float]:
    """Stability between checkpoint i and i+1 for each consecutive pair (len(assignments) - 1 values)."""
    return [routing_stability(a, b) for a, b in zip(assignments[:-1], assignments[1:])]
