"""Routing quality where the truth is known (the setting of the paper's Proposition 4.4).

Tokens come from C Gaussian clusters; cluster c's target is its own linear map, y = A_c x.  One MoE layer
with N = C experts learns x -> y with each router for the same steps and data; then we ask how well each
router's expert (the first choice; for VQ and VQMoE the discrete path's) recovers the true cluster: purity, NMI, and the consistency score (Definition 4.1)
against the true cluster centres, plus the held-out MSE.

    python bench/clustered_routing.py                 # 8 clusters, d=32, 400 steps, 3 seeds
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vqmoe_ds.analysis import consistency_score, nmi, purity  # noqa: E402
from vqmoe_ds.moe import MoEConfig  # noqa: E402
from vqmoe_ds.routers import set_step  # noqa: E402

ROUTERS = {
    "top-1 SMoE": dict(router="topk", top_k=1),
    "top-2 SMoE": dict(router="topk", top_k=2),
    "XMoE top-1": dict(router="xmoe", top_k=1, xmoe_dim=8),
    "clustering router (k-means after 50 steps)": dict(router="cluster", cluster_warmup_steps=50),
    "VQ discrete-only, default codebook (cosine, x~ at the token's scale)": dict(router="vq"),
    "VQ discrete-only, expert input x~": dict(router="vq", vq_distance="cosine", codebook_dim=8),
    "VQ discrete-only, expert input x": dict(router="vq", vq_distance="cosine", codebook_dim=8,
                                             discrete_input="token"),
    "VQMoE top-1 + VQ, input x~": dict(router="vqmoe", top_k=1, vq_distance="cosine", codebook_dim=8),
    "VQMoE top-1 + VQ, input x": dict(router="vqmoe", top_k=1, vq_distance="cosine", codebook_dim=8,
                                      discrete_input="token"),
}


def make_data(C, D, n, g):
    centres = torch.randn(C, D, generator=g) * 2.0
    maps = torch.randn(C, D, D, generator=g) / D ** 0.5

    def sample(m):
        c = torch.randint(0, C, (m,), generator=g)
        x = centres[c] + 0.5 * torch.randn(m, D, generator=g)
        y = torch.einsum("mij,mj->mi", maps[c], x)
        return x, y, c
    return centres, sample


def top1_expert(layer, x):
    """The expert of the discrete path where there is one (VQ, VQMoE), else the router's first choice."""
    with torch.no_grad():
        if layer.vq_router is not None:
            return layer.vq_router(x).experts_TK[:, 0]
        return layer.router(x).experts_TK[:, 0]  # (eval mode: the clustering router's centroids stay)


def run(name, kw, C, D, steps, batch, seed):
    g = torch.Generator().manual_seed(seed)
    centres, sample = make_data(C, D, batch, g)
    torch.manual_seed(seed)
    layer = MoEConfig(hidden_size=D, ffn_hidden_size=4 * D, num_experts=C, codebook_size=C, drop_tokens=False,
                      **kw).build()
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        set_step(layer, step)
        x, y, _ = sample(batch)
        out, aux = layer(x)
        loss = (out - y).square().mean() + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    x, y, c = sample(4096)
    with torch.no_grad():
        mse = float((layer(x)[0] - y).square().mean())
    e = top1_expert(layer, x)
    return {"mse": mse, "purity": purity(c.numpy(), e.numpy()), "nmi": nmi(c.numpy(), e.numpy()),
            "consistency": consistency_score(lambda v: top1_expert(layer, v), x, centres)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    print(f"{args.clusters} clusters, d={args.dim}, {args.steps} steps x {args.batch} tokens, mean over "
          f"{args.seeds} seeds (+- std)")
    print("| router | held-out MSE | purity | NMI | consistency |")
    print("|---|---:|---:|---:|---:|")
    for name, kw in ROUTERS.items():
        res = [run(name, kw, args.clusters, args.dim, args.steps, args.batch, s) for s in range(args.seeds)]
        cell = lambda k: f"{np.mean([r[k] for r in res]):.3f} ± {np.std([r[k] for r in res]):.3f}"  # noqa: E731
        print(f"| {name} | {cell('mse')} | {cell('purity')} | {cell('nmi')} | {cell('consistency')} |", flush=True)


if __name__ == "__main__":
    main()
