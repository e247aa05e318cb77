"""``bincount(idx, n)``: how often each of 0..n-1 occurs in ``idx``, without a device-to-host sync.

``torch.bincount`` on CUDA reads the largest index back to the host to size its output, a sync in every MoE
forward (routing counts, dispatch plan, codebook usage).  Here the size ``n`` is known, so the counts are one
``scatter_add_`` into ``n`` zeros: int64, exact in any activation dtype, and deterministic (integer adds).
"""
from __future__ import annotations

import torch


def bincount(idx: torch.Tensor, n: int) -> torch.Tensor:
    """int64 counts ``[n]`` of the values of ``idx`` (any shape, each in ``[0, n)``) on ``idx``'s device."""
    flat = idx.reshape(-1).long()
    return torch.zeros(n, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
