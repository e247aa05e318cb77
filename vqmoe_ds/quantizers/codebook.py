"""Codebook vector quantizer: L2 (VQ-VAE) or cosine distance, optional low-dimensional projection
(VQGAN-style), straight-through gradients, the VQ loss of eq. 8, optional EMA codebook, k-means
initialisation and dead-code restart.

The quantized token x~ (what VQMoE's discrete expert reads) must live on the token's scale:

  * L2 codes live in the space of x (or of its projection, mapped back by the learned ``out_proj``);
  * a factorised cosine codebook (``codebook_dim`` < d: project down, normalise, look up, project back up)
    gets its scale from the learned up-projection ``out_proj``;
  * a cosine codebook in the model dimension has unit codes.  With ``scale="token"`` (the default) x~ is the
    code's direction at the token's norm, ``|x| v``: straight-through for the direction, exact for the norm
    (d x~/dx = I + (v - x/|x|) x^T/|x|, the identity when the code matches the token); with
    ``scale="code"`` it is the unit code itself, 1/|x| of the token's size (|x| is about sqrt(d) after a
    LayerNorm), so the same experts would see tokens of two very different sizes on the two paths.

The default (cosine, the model dimension, ``scale="token"``) was chosen by measurement: VQMoE on the tiny GPT,
War and Peace as bytes, 2000 steps, 3 seeds, best validation BPC 2.308 +- 0.011; against it, paired by seed with
95% t intervals: the unit code +0.022 [+0.016, +0.028], a factorised codebook of dimension 32 +0.021 [+0.004,
+0.038] and of dimension 8 +0.038 [+0.004, +0.071], L2 distance in the model dimension +0.090 [+0.075, +0.106]
(docs/results.md has the command).

Why our own and not vector-quantize-pytorch's ``VectorQuantize``: under expert parallelism the codebook is
a non-expert parameter shared by the data-parallel group, and every statistic that moves it (EMA counts,
k-means init, dead-code samples) must be reduced over exactly that group.  vector-quantize-pytorch
reduces over the *world* group, with no way to pass another (its ``sync_codebook``; its issue #105 reports
DDP hangs from this), and it cannot call our fused nearest-code kernel.  bench/quantizer.py measures the
two side by side.

Shapes: ``x_TD`` (tokens x model dim) -> ``z_TC`` (tokens x codebook dim) -> codes ``[T]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from ..kernels.counts import bincount

GroupSpec = Union[str, None, "dist.ProcessGroup"]


@dataclass
class QuantizerOutput:
    quantized_TD: torch.Tensor  # straight-through: value of the code (projected back), gradient of x
    codes_T: torch.Tensor  # long
    loss: torch.Tensor  # ||sg[z]-v||^2 + beta ||z-sg[v]||^2 (not yet weighted by alpha)
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


def resolve_group(spec: GroupSpec):
    """The process group whose ranks share the codebook, or None when there is nothing to synchronise.

    ``"data_parallel"`` (the default) is DeepSpeed's data-parallel group for non-expert parameters, the
    group over which the engine all-reduces the codebook's gradients: EMA statistics must be reduced over
    the same ranks or the replicas drift apart.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if spec == "data_parallel":
        from deepspeed.utils import groups

        return groups._get_data_parallel_group()
    if spec == "world":
        return dist.group.WORLD
    return spec


def _group_src(group) -> int:
    return dist.get_global_rank(group, 0) if group is not None and group is not dist.group.WORLD else 0


def nearest_codes(z_TC: torch.Tensor, codebook_KC: torch.Tensor, distance: str, impl: str = "auto") -> torch.Tensor:
    """Index of the nearest code of every row (ties: lowest index, as torch.argmin)."""
    try:
        from vqmoe_ds.kernels import nearest_code
    except ImportError:  # kernels package not built into this install
        nearest_code = None
    if nearest_code is not None:
        return nearest_code(z_TC.detach(), codebook_KC.detach(), distance=distance, impl=impl)
    z, cb = z_TC.detach().float(), codebook_KC.detach().float()
    if distance == "cosine":
        return (F.normalize(z, dim=-1) @ F.normalize(cb, dim=-1).t()).argmax(-1)
    return ((cb * cb).sum(-1) - 2.0 * (z @ cb.t())).argmin(-1)


