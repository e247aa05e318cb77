"""The grid of a sweep: every run's settings (preset, override set, arm, the command line's replacements), checked
before anything runs, and written as one YAML config file per run.

A run lives in ``OUT/<arm>[_<override set>]_s<seed>/`` (the driver's --out-dir); its settings are
``OUT/<run>.yaml`` (what ``pretrain_vqmoe.py --config-file`` reads) and its log ``OUT/<run>.log``.
``OUT/sweep.json`` records the grid and the settings every run shares, so a second sweep into the same folder
either is the same grid, or extends it (more seeds, arms or override sets, with the same shared settings and
every run it has in common with the folder set alike: the record becomes the union), or is refused.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .presets import PRESETS, Group, Preset, Scaled, SweepError
from .settings import DriverSettings, as_config_file


@dataclass
class RunSpec:
    name: str  # folder under OUT
    arm: str  # the arm's name (a router, or a preset's named router settings)
    router: str  # --router
    seed: int
    group: str  # the override set's name ("" when the grid has one unnamed set)
    settings: Dict[str, Any]  # config key -> value, everything this run sets (router and seed included)
    overrides: Dict[str, str]  # flag -> value shown, the settings this run has beyond the common ones

    def config(self, out: str) -> Dict[str, Any]:
        """The run's config file: its settings, its folder, no progress bar."""
        return as_config_file({**self.settings, "run.out_dir": run_dir(out, self), "run.progress": False})


@dataclass
class Grid:
    preset: str
    routers: List[str]  # the arms, in order
    seeds: List[int]
    groups: List[str]
    common: Dict[str, str]  # flag -> value shown, the settings every run has
    runs: List[RunSpec]
    nproc: int

    def identity(self) -> Dict[str, Any]:
        """What makes two sweeps the same grid (stored in OUT/sweep.json)."""
        return {"preset": self.preset, "nproc": self.nproc,
                "runs": [{"name": r.name, "arm": r.arm, "router": r.router, "seed": r.seed, "group": r.group,
                          "settings": r.settings} for r in self.runs]}


def run_dir(out: str, spec: RunSpec) -> str:
    return os.path.join(out, spec.name)


def config_path(out: str, spec: RunSpec) -> str:
    return os.path.join(out, spec.name + ".yaml")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


def _vary_groups(vary: Sequence[str], ds: DriverSettings) -> Tuple[Group, ...]:
    axes: List[Tuple[str, str, List[Any]]] = []
    for item in vary:
        if "=" not in item:
            raise SweepError(f"--vary {item!r} is not FLAG=V1,V2: write it like codebook-size=8,16,32")
        name, values = item.split("=", 1)
        key = ds.key(name, f"--vary {item}")
        texts = [v for v in values.split(",") if v != ""]
        if not texts:
            raise SweepError(f"--vary {item}: no values: write it like codebook-size=8,16,32")
        if any(k == key for k, _, _ in axes):
            raise SweepError(f"--vary {name} given twice: give all its values in one --vary {name}=V1,V2")
        axes.append((key, ds.flag_of(key), [ds.value(key, t, f"--vary {item}") for t in texts]))
    groups = []
    for combo in itertools.product(*[[(key, flag, v) for v in vals] for key, flag, vals in axes]):
        gname = "_".join(_safe(f"{flag}{_shown(v).lower()}") for _, flag, v in combo)
        groups.append(Group(gname, {key: v for key, _, v in combo}))
    return tuple(groups)


