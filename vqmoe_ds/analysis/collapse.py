"""The representation-collapse view: expert inputs / outputs projected to 2-D by one PCA per layer
(``torch.pca_lowrank``), coloured by expert, plus a number for how collapsed they are.

Why one shared projection for all experts of a layer: the question is whether the experts see (or produce)
separated regions of the space or one collapsed blob, so they must be drawn in the same coordinates.  The
number is the effective rank exp(H(p)), p = normalised singular values of the centred rows (Roy & Vetterli):
it equals D for isotropic rows and 1 for rows on a line; a router that collapses token representations toward
a few expert embeddings drives it down.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch


def effective_rank(x_TD: torch.Tensor) -> float:
    x = x_TD.double() - x_TD.double().mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    if float(s.sum()) == 0.0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def pca_2d(groups: Dict[int, torch.Tensor], seed: int = 0) -> Tuple[Dict[int, torch.Tensor], torch.Tensor]:
    """Project every group's rows with the top-2 principal directions of all rows together.
    Returns ({group: coords [n, 2]}, explained-variance share of the two components)."""
    keys = [k for k in sorted(groups) if groups[k].shape[0] > 0]
    allx = torch.cat([groups[k] for k in keys]).double()
    mean = allx.mean(0, keepdim=True)
    torch.manual_seed(seed)
    q = min(2, allx.shape[1], allx.shape[0])
    _, s, v = torch.pca_lowrank(allx - mean, q=q, center=False, niter=4)
    total = float(((allx - mean) ** 2).sum())
    explained = (s ** 2) / total if total > 0 else torch.zeros_like(s)
    return {k: ((groups[k].double() - mean) @ v).float() for k in keys}, explained.float()


def plot_collapse(groups: Dict[int, torch.Tensor], title: str, path: str, max_points: int = 2000) -> Dict[str, float]:
    """Scatter of the 2-D projection coloured by expert, saved to ``path`` (PNG); returns its numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords, explained = pca_2d(groups)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for k, c in coords.items():
        step = max(1, c.shape[0] * len(coords) // max_points)
        ax.scatter(c[::step, 0], c[::step, 1], s=4, alpha=0.6, label=f"expert {k} ({c.shape[0]})")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"PC1 ({float(explained[0]):.0%})")
    if explained.numel() > 1:
        ax.set_ylabel(f"PC2 ({float(explained[1]):.0%})")
    ax.legend(fontsize=6, markerscale=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    allx = torch.cat([g for g in groups.values() if g.shape[0]])
    return {"effective_rank": effective_rank(allx), "pc1_share": float(explained[0]),
            "pc2_share": float(explained[1]) if explained.numel() > 1 else 0.0}
