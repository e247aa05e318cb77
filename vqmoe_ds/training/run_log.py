"""What a run writes while it trains: its progress (rank 0: a tqdm bar on a terminal, else a plain line every
5% of the steps), TensorBoard scalars and one JSON line per log step in ``OUT_DIR/log.jsonl`` (rank 0), the
MoE statistics summed over all ranks, and `RoutingHealth`: a warning when a layer's routing uses fewer than half
of its experts or codes over a logging window.

The JSON lines are strict JSON: a value that is not a finite number (a NaN gradient norm, an infinite metric) is
written as ``null``."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..models import moe_stats
from ..parallel import all_reduce_sum


def load_metrics(load: List[float]) -> Dict[str, float]:
    """Load max / mean and the coefficient of variation (std / mean) of one layer's expert loads."""
    n = len(load)
    mean = sum(load) / n if n else 0.0
    if mean <= 0:
        return {"load_max_over_mean": 0.0, "load_cv": 0.0}
    var = sum((v - mean) ** 2 for v in load) / n
    return {"load_max_over_mean": max(load) / mean, "load_cv": math.sqrt(var) / mean}


SUMMED = ("balance_loss", "z_loss", "vq_loss")  # losses: summed over the layers
AVERAGED = ("load_max_over_mean", "load_cv", "dropped_fraction")  # per-layer ratios: their mean over the layers


