"""SoftMoE (Puigcerver et al., "From Sparse to Soft Mixtures of Experts", 2023) as an FFN slot.

Why it is its own module and not a router: a SoftMoE never sends a *token* anywhere.  Each of the E experts
owns p *slots*; a slot's input is a convex combination of all tokens of one image, and every token's output
is a convex combination of all slot outputs.  Both use the same logits ``X Phi``, with learned slot
parameters ``Phi`` [D, E*p]::

    logits_BNS   = X_BND @ Phi_DS                    (S = E * p slots)
    dispatch_BNS = softmax over tokens N   (each slot: weights over the image's tokens, summing to 1)
    combine_BNS  = softmax over slots  S   (each token: weights over all slots, summing to 1)
    slots_BSD    = dispatch^T X            -> expert e = s // p runs on its p slots
    y_BND        = combine @ expert_out_BSD

So nothing is dropped, there is no balance loss (``aux`` is 0) and the layer is differentiable everywhere;
but it mixes tokens *within* a sequence, so its input must keep the image axis: x is [B, N, D].  (For a
causal LM that mixing would leak the future; that is why it lives in the vision package.)

Experts are DeepSpeed experts: the layer wraps a real ``deepspeed.moe.layer.MoE`` and uses its ``Experts``
and expert-parallel group, so the engine builds MoE parameter groups and checkpoints one file per expert.
DeepSpeed's gate is not used (a SoftMoE has no routing decision): the container is built by
``vqmoe_ds.moe.container.deepspeed_experts``, as for `MoELayer`, with a parameter-free gate that only receives the
ep group.  The dispatch is DeepSpeed's: slot inputs laid out [E, C, D] with
C = B * p (the same on every rank, so the equal-split ``_AllToAll`` fits exactly), experts on
``[ep, local, C, D]``, and the all-to-all back.

With ``normalize`` (the paper's recipe for large D) the logits are ``scale * l2norm(X) @ l2norm(Phi)`` with a
learned scalar ``scale``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..fields import setting
from ..moe.config import ConfigError
from ..moe.container import deepspeed_experts
from ..moe.layer import ExpertMLP, init_experts_by_global_id


@dataclass
class SoftMoEConfig:
    hidden_size: int
    ffn_hidden_size: int
    num_experts: int = 8
    slots_per_expert: int = setting(1, "SoftMoE: slots p per expert; the paper sets E * p ~ the number of tokens")
    ep_size: int = 1
    activation: str = "gelu"
    dropout: float = 0.0
    init_std: float = setting(0.02, "experts: N(0, init_std) per global expert id, as MoELayer does")
    output_init_std: Optional[float] = setting(None, "the experts' fc2 (the model sets its depth-scaled std); none: "
                                                     "init_std")
    normalize: bool = setting(False, "SoftMoE: l2-normalise X and Phi and learn a scalar scale (the paper, for large "
                                     "D)")

    FLAGS: ClassVar[Dict[str, Tuple[str, ...]]] = {"slots_per_expert": ("--soft-slots",),
                                                   "normalize": ("--soft-normalize",)}

    def __post_init__(self):
        if self.hidden_size < 1 or self.ffn_hidden_size < 1:
            raise ConfigError(f"SoftMoE hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}: "
                              f"both must be >= 1")
        if self.num_experts < 1:
            raise ConfigError(f"SoftMoE num_experts={self.num_experts}: set --num-experts to 1 or more")
        if self.slots_per_expert < 1:
            raise ConfigError(f"SoftMoE slots_per_expert={self.slots_per_expert}: set --soft-slots to 1 or more")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ConfigError(f"num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}: choose "
                              f"an expert-parallel size that divides the number of experts")

    def build(self) -> "SoftMoE":
        return SoftMoE(self)


class SoftMoE(nn.Module):
    def __init__(self, cfg: SoftMoEConfig):
        super().__init__()
        self.cfg = cfg
        E, p, D = cfg.num_experts, cfg.slots_per_expert, cfg.hidden_size
        expert = ExpertMLP(D, cfg.ffn_hidden_size, cfg.activation, cfg.dropout)
        self.moe = deepspeed_experts(expert, D, E, cfg.ep_size, owner="SoftMoE")
        # Phi: LeCun-normal columns, as in the paper (logits start O(1) whatever D is)
        self.phi_DS = nn.Parameter(torch.randn(D, E * p) / math.sqrt(D))
        self.scale = nn.Parameter(torch.ones(1)) if cfg.normalize else None  # [1]: DeepSpeed cannot broadcast 0-dim
        self._stats: Dict[str, torch.Tensor] = {}
        self.reset_experts(int(torch.randint(0, 2**31 - 1, (), device="cpu").item()))

    def reset_experts(self, seed: int) -> None:
        """Expert e drawn from (seed, global id e): an ep=2 run starts from the model of an ep=1 run."""
        init_experts_by_global_id(self.experts, self.cfg.ep_size, seed, self.cfg.init_std, self.cfg.output_init_std)

    @property
    def experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    @property
    def ep_group(self):
        return self.moe.deepspeed_moe.ep_group

    def logits(self, x_BND: torch.Tensor) -> torch.Tensor:
        x, phi = x_BND.float(), self.phi_DS.float()
        if self.scale is not None:
            return self.scale * torch.einsum("bnd,ds->bns", F.normalize(x, dim=-1), F.normalize(phi, dim=0))
        return torch.einsum("bnd,ds->bns", x, phi)

    def run_experts(self, slots_ECD: torch.Tensor) -> torch.Tensor:
        """[E, C, D] slot inputs (all experts, this rank's images) -> [E, C, D] outputs, through the ep group."""
        from deepspeed.moe.sharded_moe import _AllToAll

        P = self.cfg.ep_size
        E, C, D = slots_ECD.shape
        if P > 1:
            if self.ep_group is None:
                raise RuntimeError(f"SoftMoE with ep_size={P} has no expert-parallel group yet: create the DeepSpeed "
                                   f"engine (deepspeed.initialize) or call vqmoe_ds.parallel.setup_expert_parallel"
                                   f"(model) before the first forward")
            slots_ECD = _AllToAll.apply(self.ep_group, slots_ECD)
        # rows now: (source rank, local expert) -> DeepSpeed's Experts chunk dim 1 by local expert
        out = self.moe.deepspeed_moe.experts(slots_ECD.reshape(P, E // P, C, D)).reshape(E, C, D)
        return _AllToAll.apply(self.ep_group, out) if P > 1 else out

    def forward(self, x_BND: torch.Tensor, mask=None, ids=None):
        if mask is not None:
            raise ValueError("SoftMoE mixes all tokens of an image into its slots: it takes no padding mask")
        if x_BND.dim() != 3:
            raise ValueError(f"SoftMoE mixes the tokens of one image, so it needs x as [batch, tokens, dim]; got "
                             f"shape {tuple(x_BND.shape)}")
        B, N, D = x_BND.shape
        E, p = self.cfg.num_experts, self.cfg.slots_per_expert
        logits_BNS = self.logits(x_BND)
        dispatch_BNS = logits_BNS.softmax(dim=1)  # over tokens: a slot is a convex mix of the image's tokens
        combine_BNS = logits_BNS.softmax(dim=2)  # over slots: a token's output is a convex mix of slot outputs
        slots_BSD = torch.einsum("bns,bnd->bsd", dispatch_BNS.to(x_BND.dtype), x_BND)
        slots_ECD = slots_BSD.view(B, E, p, D).transpose(0, 1).reshape(E, B * p, D)
        out_BSD = self.run_experts(slots_ECD).view(E, B, p, D).transpose(0, 1).reshape(B, E * p, D)
        y_BND = torch.einsum("bns,bsd->bnd", combine_BNS.to(x_BND.dtype), out_BSD)
        with torch.no_grad():
            # "load" of expert e: the combine mass its slots receive, summed over tokens (sums to B*N)
            load = combine_BNS.sum(dim=(0, 1)).view(E, p).sum(1)
            ent = -(dispatch_BNS * dispatch_BNS.clamp_min(1e-12).log()).sum(1).mean()
            self._stats = {"expert_load": load, "dispatch_entropy": ent / math.log(max(N, 2)),
                           "combine_max": combine_BNS.max(dim=2).values.mean()}
        return y_BND, x_BND.new_zeros((), dtype=torch.float32)

    def stats(self) -> Dict[str, torch.Tensor]:
        """Detached numbers of the last forward: expert_load (combine mass per expert; sums to the tokens),
        dispatch_entropy (mean over slots, / log N: 1 = a slot averages all tokens, 0 = one token),
        combine_max (mean over tokens of its largest combine weight)."""
        return dict(self._stats)
