#!/usr/bin/env python
"""Run pretrain_vqmoe.py over a grid (routers x seeds x override sets) and summarise it over seeds.

    python tools/sweep.py --preset seeds --out runs/sweep_seeds -- --data-file ../shared/data/warpeace.txt
    python tools/sweep.py --preset table1 --out runs/table1 --seeds 1 2 3 --set train-iters=1000 \\
        --launcher torchrun --nproc 2 --parallel 1 -- --data-file data/enwik8/train.txt

A preset (``--preset``, listed below) names the routers, the seeds, the driver flags every run gets and the
override sets (e.g. model sizes) the grid runs over; every part of it can be replaced: ``--routers``,
``--seeds``, ``--set FLAG=VALUE`` (a driver flag for every run, over the preset's value wherever the preset sets
it), ``--vary FLAG=V1,V2,...`` (the override sets become the product of the given values) and driver flags
after ``--`` (the same as ``--set``).  Flags are the driver's (``python pretrain_vqmoe.py --help``), written
without the leading dashes in ``--set``/``--vary``; booleans as ``FLAG=true|false``.

Each run is one ``pretrain_vqmoe.py`` process group started by ``--launcher`` (``none``: one plain process with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set) with ``--nproc`` ranks; ``--parallel N`` runs N of them at once.
A run lives in ``OUT/<router>[_<override set>]_s<seed>/`` (the driver's --out-dir) and logs to
``OUT/<run>.log``.  The sweep is resumable: a run with ``results.json`` is skipped; a run with a checkpoint
(``checkpoints/latest``) restarts from it with ``--load``; any other started run starts again from scratch.
SIGINT/SIGTERM stop the sweep: every live run saves its step (the driver's pre-emption) and exits.

Before any run starts, the full command line of every run is parsed by the driver's own parser and its task
built in this process, so a bad flag or value fails at once (one ``error:`` line, exit status 2); so does an
OUT folder whose ``sweep.json`` records another grid.

Outputs, rewritten after every sweep over the finished runs: ``OUT/sweep.csv`` (one row per run),
``OUT/sweep.md`` (mean +- std over seeds per router and override set; the difference from ``--baseline``
paired by seed with a 95% Student t interval), ``OUT/valid_curve.png`` (validation loss against step: mean and
min-max band over seeds) and ``OUT/test_bpc.png`` (test BPC, mean +- std over seeds).  Exit status: 0 every run
finished, 1 some run failed (see its log; rerunning retries it), 2 bad input, 130 stopped by a signal.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import difflib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))

from vqmoe_ds.analysis.sweep_stats import by_seed, paired_difference, summarize  # noqa: E402
from vqmoe_ds.moe.config import ROUTERS  # noqa: E402
from vqmoe_ds.training.launch import (DRIVER, bin_path, env_for_ranks, free_port, remove_new_shm,  # noqa: E402
                                      shm_files, torchrun_cmd)

CPU_CFG = os.path.join(ROOT, "ds_configs", "cpu_fp32.json")
LAUNCHERS = ("torchrun", "deepspeed", "mpirun", "none")
# driver flags the sweep sets itself (canonical names), and how
OWNED = {"out-dir": "as OUT/<run>", "seed": "from --seeds", "router": "from --routers",
         "load": "to resume a run from its checkpoint", "save": "to OUT/<run>/checkpoints, where a resume looks",
         "progress": "off (runs log to OUT/<run>.log)", "local_rank": "through the launcher",
         "distributed-port": "to a free port per run"}
LEVEL = 0.95


class SweepError(ValueError):
    """A bad sweep setting; the message is one line naming the problem and the fix."""


# ---- presets (data) ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scaled:
    """A flag value derived from another flag of the same run: ``max(minimum, round(value(flag) x factor))``."""
    flag: str
    factor: float
    minimum: int = 0

    def resolve(self, flags: Mapping[str, Any]) -> int:
        try:
            base = float(flags[self.flag])
        except (KeyError, TypeError, ValueError):
            raise SweepError(f"--{self.flag} {flags.get(self.flag)!r} is not a number, and another setting is "
                             f"{self.factor:g} x it: give --set {self.flag}=N") from None
        return max(self.minimum, int(round(base * self.factor)))

    def __str__(self) -> str:
        return f"{self.factor:g} x --{self.flag}"


@dataclass(frozen=True)
class Group:
    """One override set of a preset: driver flags on top of the preset's, and per-router flags on top of those."""
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
    arms: Mapping[str, Tuple[str, Mapping[str, Any]]] = field(default_factory=dict)  # name -> (--router, its flags)


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
ROBUSTNESS_CPU = {**TINY_CPU, "train-iters": 1500, "eval-interval": 100, "eval-iters": 0, "log-interval": 50,
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
# the authors' choices that differ from ours, one at a time on VQMoE top-1, then all together: their balance loss is
# never applied (its gate's flag is never set), their codebook is L2, and their discrete expert reads
# LayerNorm(0.95 x + 0.05 (q - x).detach()), i.e. nearly the token itself
PAPER_DIFF_ARMS = {
    "vqmoe-k1": PAPER_ARMS["vqmoe-k1"],
    "vqmoe-k1-nobal": ("vqmoe", {"top-k": 1, "balance-loss-coef": 0.0}),
    "vqmoe-k1-l2": ("vqmoe", {"top-k": 1, "vq-distance": "l2"}),
    "vqmoe-k1-xin": ("vqmoe", {"top-k": 1, "discrete-input": "token"}),
    "vqmoe-k1-authors": ("vqmoe", {"top-k": 1, "balance-loss-coef": 0.0, "vq-distance": "l2",
                                   "discrete-input": "token"}),
    "topk-k2-nobal": ("topk", {"top-k": 2, "balance-loss-coef": 0.0}),
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
        tuple(PAPER_ARMS), (1, 2, 3), PAPER_CPU, arms=PAPER_ARMS),
    "paper_diffs": Preset(
        "the paper preset's VQMoE with the authors' choices where ours differ (no balance loss, L2 codebook, the "
        "token as the discrete expert's input), and top-2 SMoE without the balance loss",
        tuple(PAPER_DIFF_ARMS), (1, 2, 3), PAPER_CPU, arms=PAPER_DIFF_ARMS),
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


# ---- the driver's flags ----------------------------------------------------------------------------------------
class DriverFlags:
    """The driver's command line as the sweep uses it: every spelling of a flag mapped to one canonical name
    (the field's first flag without dashes, e.g. ``topk`` -> ``top-k``), which flags are booleans, and a run's
    flags as a command line."""

    def __init__(self):
        from vqmoe_ds.training.lm import command_line

        self.cmd = command_line()
        self.fields = self.cmd.all_flags()  # every value spelling of a field -> its FieldSpec
        self.actions = self.cmd.parser()._option_string_actions  # every option string (--no-x, aliases, --config)

    def _unknown(self, opt: str, where: str) -> SweepError:
        close = difflib.get_close_matches(opt, [o for o in self.actions if o.startswith("--")], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return SweepError(f"{where}: pretrain_vqmoe.py has no flag {opt}{hint}: see python pretrain_vqmoe.py --help")

    def is_bool(self, key: str) -> bool:
        spec = self.fields.get("--" + key)
        return spec is not None and spec.type is bool

    def _owned(self, key: str, where: str) -> str:
        if key in OWNED:
            raise SweepError(f"{where}: the sweep sets --{key} itself ({OWNED[key]}): remove it")
        return key

    def setting(self, text: str, where: str = "--set") -> Tuple[str, Any]:
        """``FLAG=VALUE`` (FLAG with or without dashes, any spelling) as (canonical name, value)."""
        if "=" not in text:
            raise SweepError(f"{where} {text!r} is not FLAG=VALUE: write it like train-iters=1000")
        key, value = text.split("=", 1)
        opt = "--" + key.lstrip("-")
        if opt in self.fields:
            spec = self.fields[opt]
            canon = self._owned(spec.flag[2:], f"{where} {text}")
            if spec.type is bool:
                low = value.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise SweepError(f"{where} {text}: {spec.flag} is a boolean: write {canon}=true or {canon}=false")
                return canon, low in ("true", "1", "yes", "on")
            return canon, value
        action = self.actions.get(opt)
        if action is None:
            raise self._unknown(opt, f"{where} {text}")
        spec = getattr(action, "spec", None)
        if action.nargs == 0 and spec is not None:  # --no-x, or an alias that sets a value
            raise SweepError(f"{where} {text}: {opt} takes no value: write the setting as {spec.flag[2:]}=true or "
                             f"{spec.flag[2:]}=false")
        if action.nargs == 0:
            raise SweepError(f"{where} {text}: {opt} is not a setting of a run: remove it")
        return self._owned(opt[2:], f"{where} {text}"), value

    def fold(self, tokens: Sequence[str]) -> Dict[str, Any]:
        """Driver flags given after ``--`` as {canonical name: value} (later ones win, as in the driver)."""
        out: Dict[str, Any] = {}
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if not tok.startswith("--"):
                raise SweepError(f"driver argument {tok!r} after -- is not a flag: give driver flags as --flag VALUE")
            opt, sep, inline = tok.partition("=")
            inline = inline if sep else None
            action = self.actions.get(opt)
            if action is None:
                raise self._unknown(opt, "after --")
            spec = getattr(action, "spec", None)
            if action.nargs == 0:
                if spec is None:
                    raise SweepError(f"after --: {opt} is not a setting of a run: remove it")
                if inline is not None:
                    raise SweepError(f"after --: {opt} takes no value: give {opt} alone")
                key = self._owned(spec.flag[2:], f"after -- {tok}")
                out[key] = spec.consts[opt] if opt in spec.consts else not opt.startswith("--no-")
                i += 1
                continue
            if inline is None:
                if i + 1 >= len(tokens):
                    raise SweepError(f"after --: {opt} needs a value: give {opt} VALUE")
                inline, i = tokens[i + 1], i + 1
            key = self._owned(spec.flag[2:] if spec is not None else opt[2:], f"after -- {opt}")
            out[key] = inline
            i += 1
        return out

    def argv(self, flags: Mapping[str, Any]) -> List[str]:
        out: List[str] = []
        for key, value in flags.items():
            if self.is_bool(key):
                out.append(f"--{key}" if _truth(value) else f"--no-{key}")
            else:
                out += [f"--{key}", "none" if value is None else _text(value)]
        return out


def _truth(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes", "on")


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# ---- the grid ------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    name: str  # folder under OUT
    router: str
    seed: int
    group: str  # the override set's name ("" when the grid has one unnamed set)
    overrides: Dict[str, str]  # the flags this run has beyond the common ones (override set and router flags)
    argv: List[str]  # driver flags without --out-dir, --load, --no-progress


@dataclass
class Grid:
    preset: str
    routers: List[str]
    seeds: List[int]
    groups: List[str]
    common: List[str]  # the driver flags every run has, as a command line
    runs: List[RunSpec]
    nproc: int

    def identity(self) -> Dict[str, Any]:
        """What makes two sweeps the same grid (stored in OUT/sweep.json)."""
        return {"preset": self.preset, "nproc": self.nproc,
                "runs": [{"name": r.name, "router": r.router, "seed": r.seed, "group": r.group, "argv": r.argv}
                         for r in self.runs]}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def _vary_groups(vary: Sequence[str], flags: DriverFlags) -> Tuple[Group, ...]:
    axes = []
    for item in vary:
        key, values = flags.setting(item, "--vary")
        vals = [v for v in str(values).split(",") if v != ""] if not isinstance(values, bool) else [values]
        if not vals:
            raise SweepError(f"--vary {item}: no values: write it like codebook-size=8,16,32")
        if any(k == key for k, _ in axes):
            raise SweepError(f"--vary {key} given twice: give all its values in one --vary {key}=V1,V2")
        if flags.is_bool(key):
            vals = [flags.setting(f"{key}={v}", "--vary")[1] for v in vals]
        axes.append((key, vals))
    groups = []
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in axes]):
        name = "_".join(_safe(f"{k}{str(v).lower() if isinstance(v, bool) else v}") for k, v in combo)
        groups.append(Group(name, dict(combo)))
    return tuple(groups)


def build_grid(preset: str, routers: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
               sets: Sequence[str] = (), vary: Sequence[str] = (), extra: Sequence[str] = (), nproc: int = 1,
               flags: Optional[DriverFlags] = None, only_groups: Sequence[str] = ()) -> Grid:
    """The runs of ``preset`` with the command line's replacements, in order seed, override set, router (so that
    a sweep stopped early has complete seeds)."""
    if preset not in PRESETS:
        raise SweepError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    flags = flags or DriverFlags()
    routers = list(routers) if routers else list(p.routers)
    for r in routers:
        if r not in ROUTERS and r not in p.arms:
            raise SweepError(f"unknown router {r!r}: choose among {', '.join([*p.arms, *ROUTERS])}")
    if len(set(routers)) != len(routers):
        raise SweepError(f"--routers {' '.join(routers)} names a router twice: give each once")
    seeds = list(seeds) if seeds else list(p.seeds)
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {' '.join(map(str, seeds))}: give distinct seeds >= 0")
    user: Dict[str, Any] = {}
    for item in sets:
        key, value = flags.setting(item)
        user[key] = value
    user.update(flags.fold(extra))
    groups = _vary_groups(vary, flags) if vary else p.groups
    if only_groups:
        names = [g.name for g in groups]
        unknown = [n for n in only_groups if n not in names]
        if unknown:
            raise SweepError(f"--groups {' '.join(unknown)}: no such override set: choose among {', '.join(names)}")
        groups = tuple(g for g in groups if g.name in only_groups)
    if len({g.name for g in groups}) != len(groups):
        raise SweepError("two override sets have the same name: give distinct values to --vary")
    resolved_runs = []
    for seed in seeds:
        for g in groups:
            for router in routers:
                merged = {**p.flags, **g.flags, **p.arms.get(router, (router, {}))[1],
                          **p.router_flags.get(router, {}), **g.router_flags.get(router, {}), **user}
                resolved = {k: v.resolve(merged) if isinstance(v, Scaled) else v for k, v in merged.items()}
                interval = resolved.get("save-interval")
                try:
                    ok = int(str(interval)) > 0
                except ValueError:
                    ok = False
                if not ok:
                    raise SweepError(f"--save-interval {interval}: a stopped run would have no checkpoint to restart "
                                     f"from: give --set save-interval=N with N > 0")
                resolved_runs.append((seed, g, router, {k: _shown(flags, k, v) for k, v in resolved.items()},
                                      resolved))
    # common: the flags with one value in every run; a run's overrides: the rest of its flags
    first = resolved_runs[0][3]
    common = {k: v for k, v in first.items() if all(r[3].get(k) == v for r in resolved_runs)}
    common_argv = flags.argv({k: resolved_runs[0][4][k] for k in common})
    runs = []
    for seed, g, router, shown, resolved in resolved_runs:
        name = "_".join(x for x in (_safe(router), g.name, f"s{seed}") if x)
        runs.append(RunSpec(name, router, seed, g.name, {k: v for k, v in shown.items() if k not in common},
                            ["--router", p.arms.get(router, (router, {}))[0], "--seed", str(seed),
                             *flags.argv(resolved)]))
    return Grid(preset, routers, seeds, [g.name for g in groups], common_argv, runs, nproc)


def _shown(flags: DriverFlags, key: str, value) -> str:
    if flags.is_bool(key):
        return "true" if _truth(value) else "false"
    return "none" if value is None else _text(value)


def check_grid(grid: Grid, out: str, launcher: str, flags: DriverFlags) -> None:
    """Parse every run's whole command line with the driver's parser and build its task, as the driver will
    (bad flags, values, ds_config, data files; the expert-parallel size against --nproc)."""
    import torch

    from vqmoe_ds.data.errors import require_file
    from vqmoe_ds.training.config import check_world, resolve_ds_config
    from vqmoe_ds.training.lm import make_task
    from vqmoe_ds.training.loop import INPUT_ERRORS

    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
    for spec in grid.runs:
        argv = driver_argv(spec, out)
        try:
            task = make_task(flags.cmd.parse(argv))
            check_world(task.ep_size, task.is_moe, grid.nproc)
            resolve_ds_config(task.optim, task.parallel, grid.nproc, on_cpu, task.default_micro_batch)
            if task.data.data_file:
                require_file(task.data.data_file, "--data-file", "give a text file (it is read as bytes)")
            if task.data.data_path:
                for suffix in (".tokenizer.json", ".train.bin", ".train.idx", ".valid.bin", ".valid.idx",
                               ".test.bin", ".test.idx"):
                    require_file(task.data.data_path + suffix, "--data-path file",
                                 "give the prefix written by tools/preprocess_data.py")
        except INPUT_ERRORS as e:
            raise SweepError(f"run {spec.name}: {e}") from None
    need = {"torchrun": bin_path("torchrun"), "deepspeed": bin_path("deepspeed"), "mpirun": "mpirun"}.get(launcher)
    if need and not (os.path.isfile(need) or shutil.which(need)):
        raise SweepError(f"--launcher {launcher}: {need} is not installed"
                         + (" (scripts/install.sh adds Open MPI)" if launcher == "mpirun" else "")
                         + ": install it or choose another --launcher")


def check_out(grid: Grid, out: str) -> None:
    """OUT holds no sweep, or a sweep of this very grid."""
    path = os.path.join(out, "sweep.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            stored = json.load(f)["grid"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SweepError(f"{path} is not a sweep record: give another --out folder, or remove the file") from None
    now = grid.identity()
    if stored == now:
        return
    if stored.get("preset") != now["preset"]:
        diff = f"preset {stored.get('preset')}, this one {now['preset']}"
    elif stored.get("nproc") != now["nproc"]:
        diff = f"--nproc {stored.get('nproc')}, this one {now['nproc']}"
    else:
        old = {r["name"]: r for r in stored.get("runs", [])}
        new = {r["name"]: r for r in now["runs"]}
        if set(old) != set(new):
            gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
            diff = "; ".join(x for x in ((f"runs {' '.join(gone[:3])} not in this one" if gone else ""),
                                         (f"runs {' '.join(added[:3])} not in it" if added else "")) if x)
        else:
            name = next((n for n in new if old[n] != new[n]), next(iter(new)))
            a, b = old[name]["argv"], new[name]["argv"]
            diff = (f"run {name} had `{' '.join(t for t in a if t not in b) or '-'}` where this one has "
                    f"`{' '.join(t for t in b if t not in a) or '-'}`")
    raise SweepError(f"{out} holds a sweep of another grid (that sweep: {diff}): give a new --out folder, or the "
                     f"settings stored in {path}")


# ---- running -------------------------------------------------------------------------------------------------
def run_dir(out: str, spec: RunSpec) -> str:
    return os.path.join(out, spec.name)


def finished(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "results.json"))


def resumable(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "checkpoints", "latest"))