def moe_summary(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    """One number per routing metric for the whole model: losses summed over the layers, load ratios and dropped
    fractions averaged over them, the expert-bias range the largest of them."""
    out: Dict[str, float] = {}
    for key in SUMMED:
        vals = [r[key] for r in rows if isinstance(r.get(key), float)]
        if vals:
            out[key] = sum(vals)
    for key in AVERAGED:
        vals = [r[key] for r in rows if isinstance(r.get(key), float)]
        if vals:
            out[key] = sum(vals) / len(vals)
    ranges = [r["expert_bias_range"] for r in rows if isinstance(r.get("expert_bias_range"), float)]
    if ranges:
        out["expert_bias_range"] = max(ranges)
    return out


def layer_stats(model, layers: Optional[List[Any]] = None) -> List[Dict[str, torch.Tensor]]:
    """``stats()`` of every MoE layer of ``model`` (or of ``layers``): this rank's numbers of the last forward."""
    return moe_stats(model) if layers is None else [layer.stats() for layer in layers]


def gather_moe_stats(model, layers: Optional[List[Any]] = None) -> List[Dict[str, Any]]:
    """Per MoE layer: counts summed over all ranks (expert_load, code_counts), scalars averaged, and the load's
    max / mean and coefficient of variation.

    ``layers``: the modules whose ``stats()`` to gather (default: the model's MoE layers; the vision driver
    passes its SoftMoE slots too).  Collective (all ranks call it at the same steps).  Every rank's layers
    expose the same keys."""
    stats = layer_stats(model, layers)
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = []
    for st in stats:
        row: Dict[str, Any] = {}
        for key in sorted(st):
            t = all_reduce_sum(st[key].detach().to(torch.float64).reshape(-1).clone())
            counts = key in ("expert_load", "code_counts")
            if not counts:
                t = t / world
            row[key] = t.tolist() if t.numel() > 1 or counts else t.item()
        if isinstance(row.get("expert_load"), list):
            row.update(load_metrics(row["expert_load"]))
        out.append(row)
    return out


def finite_json(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


class RoutingHealth:
    """Expert loads and code counts of every MoE layer summed over the micro-batches of a logging window (on the
    device: ``add`` costs a few small additions and no host sync), then over the ranks at the log step, where
    `check` names the layers that used fewer than half of their experts or codes in the window -- a collapsed
    router or codebook, otherwise visible only in a plot.  ``check`` is collective (every rank calls it)."""

    KEYS = (("expert_load", "experts"), ("code_counts", "codes"))

    def __init__(self):
        self.sums: Dict[int, Dict[str, torch.Tensor]] = {}

    def add(self, stats: List[Dict[str, torch.Tensor]]) -> None:
        for i, st in enumerate(stats):
            acc = self.sums.setdefault(i, {})
            for key, _ in self.KEYS:
                if key in st:
                    v = st[key].detach().reshape(-1).to(torch.float64)
                    acc[key] = acc[key] + v if key in acc and acc[key].shape == v.shape else v.clone()

    def check(self, steps: int) -> List[str]:
        """One line per layer and kind with fewer than half of its experts / codes used in the window (every rank
        returns the same lines); the window starts again."""
        order = [(i, key, what) for i in sorted(self.sums) for key, what in self.KEYS if key in self.sums[i]]
        self.sums, sums = {}, self.sums
        if not order:
            return []
        flat = all_reduce_sum(torch.cat([sums[i][key] for i, key, _ in order]))
        out, start = [], 0
        for i, key, what in order:
            n = sums[i][key].numel()
            counts = flat[start:start + n]
            start += n
            used = int((counts > 0).sum())
            if n > 1 and used * 2 < n and float(counts.sum()) > 0:
                out.append(f"layer {i} used {used} of its {n} {what} over the last {steps} step(s)"
                           f"{' (codebook collapse)' if what == 'codes' else ' (router collapse)'}")
        return out


def complete_config(resolved: Dict[str, Any], cmd, ds_config: Dict[str, Any],
                    ds_config_file: Optional[str]) -> Dict[str, Any]:
    """OUT_DIR/config.json's content: ``resolved`` (the command line's values, `cli.CommandLine.resolved`) with

    * the MoE section spelled out: every setting the driver exposes, at its default where nothing set it (a
      named shape's own values stay; the experts' activation of a ``--swiglu`` model is swiglu), so that the file
      does not depend on the defaults of another version and reads back as the same model;
    * the optimisation values as DeepSpeed uses them (`config.resolve_ds_config`): micro-batch size, gradient
      accumulation, peak lr, gradient clipping, and, when the schedule is built from the flags (no scheduler
      block in the ds_config), its warmup and min_lr -- written so that the same ds_config with this file
      resolves to the same values."""
    from ..moe.config import ROUTERS

    out = json.loads(json.dumps(resolved, default=str))
    moe = out.get("moe")
    if isinstance(moe, dict) and moe.get("router", "topk") in ROUTERS:
        # --swiglu makes every MLP SwiGLU: the experts' activation is written as what they run
        effective = {"activation": "swiglu"} if (out.get("model") or {}).get("swiglu") else {}
        for spec in cmd.specs.get("moe", []):
            if not spec.cli_only and spec.name not in moe:
                moe[spec.name] = effective.get(spec.name, spec.default)
    optim = out.get("optim")
    if isinstance(optim, dict) and ds_config:
        lr = ds_config.get("optimizer", {}).get("params", {}).get("lr")
        optim.update(micro_batch_size=ds_config["train_micro_batch_size_per_gpu"],
                     gradient_accumulation_steps=ds_config["gradient_accumulation_steps"],
                     clip_grad=ds_config.get("gradient_clipping"), lr=lr if lr is not None else optim.get("lr"))
        from .config import DEFAULT_MIN_LR_RATIO, load_ds_config

        if "scheduler" not in load_ds_config(ds_config_file) and lr is not None:
            if optim.get("min_lr") is None:
                optim["min_lr"] = DEFAULT_MIN_LR_RATIO * lr  # the schedule's (config.flag_lr_schedule)
            if optim.get("lr_warmup_iters") is None:
                optim["lr_warmup_iters"] = 0
    return out


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("resumes",):
            out.update(_flat(v, f"{prefix}{k}."))
        elif k not in ("resumes", "imported", "converted"):
            out[prefix + k] = v
    return out


# settings whose change between a run and its resume says nothing about the run itself
RESUME_BOOKKEEPING = ("run.load", "run.overwrite")


def config_changes(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, tuple]:
    """``{"section.key": (old, new)}`` for every setting a resume changed (both resolved configurations)."""
    a, b = _flat(before or {}), _flat(after or {})
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in RESUME_BOOKKEEPING and a.get(k) != b.get(k) and k in a}


def interactive() -> bool:
    """Whether stdout and stderr (where tqdm draws) are both terminals: then a bar, else plain lines."""
    import sys

    return all(getattr(f, "isatty", lambda: False)() for f in (sys.stdout, sys.stderr))


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def plain_progress(step: int, total: int, done: int, seconds: float, values: Dict[str, Any]) -> str:
    """``train: step 40/400 (10%), 0:00:41 elapsed, ETA 0:06:09, loss=1.234, tokens/s=2100``: ``done`` steps
    took ``seconds`` in this process (a resumed run counts from its start step)."""
    eta = f", ETA {_hms(seconds / done * (total - step))}" if done and step < total else ""
    more = "".join(f", {k}={v}" for k, v in values.items())
    return f"train: step {step}/{total} ({100 * step // max(total, 1)}%), {_hms(seconds)} elapsed{eta}{more}"


def monitor_events(record: Dict[str, Any], per_layer: bool = False) -> List[Tuple[str, float, int]]:
    """A log record's scalars as DeepSpeed monitor events (name, value, step): ``{kind}/{key}`` for its finite
    numbers, ``moe/{key}`` for the model-wide routing summary, and with ``per_layer`` every MoE layer's metrics and
    the largest share and count of used experts and codes."""
    step, kind = record.get("step", 0), record.get("kind", "train")
    out = [(f"{kind}/{k}", float(v), step) for k, v in record.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time") and math.isfinite(v)]
    out += [(f"moe/{k}", float(v), step) for k, v in record.get("moe_summary", {}).items()]
    for i, layer in enumerate(record.get("moe", []) if per_layer else []):
        for k, v in layer.items():
            if isinstance(v, float):
                out.append((f"moe_layer{i}/{k}", v, step))
            elif k in ("expert_load", "code_counts") and sum(v) > 0:
                out.append((f"moe_layer{i}/{k}_max_share", max(v) / sum(v), step))
                out.append((f"moe_layer{i}/{k}_used", float(sum(1 for c in v if c > 0)), step))
    return out


class RunLog:
    def __init__(self, out_dir: str, rank: int, total_steps: int, start_step: int = 0, progress: bool = True,
                 monitor=None, monitor_note: str = "", per_layer: bool = False):
        """``monitor``: DeepSpeed's ``engine.monitor`` (TensorBoard, W&B, CSV, Comet, as the ds_config says): every
        record's scalars go to it beside log.jsonl; ``monitor_note``: where it writes, for the last line."""
        self.rank, self.out_dir, self.per_layer = rank, out_dir, per_layer
        self.monitor, self.monitor_note = monitor, monitor_note
        self.bar = self.jsonl = None
        self.failed: Optional[OSError] = None  # the first write to log.jsonl that failed
        self.plain = None  # progress as plain lines: [every, start step, start time] (no terminal to redraw a bar on)
        self.step, self.total = start_step, total_steps
        if rank != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.jsonl = open(os.path.join(out_dir, "log.jsonl"), "a")
        if progress and interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        elif progress:
            self.plain = [max(1, -(-total_steps // 20)), start_step, time.time()]

    def write(self, record: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        record = {"time": time.time(), **record}
        if self.failed is not None:
            return
        try:
            self.jsonl.write(json.dumps(finite_json(record), allow_nan=False) + "\n")
            self.jsonl.flush()
        except OSError as e:  # a full disk: the loop stops all ranks at its next agreement (``failed``)
            self.failed = e
            return
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            self.monitor.write_events(monitor_events(record, self.per_layer))

    def progress(self, steps: int, **postfix) -> None:
        self.step += steps
        values = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(values, refresh=False)
        elif self.plain is not None and (self.step % self.plain[0] == 0 or self.step == self.total):
            print(plain_progress(self.step, self.total, self.step - self.plain[1], time.time() - self.plain[2],
                                 values), flush=True)

    def info(self, msg: str) -> None:
        if self.rank == 0:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def finish(self, save_dir: str, make_plots=None) -> None:
        """End of a run: close the logs, then on rank 0 draw the plots (``make_plots(out_dir) -> paths``;
        None: none) and say where everything is."""
        self.close()
        if self.rank != 0:
            return
        for p in make_plots(self.out_dir) if make_plots is not None else []:
            print(f"plot: {p}", flush=True)
        print(f"logs: {os.path.join(self.out_dir, 'log.jsonl')}{self.monitor_note}, checkpoints: {save_dir}",
              flush=True)

    def close(self) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.close()
        try:
            self.jsonl.close()
        except OSError:  # what could not be written after a failed write (already reported)
            if self.failed is None:
                raise