def build_grid(preset: str, routers: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
               sets: Sequence[str] = (), vary: Sequence[str] = (), extra: Sequence[str] = (), nproc: int = 1,
               settings: Optional[DriverSettings] = None, only_groups: Sequence[str] = ()) -> Grid:
    """The runs of ``preset`` with the command line's replacements, in order seed, override set, arm (so that a
    sweep stopped early has complete seeds)."""
    if preset not in PRESETS:
        raise SweepError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    p: Preset = PRESETS[preset]
    ds = settings or DriverSettings()
    arms = list(routers) if routers else list(p.routers)
    for a in arms:
        if not p.is_arm(a):
            from ..moe.config import ROUTERS

            raise SweepError(f"unknown router {a!r}: choose among {', '.join([*p.arms, *ROUTERS])}")
    if len(set(arms)) != len(arms):
        raise SweepError(f"--routers {' '.join(arms)} names a router twice: give each once")
    seeds = list(seeds) if seeds else list(p.seeds)
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {' '.join(map(str, seeds))}: give distinct seeds >= 0")
    user: Dict[str, Any] = {}
    for item in sets:
        key, value = ds.setting(item)
        user[key] = value
    user.update(ds.from_argv(extra))
    if vary:
        groups = _vary_groups(vary, ds)
        by_key = True
    else:
        groups, by_key = p.groups, False
    if only_groups:
        names = [g.name for g in groups]
        unknown = [n for n in only_groups if n not in names]
        if unknown:
            raise SweepError(f"--groups {' '.join(unknown)}: no such override set: choose among {', '.join(names)}")
        groups = tuple(g for g in groups if g.name in only_groups)
    if len({g.name for g in groups}) != len(groups):
        raise SweepError("two override sets have the same name: give distinct values to --vary")
    where = f"preset {preset}"
    base = ds.from_mapping(p.flags, where)
    resolved_runs = []
    for seed in seeds:
        for g in groups:
            gflags = dict(g.flags) if by_key else ds.from_mapping(g.flags, f"{where}, set {g.name}")
            for arm in arms:
                merged = {**base, **gflags, **ds.from_mapping(p.arm_flags(arm), f"{where}, {arm}"),
                          **ds.from_mapping(p.router_flags.get(arm, {}), f"{where}, {arm}"),
                          **ds.from_mapping(g.router_flags.get(arm, {}), f"{where}, {arm}"), **user}
                resolved = {k: v.resolve(merged.get(v.flag)) if isinstance(v, Scaled) else v for k, v in merged.items()}
                interval = resolved.get("run.save_interval", 0)
                if not (isinstance(interval, int) and interval > 0):
                    raise SweepError(f"--save-interval {interval}: a stopped run would have no checkpoint to restart "
                                     f"from: give --set save-interval=N with N > 0")
                resolved.update({"moe.router": p.router_of(arm), "optim.seed": seed})
                resolved_runs.append((seed, g, arm, resolved))
    # common: the settings with one value in every run; a run's overrides: the rest of its settings
    first = resolved_runs[0][3]
    shared = {k for k, v in first.items() if all(k in r[3] and r[3][k] == v for r in resolved_runs)}
    shared -= {"moe.router", "optim.seed"}
    common = {ds.flag_of(k): _shown(first[k]) for k in first if k in shared}
    runs = []
    for seed, g, arm, resolved in resolved_runs:
        name = "_".join(x for x in (_safe(arm), g.name, f"s{seed}") if x)
        overrides = {ds.flag_of(k): _shown(v) for k, v in resolved.items()
                     if k not in shared and k not in ("moe.router", "optim.seed")}
        runs.append(RunSpec(name, arm, p.router_of(arm), seed, g.name, resolved, overrides))
    return Grid(preset, arms, seeds, [g.name for g in groups], common, runs, nproc)


