"""Numbers that say how a router groups tokens.

* `consistency_score` (the paper's Definition 4.1): the share of tokens whose expert equals the expert of
  their nearest cluster centre.  A router that sends a whole neighbourhood to one expert scores 1; a VQ
  router scores 1 by construction against its own codebook (a token's code *is* its nearest centre).
* `purity` and `nmi` against true cluster labels, where they are known (the synthetic setting of the
  paper's Proposition 4.4).
* `load_summary`: min / max / percentiles of expert load, the figures Megatron users ask for.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np
import torch
import torch.nn.functional as F


def consistency_score(expert_of: Callable[[torch.Tensor], torch.Tensor], x_TD: torch.Tensor, centres_CD: torch.Tensor,
                      distance: str = "l2") -> float:
    """expert_of(vectors) -> top-1 expert per vector; centres are e.g. k-means centres of the tokens."""
    with torch.no_grad():
        if distance == "cosine":
            nearest_T = (F.normalize(x_TD, dim=-1) @ F.normalize(centres_CD, dim=-1).t()).argmax(-1)
        else:
            nearest_T = torch.cdist(x_TD.float(), centres_CD.float()).argmin(-1)
        return float((expert_of(x_TD) == expert_of(centres_CD)[nearest_T]).float().mean())


def _contingency(labels, assigned):
    labels, assigned = np.asarray(labels), np.asarray(assigned)
    _, li = np.unique(labels, return_inverse=True)
    _, ai = np.unique(assigned, return_inverse=True)
    table = np.zeros((li.max() + 1, ai.max() + 1), dtype=np.float64)
    np.add.at(table, (li, ai), 1)
    return table


def purity(labels, assigned) -> float:
    """Share of tokens that belong to the majority true cluster of their expert."""
    table = _contingency(labels, assigned)
    return float(table.max(axis=0).sum() / table.sum())


def nmi(labels, assigned) -> float:
    """Normalised mutual information, I(L; A) / ((H(L) + H(A)) / 2), in [0, 1]; 1 when the assignment
    reproduces the clusters up to renaming.  0 when either side is constant."""
    table = _contingency(labels, assigned)
    n = table.sum()
    p = table / n
    pl, pa = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pl, pa)[nz])).sum())
    h = lambda q: float(-(q[q > 0] * np.log(q[q > 0])).sum())  # noqa: E731
    denom = (h(pl) + h(pa)) / 2
    return mi / denom if denom > 0 else 0.0


def load_summary(load_E) -> Dict[str, float]:
    """Expert load as shares of all routes: min, max, p5/p50/p95 and max/mean (1.0 = perfectly balanced)."""
    load = np.asarray(load_E, dtype=np.float64)
    share = load / max(load.sum(), 1.0)
    return {"min": float(share.min()), "max": float(share.max()), "p5": float(np.percentile(share, 5)),
            "p50": float(np.percentile(share, 50)), "p95": float(np.percentile(share, 95)),
            "max_over_mean": float(share.max() * len(share)), "empty_experts": int((load == 0).sum())}
