"""Clustering router (the paper's Table 5, MoCLE-style): the centroids of a k-means of the layer's inputs, fitted
once after a warm-up stretch and then fixed; each token goes to the expert of its nearest centroid.

A discrete baseline beside VQ routing: both send a token to the expert of its nearest vector, but here the
vectors are cluster centres of the data, fitted without gradients, where VQMoE's codebook learns with the VQ
loss of eq. 8.

  * warm-up (training steps below ``warmup_steps``): tokens are routed by centroids drawn from the first
    training batch, and every training forward keeps a few of its tokens in a per-rank sample buffer
    (``reservoir`` rows, a ring);
  * at the first training forward of step ``warmup_steps`` (after keeping a few of its tokens too): the samples
    of all ranks of the data-parallel group are gathered, k-means (k-means++ seeding, a fixed seed, float64) runs on them -- the same input and
    seed on every rank, so the same centroids -- and the centroids are frozen.

Cosine distance (the default) clusters the normalised tokens and compares directions; L2 clusters the tokens
as they are.  One route per token with weight 1, no auxiliary loss, no parameters; the centroids and the
sample buffer are buffers, so a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..quantizers.codebook import nearest_codes, resolve_group
from ..quantizers.kmeans import kmeans
from .base import Router, Routing
from ..kernels.counts import bincount


class ClusterRouter(Router):
    def __init__(self, hidden_size: int, num_experts: int, warmup_steps: int = 100, distance: str = "cosine",
                 samples_per_expert: int = 64, kmeans_iters: int = 25, process_group="data_parallel"):
        super().__init__(num_experts)
        if distance not in ("cosine", "l2"):
            raise ValueError(f"distance={distance!r}: choose cosine or l2")
        self.warmup_steps, self.distance, self.kmeans_iters = warmup_steps, distance, kmeans_iters
        self.process_group = process_group
        R = samples_per_expert * num_experts
        self.register_buffer("centroids_ED", torch.zeros(num_experts, hidden_size))
        self.register_buffer("state", torch.zeros(2, dtype=torch.long))  # [drawn from a batch, fitted]
        self.register_buffer("samples_RD", torch.zeros(R, hidden_size))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # samples written so far (ring position)

    @property
    def fitted(self) -> bool:
        """Whether the centroids are fitted: a host flag once seen True (no device sync per forward after the
        warm-up), else the buffer (a checkpoint or a restored step may have set it)."""
        if not getattr(self, "_fitted_host", False):
            self._fitted_host = bool(self.state[1])
        return self._fitted_host

    def _load_from_state_dict(self, *args, **kwargs):
        self._fitted_host = False  # the buffer is replaced: read it again
        super()._load_from_state_dict(*args, **kwargs)

    def _prepare(self, x_TD: torch.Tensor) -> torch.Tensor:
        x = x_TD.detach().float()
        return F.normalize(x, dim=-1) if self.distance == "cosine" else x

    @torch.no_grad()
    def _warm_up(self, z_TD: torch.Tensor) -> None:
        E, T = self.num_experts, z_TD.shape[0]
        if not bool(self.state[0]):  # first centroids: evenly spaced tokens of the first batch (the same rule on
            self.centroids_ED.copy_(z_TD[torch.linspace(0, T - 1, E).long()])  # every rank; exact ties do not matter)
            self.state[0] = 1
        R = self.samples_RD.shape[0]
        n = min(T, max(1, R // max(1, self.warmup_steps)))
        pick = torch.randperm(T, device=z_TD.device)[:n]
        slots = (self.filled + torch.arange(n, device=z_TD.device)) % R
        self.samples_RD[slots] = z_TD[pick]
        self.filled += n

    @torch.no_grad()
    def _fit(self) -> None:
        have = int(min(int(self.filled), self.samples_RD.shape[0]))
        samples = self.samples_RD[:have]
        group = resolve_group(self.process_group)
        if group is not None:  # the samples of every rank of the group: the same k-means input everywhere
            sizes = [torch.zeros(1, dtype=torch.long, device=samples.device) for _ in range(dist.get_world_size(group))]
            dist.all_gather(sizes, torch.tensor([have], device=samples.device), group=group)
            top = int(max(s.item() for s in sizes))
            padded = torch.zeros(top, samples.shape[1], device=samples.device)
            padded[:have] = samples
            parts = [torch.zeros_like(padded) for _ in sizes]
            dist.all_gather(parts, padded, group=group)
            samples = torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])
        if samples.shape[0] >= self.num_experts:
            centres = kmeans(samples, self.num_experts, iters=self.kmeans_iters, seed=0)
            self.centroids_ED.copy_(F.normalize(centres, dim=-1) if self.distance == "cosine" else centres)
        self.state[1] = 1

    def forward(self, x_TD: torch.Tensor, ids_T: Optional[torch.Tensor] = None, seq_len=None) -> Routing:
        z_TD = self._prepare(x_TD)
        if self.training and not self.fitted:
            self._warm_up(z_TD)
            if self.step_now >= self.warmup_steps:
                self._fit()
        experts_T = nearest_codes(z_TD, self.centroids_ED, self.distance)
        experts_TK = experts_T.unsqueeze(1)
        weights_TK = torch.ones(experts_TK.shape, dtype=torch.float32, device=x_TD.device)
        counts_E = bincount(experts_T, self.num_experts).float()
        stats = {"clusters_used": (counts_E > 0).sum().detach(), "fitted": self.state[1].detach().float()}
        return Routing(experts_TK, weights_TK, x_TD.new_zeros((), dtype=torch.float32), stats, unit_weights=True)
