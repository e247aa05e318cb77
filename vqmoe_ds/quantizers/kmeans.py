"""Plain k-means (Lloyd's algorithm with k-means++ seeding) on a tensor: the clustering router's centroids and
the cluster centres of the routing analysis' consistency score (Definition 4.1).  Why our own: a few lines of
torch, deterministic from a seed, and no new dependency (scikit-learn is not in the pinned stack)."""
from __future__ import annotations

import torch


def kmeans(x_TD: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """The k centres [k, D] of ``x_TD`` (float64 internally).  Raises if there are fewer points than centres."""
    x = x_TD.detach().double().cpu()
    T = x.shape[0]
    if T < k:
        raise ValueError(f"k-means with {k} centres needs at least {k} points, got {T}: probe more tokens")
    g = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(T, (1,), generator=g)].squeeze(0)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):  # k-means++: next centre with probability proportional to squared distance
        if float(d2.sum()) == 0.0:
            i = int(torch.randint(T, (1,), generator=g))
        else:
            i = int(torch.multinomial(d2 / d2.sum(), 1, generator=g))
        centres.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        counts = torch.bincount(assign, minlength=k).double()
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        filled = counts > 0
        new = c.clone()
        new[filled] = sums[filled] / counts[filled].unsqueeze(1)
        if torch.equal(new, c):
            break
        c = new
    return c.to(x_TD.dtype)
