"""Forward hooks that record, for every MoE layer of a model, what it actually did on some tokens: its input,
its output, the routing decisions of its continuous router and of its VQ router (codes), and the rows each
expert MLP was run on with what it returned.

Why hooks: the analysis must see the decisions of the real forward (the model's own dispatch, capacity and
experts), not a re-implementation of routing.  Hooks on the router modules capture their ``Routing`` outputs;
hooks on the expert modules capture the dispatched rows, so "expert inputs" are exactly what each expert got.
Use the model in eval mode (no jitter, no codebook updates), e.g.::

    with RoutingProbe(model, max_tokens=4096) as probe:
        model(idx_BT)
    rec = probe.records[0]     # layer 0: rec.x_TD, rec.cont_TK, rec.codes_T, rec.expert_in[e], ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..models import moe_layers


@dataclass
class LayerRecord:
    """Everything captured for one MoE layer, concatenated over the probed forwards (CPU, detached)."""
    num_experts: int
    codebook_size: Optional[int]
    x: List[torch.Tensor] = field(default_factory=list)
    y: List[torch.Tensor] = field(default_factory=list)
    cont: List[torch.Tensor] = field(default_factory=list)
    codes: List[torch.Tensor] = field(default_factory=list)
    disc: List[torch.Tensor] = field(default_factory=list)
    expert_in: Dict[int, List[torch.Tensor]] = field(default_factory=dict)
    expert_out: Dict[int, List[torch.Tensor]] = field(default_factory=dict)

    @staticmethod
    def _cat(parts):
        return torch.cat(parts) if parts else None

    @property
    def x_TD(self):
        return self._cat(self.x)

    @property
    def y_TD(self):
        return self._cat(self.y)

    @property
    def cont_TK(self):
        """Continuous router's experts per token ([T, k]), None without a continuous path."""
        return self._cat(self.cont)

    @property
    def codes_T(self):
        return self._cat(self.codes)

    @property
    def disc_T(self):
        """Expert of the discrete path per token (code mod N), None without one."""
        return self._cat(self.disc)

    def top1(self, path: str) -> Optional[torch.Tensor]:
        """The token's first expert on ``path`` ("continuous" or "discrete")."""
        if path == "continuous":
            c = self.cont_TK
            return None if c is None else c[:, 0]
        return self.disc_T

    def paths(self) -> List[str]:
        return [p for p in ("continuous", "discrete") if self.top1(p) is not None]

    def expert_rows(self, which: str = "in") -> Dict[int, torch.Tensor]:
        src = self.expert_in if which == "in" else self.expert_out
        return {e: torch.cat(v) for e, v in sorted(src.items()) if v}

    def expert_load(self) -> torch.Tensor:
        """Routes per expert decided on the probed tokens, both paths (what ``stats()['expert_load']`` sums)."""
        load = torch.zeros(self.num_experts, dtype=torch.long)
        for t in (self.cont_TK, self.disc_T):
            if t is not None:
                load += torch.bincount(t.reshape(-1), minlength=self.num_experts)
        return load

    def code_counts(self) -> Optional[torch.Tensor]:
        c = self.codes_T
        return None if c is None else torch.bincount(c, minlength=self.codebook_size)


class RoutingProbe:
    def __init__(self, model: torch.nn.Module, max_tokens: Optional[int] = None, capture_experts: bool = True):
        self.layers = moe_layers(model)
        self.max_tokens, self.capture_experts = max_tokens, capture_experts
        self.records = [LayerRecord(l.cfg.num_experts, l.cfg.codebook_size if l.vq_router is not None else None)
                        for l in self.layers]
        self.handles = []
        self._seen = [0] * len(self.layers)

    def _room(self, i) -> bool:
        return self.max_tokens is None or self._seen[i] < self.max_tokens

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._layer_hook(i)))
            if layer.router is not None:
                self.handles.append(layer.router.register_forward_hook(self._router_hook(i, "cont")))
            if layer.vq_router is not None:
                self.handles.append(layer.vq_router.register_forward_hook(self._router_hook(i, "vq")))
            if self.capture_experts:
                first = _first_global_expert(layer)
                for j, expert in enumerate(layer.experts):
                    self.handles.append(expert.register_forward_hook(self._expert_hook(i, first + j)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _layer_hook(self, i):
        def hook(module, args, output):
            if not self._room(i):
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            self.records[i].x.append(x.float().cpu())
            self.records[i].y.append(output[0].detach().reshape(x.shape).float().cpu())
            self._seen[i] += x.shape[0]
        return hook

    def _router_hook(self, i, kind):
        def hook(module, args, routing):
            if not self._room(i):
                return
            rec = self.records[i]
            if kind == "cont":
                rec.cont.append(routing.experts_TK.detach().cpu())
            else:
                rec.codes.append(routing.codes_T.detach().cpu())
                rec.disc.append(routing.experts_TK[:, 0].detach().cpu())
        return hook

    def _expert_hook(self, i, e):
        def hook(module, args, output):
            if not self._room(i):
                return
            x = args[0].detach()
            rec = self.records[i]
            rec.expert_in.setdefault(e, []).append(x.reshape(-1, x.shape[-1]).float().cpu())
            rec.expert_out.setdefault(e, []).append(output.detach().reshape(-1, output.shape[-1]).float().cpu())
        return hook


def _first_global_expert(layer) -> int:
    from ..moe.layer import expert_parallel_rank

    return expert_parallel_rank(layer.cfg.ep_size) * len(layer.experts)


def expert_of(layer, path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """vectors -> the layer's first expert on ``path`` for each (the function Definition 4.1 applies)."""
    def f(v_TD):
        with torch.no_grad():
            r = layer.router if path == "continuous" else layer.vq_router
            return r(v_TD.to(next(layer.parameters()).dtype)).experts_TK[:, 0].cpu()
    return f