class CodebookQuantizer(nn.Module):
    def __init__(self, dim: int, codebook_size: int, codebook_dim: Optional[int] = None, distance: str = "l2",
                 beta: float = 0.25, ema: bool = False, ema_decay: float = 0.99, kmeans_init: bool = False,
                 kmeans_iters: int = 10, dead_code_threshold: float = 0.0, process_group: GroupSpec = "data_parallel",
                 impl: str = "auto", eps: float = 1e-5, scale: str = "token"):
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"codebook_size={codebook_size}: the codebook needs at least one code")
        self.dim, self.codebook_size = dim, codebook_size
        self.codebook_dim = codebook_dim or dim
        self.distance, self.beta = distance, beta
        self.ema, self.ema_decay = ema, ema_decay
        self.kmeans_iters, self.dead_code_threshold = kmeans_iters, dead_code_threshold
        self.process_group, self.impl, self.eps = process_group, impl, eps
        if scale not in ("token", "code"):
            raise ValueError(f"scale={scale!r}: choose 'token' or 'code'")
        self.frozen = False
        C = self.codebook_dim
        self.token_scale = scale == "token" and distance == "cosine" and C == dim
        self.in_proj = nn.Linear(dim, C) if C != dim else nn.Identity()
        self.out_proj = nn.Linear(C, dim) if C != dim else nn.Identity()
        init = torch.randn(codebook_size, C)
        if distance == "cosine":
            init = F.normalize(init, dim=-1)
        self.codebook = nn.Parameter(init, requires_grad=not ema)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("usage_K", torch.full((codebook_size,), float(dead_code_threshold) + 1.0))
        if ema:
            self.register_buffer("cluster_size_K", torch.ones(codebook_size))
            self.register_buffer("embed_sum_KC", init.clone())

    # ---- public -------------------------------------------------------------------------------------
    def freeze(self, frozen: bool = True) -> "CodebookQuantizer":
        """No gradient reaches the codebook or projections, and no EMA / k-means / restart moves them."""
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen and not (p is self.codebook and self.ema))
        return self

    def codes_KC(self) -> torch.Tensor:
        cb = self.codebook.float()
        return F.normalize(cb, dim=-1) if self.distance == "cosine" else cb

    def project(self, x_TD: torch.Tensor) -> torch.Tensor:
        """z = in_proj(x) (normalised for cosine), in fp32 whatever the model's dtype: distances, the VQ loss and the
        codes' statistics are all computed in fp32 (a bf16 model would round them)."""
        x = x_TD.float()
        if isinstance(self.in_proj, nn.Linear):
            x = F.linear(x, self.in_proj.weight.float(), self.in_proj.bias.float())
        return F.normalize(x, dim=-1) if self.distance == "cosine" else x

    def _initted_now(self) -> bool:
        """Whether the k-means init has run: a host flag once this process ran it (no device sync each forward),
        else the buffer (a checkpoint may have set it)."""
        if not getattr(self, "_initted_host", False):
            self._initted_host = bool(self.initted)
        return self._initted_host

    def _load_from_state_dict(self, *args, **kwargs):
        self._initted_host = False  # the buffer is replaced: read it again
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x_TD: torch.Tensor) -> QuantizerOutput:
        z_TC = self.project(x_TD)
        updating = self.training and not self.frozen
        if updating and not self._initted_now():
            self._kmeans_init(z_TC.detach())
        codes_T = nearest_codes(z_TC, self.codes_KC(), self.distance, self.impl)
        v_TC = F.embedding(codes_T, self.codes_KC())
        loss = F.mse_loss(v_TC, z_TC.detach()) + self.beta * F.mse_loss(z_TC, v_TC.detach())
        z_q = z_TC + (v_TC - z_TC).detach()  # straight-through
        counts_K = bincount(codes_T, self.codebook_size).float()  # exact: counts never in bf16
        if updating:
            self._update_statistics(z_TC.detach(), codes_T, counts_K)
        used = (counts_K > 0).sum()
        p = counts_K / counts_K.sum().clamp_min(1)
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        stats = {"vq_loss": loss.detach(), "code_counts": counts_K.detach(), "codes_used": used.detach(),
                 "code_perplexity": perplexity.detach()}
        if isinstance(self.out_proj, nn.Linear):
            z_q = F.linear(z_q, self.out_proj.weight.float(), self.out_proj.bias.float())
        if self.token_scale:  # unit code -> the code's direction at the token's norm
            z_q = z_q * x_TD.float().norm(dim=-1, keepdim=True)
        return QuantizerOutput(z_q.to(x_TD.dtype), codes_T, loss, stats)

    # ---- statistics (all reduced over the codebook's group) ---------------------------------------------
    @torch.no_grad()
    def _update_statistics(self, z_TC, codes_T, counts_K):
        group = resolve_group(self.process_group)
        counts = counts_K.detach().float().clone()
        sums = None
        if self.ema:
            sums = torch.zeros(self.codebook_size, self.codebook_dim, dtype=torch.float32, device=z_TC.device)
            sums.index_add_(0, codes_T, z_TC.float())
        if group is not None:
            dist.all_reduce(counts, group=group)
            if sums is not None:
                dist.all_reduce(sums, group=group)
        d = self.ema_decay
        self.usage_K.mul_(d).add_(counts, alpha=1 - d)
        if self.ema:
            self.cluster_size_K.mul_(d).add_(counts, alpha=1 - d)
            self.embed_sum_KC.mul_(d).add_(sums, alpha=1 - d)
            n = self.cluster_size_K.sum()
            smoothed = (self.cluster_size_K + self.eps) / (n + self.codebook_size * self.eps) * n
            new = self.embed_sum_KC / smoothed.unsqueeze(1)
            self.codebook.data.copy_(F.normalize(new, dim=-1) if self.distance == "cosine" else new)
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(z_TC, group)

    @torch.no_grad()
    def _restart_dead_codes(self, z_TC, group):
        dead = self.usage_K < self.dead_code_threshold
        if group is not None:  # identical decision on every rank
            dead_f = dead.float()
            dist.all_reduce(dead_f, op=dist.ReduceOp.MAX, group=group)
            dead = dead_f > 0
        # Decided on the device (no host sync): a candidate replacement is drawn for every code and only the dead
        # ones take theirs.  Candidates are sampled on the group's first rank and broadcast, so every replica
        # gets the same.
        if z_TC.shape[0] == 0:
            return
        pick = torch.randint(0, z_TC.shape[0], (self.codebook_size,), device=z_TC.device)
        new = z_TC[pick].float().clone()
        if group is not None:
            dist.broadcast(new, src=_group_src(group), group=group)
        if self.distance == "cosine":
            new = F.normalize(new, dim=-1)
        dead_K1 = dead.unsqueeze(1)
        self.codebook.data.copy_(torch.where(dead_K1, new.to(self.codebook.dtype), self.codebook.data))
        self.usage_K.copy_(torch.where(dead, torch.full_like(self.usage_K, self.dead_code_threshold + 1.0),
                                       self.usage_K))  # give restarted codes time to be used
        if self.ema:
            self.cluster_size_K.copy_(torch.where(dead, torch.ones_like(self.cluster_size_K), self.cluster_size_K))
            self.embed_sum_KC.copy_(torch.where(dead_K1, new, self.embed_sum_KC))

    @torch.no_grad()
    def _kmeans_init(self, z_TC):
        """k-means on the group's first rank's batch (k-means++ seeding is overkill at K <= a few thousand:
        plain random seeding from the batch, then Lloyd iterations), broadcast to the group."""
        group = resolve_group(self.process_group)
        z = z_TC.float()
        K = self.codebook_size
        g = torch.Generator(device="cpu").manual_seed(0)
        idx = torch.randperm(z.shape[0], generator=g)[:K] if z.shape[0] >= K else torch.randint(0, z.shape[0], (K,), generator=g)
        centers = z[idx.to(z.device)].clone()
        for _ in range(self.kmeans_iters):
            if self.distance == "cosine":
                assign = (z @ F.normalize(centers, dim=-1).t()).argmax(-1)
            else:
                assign = ((centers * centers).sum(-1) - 2 * z @ centers.t()).argmin(-1)
            counts = torch.bincount(assign, minlength=K).float()
            sums = torch.zeros_like(centers).index_add_(0, assign, z)
            filled = counts > 0
            centers[filled] = sums[filled] / counts[filled].unsqueeze(1)
        if self.distance == "cosine":
            centers = F.normalize(centers, dim=-1)
        if group is not None:
            dist.broadcast(centers, src=_group_src(group), group=group)
        self.codebook.data.copy_(centers)
        if self.ema:
            self.cluster_size_K.fill_(1.0)
            self.embed_sum_KC.copy_(centers)
        self.initted.fill_(True)
        self._initted_host = True
