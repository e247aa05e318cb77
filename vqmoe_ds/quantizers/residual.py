"""Residual VQ: a stack of codebook quantizers, each quantizing what the previous ones left over.

Built from our own `CodebookQuantizer` (not vector-quantize-pytorch's ``ResidualVQ``) so that every level
synchronises over the codebook's own process group; see codebook.py for why that matters under expert
parallelism.  The expert is chosen by the first (coarsest) level's code: it is the level that clusters the
tokens, while deeper levels refine the value of x~.
"""
from __future__ import annotations

import torch
from torch import nn

from .codebook import CodebookQuantizer, QuantizerOutput


class ResidualQuantizer(nn.Module):
    def __init__(self, dim: int, codebook_size: int, num_quantizers: int = 2, codebook_dim=None, **kwargs):
        super().__init__()
        C = codebook_dim or dim
        self.in_proj = nn.Linear(dim, C) if C != dim else nn.Identity()
        self.out_proj = nn.Linear(C, dim) if C != dim else nn.Identity()
        # residuals do not live on the unit sphere, so every level measures L2 distance
        kwargs["distance"] = "l2"
        self.levels = nn.ModuleList(CodebookQuantizer(C, codebook_size, **kwargs) for _ in range(num_quantizers))
        self.codebook_size = codebook_size

    def freeze(self, frozen: bool = True) -> "ResidualQuantizer":
        for lvl in self.levels:
            lvl.freeze(frozen)
        for p in list(self.in_proj.parameters()) + list(self.out_proj.parameters()):
            p.requires_grad_(not frozen)
        return self

    def forward(self, x_TD: torch.Tensor) -> QuantizerOutput:
        z_TC = self.in_proj(x_TD)
        residual, total, loss, first = z_TC, torch.zeros_like(z_TC), z_TC.new_zeros(()), None
        for lvl in self.levels:
            out = lvl(residual)
            first = first or out
            total = total + out.quantized_TD
            loss = loss + out.loss
            residual = residual - out.quantized_TD.detach()
        stats = dict(first.stats)
        stats["vq_loss"] = loss.detach()
        return QuantizerOutput(self.out_proj(total), first.codes_T, loss, stats)
