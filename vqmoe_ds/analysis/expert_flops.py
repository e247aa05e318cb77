"""Expert FLOPs per token, counted from what the MoE layers actually ran.

Why measured and not computed from the config: the point of the discrete path (eq. 7) is that a token costs one
expert instead of k; whether a run really saves that depends on the dispatch (capacity drops, a dispatch that
pads every expert to its capacity, VQMoE's pretrain mode adding a discrete route).  So forward
hooks count, per MoE layer:

  * ``tokens``: rows of the layer's input;
  * ``routes``: the routes the layer decided (``stats()["expert_load"]``) and how many of them capacity dropped
    (``stats()["dropped_fraction"]``);
  * ``expert_rows``: rows every local expert MLP was really called on (a hook on each expert), which is what
    the FLOPs are counted from: each row costs 2 x (D x F + F x D) = 4 D F forward FLOPs (two matmuls,
    2 FLOPs per multiply-add; biases and the activation are ignored).

Under expert parallelism each rank sees its own tokens and its own experts' rows; ``summary()`` sums both over
the world so the ratio is global.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..models import moe_layers
from ..parallel import all_reduce_sum


class ExpertFlopsCounter:
    """Context manager: ``with ExpertFlopsCounter(model) as c: model(x)``, then ``c.summary()``."""

    def __init__(self, model: torch.nn.Module):
        self.layers = moe_layers(model)
        self.counts = [dict(tokens=0, routes=0, dropped=0.0, expert_rows=0) for _ in self.layers]
        self.handles = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._tokens_hook(i)))
            self.handles.append(layer.register_forward_hook(self._routes_hook(i)))
            for expert in layer.experts:
                self.handles.append(expert.register_forward_hook(self._rows_hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _tokens_hook(self, i):
        def hook(module, args):
            x = args[0]
            self.counts[i]["tokens"] += x.numel() // x.shape[-1]
        return hook

    def _routes_hook(self, i):
        def hook(module, args, output):
            s = module.stats()
            routes = int(s["expert_load"].sum()) if "expert_load" in s else 0
            self.counts[i]["routes"] += routes
            self.counts[i]["dropped"] += float(s.get("dropped_fraction", torch.zeros(()))) * routes
        return hook

    def _rows_hook(self, i):
        def hook(module, args, output):
            x = args[0]
            self.counts[i]["expert_rows"] += x.numel() // x.shape[-1]
        return hook

    def summary(self, all_reduce: bool = True) -> Dict[str, object]:
        """Per layer and in total: tokens, routes decided / dropped, expert rows run, routes and expert FLOPs per
        token.  ``routes`` counts the decisions of this rank's tokens: under expert parallelism they are the
        same routes the experts' ranks run."""
        t = torch.tensor([[c["tokens"], c["routes"], c["dropped"], c["expert_rows"]] for c in self.counts],
                         dtype=torch.float64).reshape(len(self.counts), 4)
        if all_reduce:
            t = all_reduce_sum(t)
        layers: List[Dict[str, float]] = []
        total = 0.0
        for layer, (tokens, routes, dropped, rows) in zip(self.layers, t.tolist()):
            per_row = 4.0 * layer.cfg.hidden_size * layer.cfg.ffn_hidden_size
            fpt = per_row * rows / tokens if tokens else 0.0
            total += fpt
            layers.append({"tokens": int(tokens), "routes": int(routes), "dropped_routes": round(dropped),
                           "expert_rows": int(rows), "routes_per_token": routes / tokens if tokens else 0.0,
                           "expert_rows_per_token": rows / tokens if tokens else 0.0,
                           "expert_flops_per_token": fpt})
        return {"layers": layers, "expert_flops_per_token": total}