def driver_argv(spec: RunSpec, out: str) -> List[str]:
    """The run's full driver command line: ``--load`` when it has a checkpoint to restart from."""
    path = run_dir(out, spec)
    resume = ["--load", os.path.join(path, "checkpoints")] if resumable(path) and not finished(path) else []
    return [*spec.argv, "--out-dir", path, "--no-progress", *resume]


def launch_cmd(launcher: str, nproc: int, args: List[str], port: int) -> Tuple[List[str], Dict[str, str]]:
    """(command, extra environment) of one run under ``launcher``."""
    if launcher == "none":
        return [sys.executable, DRIVER, *args], {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                                 "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                                 "MASTER_PORT": str(port)}
    if launcher == "torchrun":
        return torchrun_cmd(nproc, args, port), {}
    if launcher == "deepspeed":
        return [bin_path("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), DRIVER, *args], {}
    cmd = ["mpirun", "-np", str(nproc), "--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for var in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "PYTHONPATH", "OMP_NUM_THREADS", "TMPDIR",
                "PYTHONUNBUFFERED"):  # the ranks' environment (Runner.env sets all but DS_ACCELERATOR)
        if var != "DS_ACCELERATOR" or var in os.environ:
            cmd += ["-x", var]
    return [*cmd, sys.executable, DRIVER, *args, "--distributed-port", str(port)], {}


@dataclass
class Outcome:
    name: str
    status: str  # "skipped" (finished before), "done", "failed", "stopped"
    seconds: float = 0.0
    code: Optional[int] = None


class Runner:
    """Runs the grid's unfinished runs, ``parallel`` at a time, each as its own process group (so that a stop
    reaches every rank of it and nothing else)."""

    def __init__(self, out: str, launcher: str, nproc: int, parallel: int, cwd: str):
        self.out, self.launcher, self.nproc, self.parallel, self.cwd = out, launcher, nproc, parallel, cwd
        self.threads = max(1, (os.cpu_count() or 1) // (parallel * nproc))
        self.live: Dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def env(self, tmp: str, extra: Mapping[str, str]) -> Dict[str, str]:
        env = env_for_ranks(tmp, self.threads)
        if "DS_ACCELERATOR" not in os.environ:  # let DeepSpeed pick the accelerator of this machine
            env.pop("DS_ACCELERATOR", None)
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        env.update(extra)
        return env

    def run(self, spec: RunSpec) -> Outcome:
        path = run_dir(self.out, spec)
        if finished(path):
            return Outcome(spec.name, "skipped")
        with self.lock:
            if self.stopping:
                return Outcome(spec.name, "stopped")
        resume = resumable(path)
        if not resume and os.path.isdir(path):  # started before, nothing to restart from: start again
            shutil.rmtree(path)
        os.makedirs(path, exist_ok=True)
        args = driver_argv(spec, self.out)
        tmp = tempfile.mkdtemp(prefix="vqmoe_sweep_")
        cmd, extra = launch_cmd(self.launcher, self.nproc, args, free_port())
        before = shm_files() if self.parallel == 1 else None
        start = time.time()
        print(f"{spec.name}: {'resuming from its checkpoint' if resume else 'starting'}", flush=True)
        try:
            with open(os.path.join(self.out, spec.name + ".log"), "a") as log:
                with self.lock:
                    if self.stopping:
                        return Outcome(spec.name, "stopped")
                    log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')} "
                              f"{'resume' if resume else 'start'}: {shlex.join(cmd)}\n")
                    log.flush()
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(tmp, extra),
                                            cwd=self.cwd, start_new_session=True)
                    self.live[spec.name] = proc
                code = proc.wait()
                with self.lock:
                    self.live.pop(spec.name, None)
                seconds = time.time() - start
                log.write(f"# exit status {code} after {seconds:.1f} s\n")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if before is not None:
                remove_new_shm(before)
        with open(os.path.join(path, "sweep_attempts.jsonl"), "a") as f:
            f.write(json.dumps({"start": start, "seconds": seconds, "exit_status": code, "resumed": resume}) + "\n")
        status = "done" if finished(path) else ("stopped" if self.stopping else "failed")
        print(f"{spec.name}: {status} after {seconds:.1f} s" + (f" (exit status {code}; see {spec.name}.log)"
                                                                 if status == "failed" else ""), flush=True)
        return Outcome(spec.name, status, seconds, code)

    def stop(self) -> None:
        """Ask every live run to stop: SIGTERM to its process group (the driver saves its step and exits)."""
        with self.lock:
            self.stopping = True
            procs = list(self.live.values())
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def run_all(self, runs: Sequence[RunSpec]) -> Tuple[List[Outcome], bool]:
        """(outcomes, stopped by a signal)."""
        outcomes: List[Outcome] = []
        shm_before = shm_files() if self.parallel > 1 else None
        pool = ThreadPoolExecutor(max_workers=self.parallel)
        futures = [pool.submit(self.run, spec) for spec in runs]
        interrupted = False
        try:
            pending = set(futures)
            while pending:
                try:
                    _, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    if not interrupted:
                        interrupted = True
                        print("stopping: every live run saves its step; rerun the same command to resume",
                              flush=True)
                    self.stop()
        finally:
            pool.shutdown(wait=True)
            if shm_before is not None:
                remove_new_shm(shm_before)
        for fut in futures:
            outcomes.append(fut.result())
        return outcomes, interrupted


# ---- reading runs back ---------------------------------------------------------------------------------------
def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def valid_curve(path: str) -> List[Tuple[int, float]]:
    """(step, validation loss) of a run's log.jsonl; a step logged twice (a resumed run) keeps its last record."""
    by_step: Dict[int, float] = {}
    try:
        with open(os.path.join(path, "log.jsonl")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a killed run
                if rec.get("kind") == "valid" and isinstance(rec.get("loss"), (int, float)):
                    by_step[int(rec["step"])] = float(rec["loss"])
    except OSError:
        pass
    return sorted(by_step.items())


def _valid_bpc(path: str, best_loss: float) -> float:
    """BPC of the validation record with the best loss (loss / ln 2 when the log has no such record)."""
    best = None
    try:
        with open(os.path.join(path, "log.jsonl")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("kind") == "valid" and isinstance(rec.get("bpc"), (int, float)):
                    if best is None or abs(rec["loss"] - best_loss) < abs(best["loss"] - best_loss):
                        best = rec
    except OSError:
        pass
    if best is not None and abs(best["loss"] - best_loss) <= 1e-9 * max(1.0, abs(best_loss)):
        return float(best["bpc"])
    return best_loss / math.log(2)


CSV_FIELDS = ("run", "router", "group", "seed", "overrides", "status", "best_valid_loss", "best_valid_bpc",
              "test_loss", "test_bpc", "test_ppl", "steps", "wall_s", "params_total", "params_active")


def collect(grid: Grid, out: str) -> List[Dict[str, Any]]:
    """One row per run of the grid (the CSV's fields; NaN where a run has no result yet)."""
    nan = float("nan")
    rows = []
    for spec in grid.runs:
        path = run_dir(out, spec)
        res = _read_json(os.path.join(path, "results.json"))
        info = _read_json(os.path.join(path, "run_info.json")) or {}
        attempts = []
        try:
            with open(os.path.join(path, "sweep_attempts.jsonl")) as f:
                attempts = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError):
            pass
        seconds = sum(a.get("seconds", 0.0) for a in attempts)
        # a run without results: its last attempt failed, stopped (exit 0 after a signal), or was killed
        state = ("not started" if not os.path.isdir(path) else "started" if not attempts else
                 "stopped" if attempts[-1].get("exit_status") == 0 else "failed")
        row: Dict[str, Any] = {
            "run": spec.name, "router": spec.router, "group": spec.group, "seed": spec.seed,
            "overrides": " ".join(f"{k}={v}" for k, v in spec.overrides.items()),
            "status": "done" if res else state,
            "best_valid_loss": nan, "best_valid_bpc": nan, "test_loss": nan, "test_bpc": nan, "test_ppl": nan,
            "steps": None, "wall_s": round(seconds, 1) if seconds else None,
            "params_total": info.get("params", {}).get("total"), "params_active": info.get("params", {}).get("active")}
        if res:
            best = float(res.get("best_valid", {}).get("loss", nan))
            test = res.get("test", {})
            row.update(best_valid_loss=best, best_valid_bpc=_valid_bpc(path, best) if math.isfinite(best) else nan,
                       test_loss=float(test.get("loss", nan)), test_bpc=float(test.get("bpc", nan)),
                       test_ppl=float(test.get("ppl", nan)), steps=res.get("steps"))
        row["curve"] = valid_curve(path)
        rows.append(row)
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None or (isinstance(r[k], float) and not math.isfinite(r[k])) else r[k])
                        for k in CSV_FIELDS})


