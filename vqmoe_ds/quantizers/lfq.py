"""Lookup-free quantization (LFQ): each of log2(K) projected dimensions is quantized to its sign, so the
code is a K-way binary number.  Uses vector-quantize-pytorch's ``LFQ`` (a well-kept implementation; it
has no codebook parameters to keep in sync, and its batch-entropy term averages over the world group,
which is the data-parallel group of non-expert parameters when there is no tensor parallelism).
"""
from __future__ import annotations

import torch
from torch import nn

from .codebook import QuantizerOutput
from ..kernels.counts import bincount


class LFQQuantizer(nn.Module):
    def __init__(self, dim: int, codebook_size: int, entropy_loss_weight: float = 0.1, beta: float = 0.25):
        super().__init__()
        from vector_quantize_pytorch import LFQ

        self.codebook_size = codebook_size
        self.lfq = LFQ(dim=dim, codebook_size=codebook_size, entropy_loss_weight=entropy_loss_weight,
                       commitment_loss_weight=beta)
        self.frozen = False

    def freeze(self, frozen: bool = True) -> "LFQQuantizer":
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)
        return self

    def forward(self, x_TD: torch.Tensor) -> QuantizerOutput:
        quantized, codes, aux = self.lfq(x_TD.float().unsqueeze(0))
        codes_T = codes.reshape(-1).long()
        counts_K = bincount(codes_T, self.codebook_size).float()
        stats = {"vq_loss": aux.detach(), "code_counts": counts_K, "codes_used": (counts_K > 0).sum()}
        return QuantizerOutput(quantized.squeeze(0).to(x_TD.dtype), codes_T, aux, stats)
