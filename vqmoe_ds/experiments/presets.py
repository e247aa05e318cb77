"""The experiments as data: each preset names its arms (a router and its settings), the seeds, the driver settings
every run gets and the override sets (e.g. model sizes) the grid runs over.

Settings are written with the driver's flag names without the dashes (``train-iters``, ``top-k``); a value is
the Python value the flag's field holds, or a `Scaled` value derived from another setting of the same run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Tuple

from ..moe.config import ROUTERS
from ..training.launch import ROOT

CPU_CFG = os.path.join(ROOT, "ds_configs", "cpu_fp32.json")


class SweepError(ValueError):
    """A bad sweep setting; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class Scaled:
    """A setting derived from another setting of the same run: ``max(minimum, round(value(flag) x factor))``."""
    flag: str
    factor: float
    minimum: int = 0

    def resolve(self, value: Any) -> int:
        try:
            base = float(value)
        except (TypeError, ValueError):
            raise SweepError(f"--{self.flag} {value!r} is not a number, and another setting is {self.factor:g} x "
                             f"it: give --set {self.flag}=N") from None
        return max(self.minimum, int(round(base * self.factor)))

    def __str__(self) -> str:
        return f"{self.factor:g} x --{self.flag}"


@dataclass(frozen=True)
class Group:
    """One override set of a preset: settings on top of the preset's, and per-arm settings on top of those."""
    name: str
    flags: Mapping[str, Any] = field(default_factory=dict)
    router_flags: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    description: str
    routers: Tuple[str, ...]  # the arms: names of --router, or of entries of ``arms``
    seeds: Tuple[int, ...]
    flags: Mapping[str, Any]  # every run
    groups: Tuple[Group, ...] = (Group(""),)
    router_flags: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per arm, every group
    arms: Mapping[str, Tuple[str, Mapping[str, Any]]] = field(default_factory=dict)  # name -> (--router, settings)
    # (arm, reference) pairs of the paired-difference table; empty: every arm against the baseline
    comparisons: Tuple[Tuple[str, str], ...] = ()

    def router_of(self, arm: str) -> str:
        return self.arms[arm][0] if arm in self.arms else arm

    def arm_flags(self, arm: str) -> Mapping[str, Any]:
        return self.arms[arm][1] if arm in self.arms else {}

    def is_arm(self, name: str) -> bool:
        return name in self.arms or name in ROUTERS


# A CPU-sized run of the tiny shape (2 layers, d 64, 4 heads, 4 experts, top-2, codebook 8, context 64), 300 steps
# of 16 x 64 tokens.  Data: the driver's (the synthetic corpus unless `-- --data-file F` or `-- --data-path P`).
TINY_CPU = {
    "config": "tiny", "deepspeed_config": CPU_CFG, "train-iters": 300, "lr": 3e-3,
    "lr-warmup-iters": Scaled("train-iters", 0.05), "micro-batch-size": 16, "eval-interval": 50, "eval-iters": 20,
    "test-iters": 0, "log-interval": 10, "save-interval": 50, "keep-last": 1,
}
# routers with a schedule over training: StableMoE freezes its routing halfway, SMoE-Dropout's k grows over the run
SCHEDULES = {"stablemoe": {"stablemoe-stage1-steps": Scaled("train-iters", 0.5)},
             "smoe_dropout": {"smoe-dropout-k-steps": Scaled("train-iters", 1.0, minimum=1)}}
# Figure 3: (name, --num-layers, --hidden-size, --ffn-hidden-size) of SMoE (top-2, 4 experts) at about 1M-16M
# parameters in all (count_params, byte vocabulary); VQMoE runs with its experts' hidden size halved
ROBUSTNESS_SIZES = (("1M", 3, 128, 256), ("2M", 4, 160, 320), ("4M", 4, 224, 448), ("8M", 6, 256, 512),
                    ("16M", 8, 320, 640))
ROBUSTNESS_CPU = {**TINY_CPU, "train-iters": 1500, "eval-interval": 250, "eval-iters": 0, "log-interval": 50,
                  "save-interval": 500}
# The authors' Transformer-XL scripts (script/table1/transformer_xl/*/enwik8_*.sh) at a CPU size: their 4 layers,
# expert FFN 2 x d, 16 experts, codebook 16, dropout 0.1 (none on attention), ReLU experts, dropless dispatch
# (FastMoE), Adam at lr 3.5e-4 without warm-up on a cosine to 0, clipping 0.25, balance loss 0.01, VQ loss weight
# 0.08 and commitment 0.25; d 128 with 4 heads, segments of 64 bytes with 64 of memory, 16 segments a step.  No
# ds_config file: the driver's default (fp32, torch Adam on the CPU), whose clipping the flag sets.
PAPER_CPU = {
    "config": "tiny", "model": "txl", "num-layers": 4, "hidden-size": 128,
    "num-attention-heads": 4, "ffn-hidden-size": 256, "num-experts": 16, "codebook-size": 16, "seq-length": 64,
    "mem-len": 64, "micro-batch-size": 16, "hidden-dropout": 0.1, "ffn-dropout": 0.1, "attention-dropout": 0.0,
    "moe-activation": "relu", "drop-tokens": False, "lr": 3.5e-4, "min-lr": 0.0, "lr-warmup-iters": 0,
    "clip-grad": 0.25, "balance-loss-coef": 0.01, "vq-alpha": 0.08, "vq-beta": 0.25, "train-iters": 1500,
    "eval-interval": 100, "eval-iters": 0, "test-iters": 0, "log-interval": 50, "save-interval": 500,
    "keep-last": 1,
}
# their VQMoE runs top-1 plus the discrete route (2 expert routes per token); their SMoE baseline is top-2
PAPER_ARMS = {"vqmoe-k1": ("vqmoe", {"top-k": 1}), "topk-k2": ("topk", {"top-k": 2}), "topk-k1": ("topk", {"top-k": 1})}
# the authors' choices that differ from ours, one at a time on VQMoE top-1, then all together: their top-1 gate
# weights its route by a softmax over the one chosen score (weight 1: the router learns nothing from the task),
# their balance loss is never applied (its gate's flag is never set), their codebook is L2, and their discrete
# expert reads LayerNorm(0.95 x + 0.05 (q - x).detach()), i.e. nearly the token itself
PAPER_DIFF_ARMS = {
    "vqmoe-k1": PAPER_ARMS["vqmoe-k1"],
    "vqmoe-k1-w1": ("vqmoe", {"top-k": 1, "moe-router-top1-weight": "one"}),
    "vqmoe-k1-nobal": ("vqmoe", {"top-k": 1, "balance-loss-coef": 0.0}),
    "vqmoe-k1-l2": ("vqmoe", {"top-k": 1, "vq-distance": "l2"}),
    "vqmoe-k1-xin": ("vqmoe", {"top-k": 1, "discrete-input": "token"}),
    "vqmoe-k1-authors": ("vqmoe", {"top-k": 1, "moe-router-top1-weight": "one", "balance-loss-coef": 0.0,
                                   "vq-distance": "l2", "discrete-input": "token"}),
    "topk-k2-nobal": ("topk", {"top-k": 2, "balance-loss-coef": 0.0}),
    "topk-k2": PAPER_ARMS["topk-k2"],
}