# ---- the report ------------------------------------------------------------------------------------------------
def _ms(values: Sequence[float], digits: int) -> str:
    s = summarize(values)
    if s.n == 0:
        return "–"
    return f"{s.mean:.{digits}f}" if s.n < 2 else f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _iv(d) -> str:
    if d.n == 0:
        return "–"
    if d.n < 2:
        return f"{d.mean:+.4f} (n = 1)"
    return f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"


def _params(rows: Sequence[Mapping[str, Any]]) -> str:
    for r in rows:
        if r.get("params_total"):
            return f"{r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M"
    return "–"


def report(grid: Grid, rows: Sequence[Mapping[str, Any]], baseline: str, launcher: str) -> str:
    """sweep.md: per router (x override set) mean ± std over seeds, then paired differences from ``baseline``."""
    done = [r for r in rows if r["status"] == "done"]
    named = any(grid.groups)
    lines = [f"# Sweep `{grid.preset}`", "",
             f"{PRESETS[grid.preset].description}.", "",
             f"{len(done)} of {len(rows)} runs finished: routers {', '.join(grid.routers)}; seeds "
             f"{', '.join(map(str, grid.seeds))}"
             + (f"; override sets {', '.join(grid.groups)}" if named else "")
             + f"; {grid.nproc} rank(s) per run ({launcher}).", "",
             f"Flags of every run: `{shlex.join(grid.common)}`.", ""]
    specific = sorted({f"{r['router']}{' ' + r['group'] if r['group'] else ''}: `{r['overrides']}`"
                       for r in rows if r["overrides"]})
    if specific:
        lines += ["Per run on top of those: " + "; ".join(specific) + ".", ""]
    lines += ["BPC: bits per character (per byte for byte-level data) of the validation split at the best "
              "validation step and of the test split on that checkpoint; PPL: test perplexity per token. "
              "Mean ± sample standard deviation over seeds; n: finished seeds.", "",
              "## Per router" + (" and override set" if named else ""), "",
              "| router |" + (" set |" if named else "") + " n | best valid BPC | test BPC | test PPL | params total / "
              "active |",
              "|---|" + ("---|" if named else "") + "---|---|---|---|---|"]
    cells = [(g, r) for g in grid.groups for r in grid.routers]
    for g, router in cells:
        sel = [x for x in done if x["router"] == router and x["group"] == g]
        lines.append(f"| {router} |" + (f" {g} |" if named else "") + f" {len(sel)} | "
                     f"{_ms([x['best_valid_bpc'] for x in sel], 4)} | {_ms([x['test_bpc'] for x in sel], 4)} | "
                     f"{_ms([x['test_ppl'] for x in sel], 3)} | {_params(sel)} |")
    others = [r for r in grid.routers if r != baseline]
    if others:
        lines += ["", f"## Difference from {baseline} (paired by seed, Student t interval)", "",
                  f"Δ = router − {baseline} at the same seed (and override set), averaged over the seeds both "
                  f"finished; in brackets the {LEVEL:.0%} interval mean ± t({(1 + LEVEL) / 2:g}, n − 1) · s / √n "
                  f"of Student's t distribution, s the standard deviation of the paired differences. Δ < 0: lower "
                  f"BPC than {baseline}.", "",
                  "| router |" + (" set |" if named else "") + f" n pairs | Δ best valid BPC [{LEVEL:.0%} CI] | "
                  f"Δ test BPC [{LEVEL:.0%} CI] | note |",
                  "|---|" + ("---|" if named else "") + "---|---|---|---|"]
        for g in grid.groups:
            base = [x for x in done if x["router"] == baseline and x["group"] == g]
            for router in others:
                sel = [x for x in done if x["router"] == router and x["group"] == g]
                dv = paired_difference(by_seed(sel, "best_valid_bpc"), by_seed(base, "best_valid_bpc"), LEVEL)
                dt = paired_difference(by_seed(sel, "test_bpc"), by_seed(base, "test_bpc"), LEVEL)
                if dt.n < 2:
                    note = "fewer than 2 pairs: no interval"
                else:
                    zero = [what for what, d in (("valid", dv), ("test", dt)) if d.contains_zero]
                    note = (f"the {' and '.join(zero)} interval{'s contain' if len(zero) > 1 else ' contains'} 0: "
                            f"no difference shown at {LEVEL:.0%}" if zero else "")
                lines.append(f"| {router} |" + (f" {g} |" if named else "") + f" {dt.n} | {_iv(dv)} | {_iv(dt)} | "
                             f"{note} |")
    missing = [r for r in rows if r["status"] != "done"]
    if missing:
        lines += ["", "Not finished (rerun the sweep to resume them): "
                  + ", ".join(f"{r['run']} ({r['status']}, log {r['run']}.log)" for r in missing) + "."]
    return "\n".join(lines) + "\n"


