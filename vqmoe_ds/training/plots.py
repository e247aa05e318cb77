"""PNG plots of a run from its ``log.jsonl``: loss curves, expert load per layer, code usage per layer."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np


def read_log(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _moe_matrix(records: List[Dict], key: str, last: int = 10) -> np.ndarray:
    """[layers, E or K] shares of ``key`` summed over the last ``last`` train records."""
    rows = [r["moe"] for r in records if r.get("kind") == "train" and r.get("moe")][-last:]
    if not rows or key not in rows[-1][0]:
        return np.zeros((0, 0))
    counts = np.array([[layer[key] for layer in rec] for rec in rows], dtype=np.float64).sum(0)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1e-12)


def make_plots(out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(os.path.join(out_dir, "log.jsonl"))
    written = []
    train = [r for r in records if r.get("kind") == "train"]
    valid = [r for r in records if r.get("kind") == "valid"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (task NLL)")
    if valid:
        ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "loss.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    for key, name, title, xlabel in (("expert_load", "expert_load.png", "routes per expert (share, last 10 logs)", "expert"),
                                     ("code_counts", "code_usage.png", "code usage (share, last 10 logs)", "code")):
        m = _moe_matrix(records, key)
        if m.size == 0:
            continue
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * m.shape[1] + 2), 1 + 0.6 * m.shape[0]))
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(m.shape[0]))
        ax.set_xticks(range(m.shape[1]))
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        written.append(os.path.join(out_dir, name))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