def write_config(out: str, spec: RunSpec) -> str:
    """Write ``OUT/<run>.yaml`` (atomically) and return its path."""
    import yaml

    path = config_path(out, spec)
    os.makedirs(out, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{spec.name}.", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(f"# settings of run {spec.name}: pretrain_vqmoe.py --config-file {os.path.basename(path)}\n")
        yaml.safe_dump(spec.config(out), f, sort_keys=False)
    os.replace(tmp, path)
    return path


def check_grid(grid: Grid, out: str, launcher: str, settings: Optional[DriverSettings] = None) -> None:
    """Read every run's config file with the driver's parser and build its task, as the driver will (bad
    settings, values, ds_config, data files; the expert-parallel size against --nproc)."""
    import torch

    from ..data.errors import require_file
    from ..training.config import check_world, resolve_ds_config
    from ..training.launch import bin_path
    from ..training.lm import make_task
    from ..training.loop import INPUT_ERRORS

    ds = settings or DriverSettings()
    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
    tmp = tempfile.mkdtemp(prefix="vqmoe_sweep_check_")
    try:
        for spec in grid.runs:
            try:
                task = make_task(ds.cmd.parse(["--config-file", write_config(tmp, spec)]))
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
                raise SweepError(f"run {spec.name}: {str(e).replace(tmp + os.sep, '')}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    need = {"torchrun": bin_path("torchrun"), "deepspeed": bin_path("deepspeed"), "mpirun": "mpirun"}.get(launcher)
    if need and not (os.path.isfile(need) or shutil.which(need)):
        raise SweepError(f"--launcher {launcher}: {need} is not installed"
                         + (" (scripts/install.sh adds Open MPI)" if launcher == "mpirun" else "")
                         + ": install it or choose another --launcher")
    if launcher == "slurm":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise SweepError("--launcher slurm needs submitit: pip install -r requirements.txt") from None


def check_out(grid: Grid, out: str) -> bool:
    """OUT holds no sweep, a sweep of this very grid (both: False), or a sweep this grid is part of or extends
    (True): the same preset and ranks per run, every run of both the same and, where it adds runs, the same shared
    settings; otherwise SweepError."""
    record = read_sweep(out)
    if record is None:
        return False
    stored = record["grid"]
    now = json.loads(json.dumps(grid.identity()))  # as stored: tuples as lists
    if stored == now:
        return False
    path = os.path.join(out, "sweep.json")
    old = {r.get("name"): r for r in stored.get("runs", [])}
    new = {r["name"]: r for r in now["runs"]}
    diff = ""
    if stored.get("preset") != now["preset"]:
        diff = f"preset {stored.get('preset')}, this one {now['preset']}"
    elif stored.get("nproc") != now["nproc"]:
        diff = f"--nproc {stored.get('nproc')}, this one {now['nproc']}"
    elif any(old[n] != new[n] for n in new if n in old):
        name = next(n for n in new if n in old and old[n] != new[n])
        a, b = old[name].get("settings", {}), new[name]["settings"]
        keys = sorted(set(a) ^ set(b) | {k for k in set(a) & set(b) if a[k] != b[k]})
        diff = (f"run {name} had " + ", ".join(f"{k}={a.get(k, '-')}" for k in keys[:3]) + " where this one has "
                + ", ".join(f"{k}={b.get(k, '-')}" for k in keys[:3])) if keys else f"run {name} differs"
    elif not set(new) - set(old):
        pass  # a part of the stored grid
    elif "common" not in record:
        added = sorted(set(new) - set(old))
        diff = f"runs {' '.join(added[:3])} not in it, and it records no shared settings to extend it with"
    elif record["common"] != json.loads(json.dumps(grid.common)):
        a, b = record["common"], grid.common
        keys = sorted(set(a) ^ set(b) | {k for k in set(a) & set(b) if a[k] != b[k]})
        diff = ("every run had " + ", ".join(f"--{k} {a.get(k, '-')}" for k in keys[:3]) + " where this one has "
                + ", ".join(f"--{k} {b.get(k, '-')}" for k in keys[:3]))
    if diff:
        raise SweepError(f"{out} holds a sweep of another grid (that sweep: {diff}): give a new --out folder, or the "
                         f"settings stored in {path}")
    return True


def read_sweep(out: str) -> Optional[Dict[str, Any]]:
    """OUT/sweep.json (None when there is none): ``grid`` (`Grid.identity`), ``common``, ``command``, ``created``,
    and ``extended`` (each later sweep that added runs)."""
    path = os.path.join(out, "sweep.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record, dict) or not isinstance(record["grid"], dict):
            raise TypeError
        return record
    except (OSError, ValueError, KeyError, TypeError):
        raise SweepError(f"{path} is not a sweep record: give another --out folder, or remove the file") from None


def write_sweep(grid: Grid, out: str, command: Sequence[str]) -> None:
    """Record ``grid`` in OUT/sweep.json: a new record, or the union with the stored grid (its runs first) when
    this grid extends it (`check_out`).  Written atomically."""
    record = read_sweep(out)
    now = json.loads(json.dumps(grid.identity()))
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    if record is None:
        record = {"created": stamp, "command": list(command), "grid": now, "common": dict(grid.common)}
    else:
        names = {r.get("name") for r in record["grid"].get("runs", [])}
        added = [r for r in now["runs"] if r["name"] not in names]
        if not added:
            return
        record["grid"]["runs"] = list(record["grid"].get("runs", [])) + added
        record.setdefault("extended", []).append({"at": stamp, "command": list(command),
                                                  "runs": [r["name"] for r in added]})
    path = os.path.join(out, "sweep.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def read_record(out: str) -> Optional[Dict[str, Any]]:
    """The grid stored in OUT/sweep.json (None when there is none)."""
    record = read_sweep(out)
    return None if record is None else record["grid"]


def grid_from_record(out: str) -> Grid:
    """The grid of a sweep folder as its sweep.json stored it (runs named, arms, seeds, override sets), for
    reporting a sweep without rebuilding it."""
    record = read_sweep(out)
    if record is None:
        raise SweepError(f"{out} holds no sweep.json: give the --out folder of a sweep")
    stored = record["grid"]
    runs, arms, seeds, groups = [], [], [], []
    for r in stored.get("runs", []):
        arm = r.get("arm", r.get("router"))
        for lst, v in ((arms, arm), (seeds, r["seed"]), (groups, r.get("group", ""))):
            if v not in lst:
                lst.append(v)
        runs.append(RunSpec(r["name"], arm, r.get("router", arm), int(r["seed"]), r.get("group", ""),
                            dict(r.get("settings", {})), {}))
    return Grid(stored.get("preset", "?"), arms, seeds, groups, dict(record.get("common") or {}), runs,
                int(stored.get("nproc", 1)))


__all__ = ["RunSpec", "Grid", "build_grid", "check_grid", "check_out", "read_record", "read_sweep", "write_sweep",
           "grid_from_record", "run_dir", "config_path", "write_config"]