def plots(grid: Grid, rows: Sequence[Mapping[str, Any]], out: str) -> List[str]:
    """valid_curve.png (mean and min-max band over seeds per router; one panel per override set) and
    test_bpc.png (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    curves = [r for r in rows if r["curve"]]
    if curves:
        n = len(grid.groups)
        cols = min(n, 3)
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6 * cols, 4 * ((n + cols - 1) // cols)),
                                 squeeze=False)
        for ax, g in zip(axes.flat, grid.groups):
            for router in grid.routers:
                sel = [r["curve"] for r in curves if r["router"] == router and r["group"] == g]
                if not sel:
                    continue
                steps = sorted({s for c in sel for s, _ in c})
                vals = [[v for c in sel for s2, v in c if s2 == s] for s in steps]
                mean = np.array([np.mean(v) for v in vals])
                line, = ax.plot(steps, mean, label=f"{router} (n={len(sel)})")
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(),
                                alpha=0.2)
            ax.set_title((f"{g}: " if g else "") + "validation loss, mean and min-max over seeds")
            ax.set_xlabel("step")
            ax.set_ylabel("validation loss (nats / token)")
            ax.grid(alpha=0.3)
            ax.legend()
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.tight_layout()
        written.append(os.path.join(out, "valid_curve.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    done = [r for r in rows if r["status"] == "done" and math.isfinite(r["test_bpc"])]
    if done:
        groups = grid.groups if any(grid.groups) else []
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(grid.routers) * max(1, len(groups)) + 2), 4))
        width = 0.8 / len(grid.routers) if groups else 0.6
        lows, highs = [], []
        for i, router in enumerate(grid.routers):
            stats = [summarize([r["test_bpc"] for r in done if r["router"] == router and r["group"] == g])
                     for g in (groups or [""])]
            x = (np.arange(len(groups)) + (i - (len(grid.routers) - 1) / 2) * width) if groups else np.array([i])
            err = [0.0 if s.n < 2 else s.std for s in stats]
            ax.bar(x, [s.mean for s in stats], width, yerr=err, capsize=3, label=router)
            lows += [s.mean - e for s, e in zip(stats, err) if s.n]
            highs += [s.mean + e for s, e in zip(stats, err) if s.n]
        ticks = groups or grid.routers
        ax.set_xticks(np.arange(len(ticks)))
        ax.set_xticklabels(ticks, rotation=30 if len(ticks) > 5 else 0, ha="right" if len(ticks) > 5 else "center")
        spread = max(highs) - min(lows)
        bottom = max(0.0, min(lows) - max(spread, 0.05 * min(lows)))
        ax.set_ylim(bottom, max(highs) + 0.2 * max(spread, 0.05 * max(highs)))
        ax.set_ylabel("test BPC")
        ax.set_title("test BPC, mean ± std over seeds" + (" (the axis starts above 0)" if bottom > 0 else ""))
        ax.grid(alpha=0.3, axis="y")
        if groups:
            ax.legend()
        fig.tight_layout()
        written.append(os.path.join(out, "test_bpc.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_reports(grid: Grid, out: str, baseline: str, launcher: str) -> List[str]:
    rows = collect(grid, out)
    write_csv(rows, os.path.join(out, "sweep.csv"))
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(report(grid, rows, baseline, launcher))
    return [os.path.join(out, "sweep.csv"), os.path.join(out, "sweep.md"), *plots(grid, rows, out)]


# ---- the command line ------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise SweepError(f"{message} (see tools/sweep.py --help)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    epilog = "presets:\n" + "\n".join(
        f"  {name:14} {p.description}\n  {'':14} routers {' '.join(p.routers)}; seeds {' '.join(map(str, p.seeds))}"
        + (f"; override sets {' '.join(g.name for g in p.groups)}" if any(g.name for g in p.groups) else "")
        for name, p in PRESETS.items())
    p = _Parser(prog="tools/sweep.py", description=__doc__, epilog=epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--preset", required=True, help="the experiment: " + ", ".join(PRESETS))
    p.add_argument("--out", required=True, help="the sweep's folder (runs, logs, sweep.csv/.md/.json, plots)")
    p.add_argument("--routers", nargs="+", help="replace the preset's routers (names of --router)")
    p.add_argument("--seeds", nargs="+", type=int, help="replace the preset's seeds (--seed of each run)")
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="FLAG=VALUE",
                   help="a driver flag for every run, over the preset's value")
    p.add_argument("--vary", nargs="+", action="extend", default=[], metavar="FLAG=V1,V2",
                   help="replace the preset's override sets by the product of these values")
    p.add_argument("--groups", nargs="+", help="run only these override sets of the preset (or of --vary)")
    p.add_argument("--launcher", default="torchrun", help=f"one of {', '.join(LAUNCHERS)} (default torchrun)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (default 1)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--baseline", help="the router the others are compared with (default: topk when swept, else "
                   "the first router)")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the runs' commands; run nothing")
    args = p.parse_args(argv)
    args.extra = extra
    if args.launcher not in LAUNCHERS:
        raise SweepError(f"--launcher {args.launcher}: choose one of {', '.join(LAUNCHERS)}")
    if args.nproc < 1 or args.parallel < 1:
        raise SweepError(f"--nproc {args.nproc}, --parallel {args.parallel}: both must be >= 1")
    if args.launcher == "none" and args.nproc != 1:
        raise SweepError(f"--launcher none starts one process, --nproc is {args.nproc}: use --launcher torchrun "
                         f"(or deepspeed, mpirun) for several ranks")
    return args


def sweep(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    flags = DriverFlags()
    grid = build_grid(args.preset, args.routers, args.seeds, args.sets, args.vary, args.extra, args.nproc, flags,
                      args.groups or ())
    baseline = args.baseline or ("topk" if "topk" in grid.routers else grid.routers[0])
    if baseline not in grid.routers:
        raise SweepError(f"--baseline {baseline} is not among the routers ({', '.join(grid.routers)}): choose one "
                         f"of them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SweepError(f"--out {args.out} is a file: give a folder")
    check_out(grid, out)
    check_grid(grid, out, args.launcher, flags)
    if args.dry_run:
        for spec in grid.runs:
            state = ("finished" if finished(run_dir(out, spec)) else
                     "resumes" if resumable(run_dir(out, spec)) else "starts")
            cmd = launch_cmd(args.launcher, args.nproc, driver_argv(spec, out), 0)[0]
            print(f"{spec.name} ({state}): {shlex.join(cmd)}")
        return 0
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "sweep.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump({"created": datetime.datetime.now().isoformat(timespec="seconds"),
                       "command": ["tools/sweep.py", *(sys.argv[1:] if args.argv is None else args.argv)],
                       "grid": grid.identity()}, f, indent=1)
    todo = [s for s in grid.runs if not finished(run_dir(out, s))]
    print(f"sweep {grid.preset}: {len(grid.runs)} runs, {len(grid.runs) - len(todo)} finished before, "
          f"{len(todo)} to run ({args.parallel} at a time, {args.launcher}, {args.nproc} rank(s) each) in {out}",
          flush=True)
    runner = Runner(out, args.launcher, args.nproc, args.parallel, os.getcwd())
    handler_set = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_interrupt) if handler_set else None
    try:
        outcomes, interrupted = runner.run_all(todo)
    finally:
        if handler_set:
            signal.signal(signal.SIGTERM, old)
    for p in write_reports(grid, out, baseline, args.launcher):
        print(f"wrote {p}", flush=True)
    if interrupted:
        left = sum(not finished(run_dir(out, s)) for s in grid.runs)
        print(f"error: stopped by a signal: rerun the same command to resume the {left} unfinished runs",
              file=sys.stderr, flush=True)
        return 130
    failed = [o for o in outcomes if o.status != "done"]
    if failed:
        print(f"error: {len(failed)} of {len(todo)} runs failed ({', '.join(o.name for o in failed[:4])}"
              f"{', ...' if len(failed) > 4 else ''}): see {out}/<run>.log, then rerun the same command to retry them",
              file=sys.stderr, flush=True)
        return 1
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    from vqmoe_ds.training.launch import run_tool
    from vqmoe_ds.training.loop import INPUT_ERRORS

    status = {"code": 0}

    def body(argv):
        args = parse_args(argv)
        args.argv = None if argv is None else list(argv)
        status["code"] = sweep(args)

    return run_tool(body, argv, (SweepError, *INPUT_ERRORS)) or status["code"]


if __name__ == "__main__":
    sys.exit(main())