PRESETS: Dict[str, Preset] = {
    "table1": Preset(
        "Table 1: every router at the same shape (dense, top-k SMoE, XMoE, StableMoE, SMoE-Dropout, VQMoE, ...)",
        tuple(r for r in ROUTERS if r != "vq"), (1, 2, 3), TINY_CPU, router_flags=SCHEDULES),
    "robustness": Preset(
        "Figure 3: SMoE (top-2) at about 1M, 2M, 4M, 8M, 16M parameters, VQMoE with its experts' hidden size halved",
        ("topk", "vqmoe"), (1, 2, 3), ROBUSTNESS_CPU,
        groups=tuple(Group(name, {"num-layers": n, "hidden-size": d, "ffn-hidden-size": f},
                           {"vqmoe": {"expert-ffn-hidden-size": f // 2}}) for name, n, d, f in ROBUSTNESS_SIZES)),
    "paper": Preset(
        "the authors' Transformer-XL settings at a CPU size: VQMoE top-1 (+ the discrete route) against top-2 SMoE "
        "(the same 2 routes per token) and top-1 SMoE",
        tuple(PAPER_ARMS), (1, 2, 3), PAPER_CPU, arms=PAPER_ARMS,
        comparisons=(("vqmoe-k1", "topk-k2"), ("vqmoe-k1", "topk-k1"), ("topk-k1", "topk-k2"))),
    "paper_diffs": Preset(
        "the paper preset's VQMoE with the authors' choices where ours differ (top-1 weight 1, no balance loss, L2 "
        "codebook, the token as the discrete expert's input), and top-2 SMoE with and without the balance loss",
        tuple(PAPER_DIFF_ARMS), (1, 2, 3), PAPER_CPU, arms=PAPER_DIFF_ARMS,
        comparisons=(("vqmoe-k1-w1", "vqmoe-k1"), ("vqmoe-k1-nobal", "vqmoe-k1"), ("vqmoe-k1-l2", "vqmoe-k1"), ("vqmoe-k1-xin", "vqmoe-k1"),
                     ("vqmoe-k1-authors", "vqmoe-k1"), ("vqmoe-k1-authors", "topk-k2-nobal"),
                     ("vqmoe-k1", "topk-k2-nobal"), ("vqmoe-k1", "topk-k2"), ("vqmoe-k1-xin", "topk-k2"),
                     ("topk-k2-nobal", "topk-k2"))),
    "discrete_only": Preset(
        "Table 4: discrete-only VQMoE (one expert per token by its code) against top-2 SMoE, codebook K = experts "
        "N = 8, 16, 32",
        ("topk", "vqmoe"), (1, 2, 3), TINY_CPU,
        groups=tuple(Group(f"K{k}", {"codebook-size": k, "num-experts": k}) for k in (8, 16, 32)),
        router_flags={"vqmoe": {"vqmoe-mode": "discrete_only"}}),
    "seeds": Preset("Table 7: top-2 SMoE and VQMoE over three seeds", ("topk", "vqmoe"), (1, 2, 3), TINY_CPU),
    "balancing": Preset(
        "load balancing: top-2 SMoE (and VQMoE's continuous path) with the aux loss (coefficient 0.01), with the "
        "aux-loss-free expert bias instead, and with the aux loss plus the router z-loss (0.001)",
        ("topk", "vqmoe"), (1, 2, 3), TINY_CPU,
        groups=(Group("aux", {"balance-loss-coef": 0.01}),
                Group("bias", {"balance-loss-coef": 0.0, "moe-router-enable-expert-bias": True,
                               "moe-router-bias-update-rate": 1e-3}),
                Group("zloss", {"balance-loss-coef": 0.01, "moe-z-loss-coeff": 1e-3}))),
}

__all__ = ["SweepError", "Scaled", "Group", "Preset", "PRESETS", "TINY_CPU", "SCHEDULES", "ROBUSTNESS_SIZES",
           "ROBUSTNESS_CPU", "PAPER_CPU", "PAPER_ARMS", "PAPER_DIFF_ARMS", "CPU_CFG"]
