"""Reading a sweep's runs back: one row per run with its results and its compute.

  * quality: the best validation BPC and the test BPC/PPL from the run's ``results.json`` (the validation
    metrics at the best step, and the test on that checkpoint);
  * compute: the model the run trained (its resolved ``config.json``) gives the training FLOPs per token of one
    forward + backward (``vqmoe_ds.models.flops_per_token``, at the run's micro-batch for Transformer-XL's
    position projection) and the expert routes per token of an MoE layer (``routes_per_token``); tokens per step
    are the global batch (``ds_config.json``) x the sequence length, so the training FLOPs are
    FLOPs/token x tokens/step x steps;
  * speed: the median over logging windows of the training tokens per second (``log.jsonl``), and the wall time of
    all the run's attempts (``sweep_attempts.jsonl``, start-up, evaluation and test included);
  * the validation curve (step, BPC) from ``log.jsonl``, for plots and steps-to-target.
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .grid import Grid, run_dir

LN2 = math.log(2)
CSV_FIELDS = ("run", "arm", "router", "group", "seed", "overrides", "status", "best_valid_loss", "best_valid_bpc",
              "best_step", "test_loss", "test_bpc", "test_ppl", "steps", "wall_s", "tokens_per_s", "params_total",
              "params_active", "routes_per_token", "flops_per_token", "tokens_per_step", "train_flops")


def read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_log(path: str) -> Tuple[List[Tuple[int, float]], List[float]]:
    """(validation curve [(step, BPC)], training tokens/s of each logging window) of a run's log.jsonl; a step
    validated twice (a resumed run) keeps its last record."""
    by_step: Dict[int, float] = {}
    speeds: List[float] = []
    try:
        with open(os.path.join(path, "log.jsonl")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a killed run
                kind = rec.get("kind")
                if kind == "valid" and isinstance(rec.get("loss"), (int, float)):
                    bpc = rec.get("bpc")
                    by_step[int(rec["step"])] = float(bpc) if isinstance(bpc, (int, float)) else rec["loss"] / LN2
                elif kind == "train" and isinstance(rec.get("tokens_per_s"), (int, float)) and rec["tokens_per_s"] > 0:
                    speeds.append(float(rec["tokens_per_s"]))
    except OSError:
        pass
    return sorted(by_step.items()), speeds


def compute_of(path: str) -> Dict[str, Any]:
    """Training FLOPs per token, expert routes per token and tokens per step of the run in ``path`` (from the
    config.json and ds_config.json the driver wrote); empty when they are missing."""
    from ..models import ModelConfig, flops_per_token, routes_per_token

    cfg = read_json(os.path.join(path, "config.json"))
    ds = read_json(os.path.join(path, "ds_config.json"))
    if not cfg or not ds or "model" not in cfg:
        return {}
    model = ModelConfig.from_dict({**cfg["model"], "moe": cfg.get("moe", {})})
    micro = int(ds.get("train_micro_batch_size_per_gpu", 1))
    routes = 0
    if model.is_moe:
        routes = routes_per_token(model.moe_config(model.moe_layer_ids()[0]))
    return {"flops_per_token": flops_per_token(model, batch_size=micro), "routes_per_token": routes,
            "tokens_per_step": int(ds.get("train_batch_size", micro)) * model.seq_len}


def collect(grid: Grid, out: str) -> List[Dict[str, Any]]:
    """One row per run of the grid (the CSV's fields, and its validation ``curve``; NaN where a run has no result
    yet)."""
    nan = float("nan")
    rows = []
    for spec in grid.runs:
        path = run_dir(out, spec)
        res = read_json(os.path.join(path, "results.json"))
        info = read_json(os.path.join(path, "run_info.json")) or {}
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
        curve, speeds = read_log(path)
        row: Dict[str, Any] = {
            "run": spec.name, "arm": spec.arm, "router": spec.router, "group": spec.group, "seed": spec.seed,
            "overrides": " ".join(f"{k}={v}" for k, v in spec.overrides.items()),
            "status": "done" if res else state,
            "best_valid_loss": nan, "best_valid_bpc": nan, "best_step": None, "test_loss": nan, "test_bpc": nan,
            "test_ppl": nan, "steps": None, "wall_s": round(seconds, 1) if seconds else None,
            "tokens_per_s": round(statistics.median(speeds), 1) if speeds else None,
            "params_total": info.get("params", {}).get("total"), "params_active": info.get("params", {}).get("active"),
            "routes_per_token": None, "flops_per_token": None, "tokens_per_step": None, "train_flops": None,
            "curve": curve}
        row.update(compute_of(path))
        if res:
            best = res.get("best_valid") or {}
            loss = float(best.get("loss", nan))
            bpc = best.get("bpc")
            test = res.get("test") or {}
            row.update(best_valid_loss=loss, best_valid_bpc=float(bpc) if isinstance(bpc, (int, float)) else loss / LN2,
                       best_step=best.get("step"), test_loss=float(test.get("loss", nan)),
                       test_bpc=float(test.get("bpc", nan)), test_ppl=float(test.get("ppl", nan)),
                       steps=res.get("steps"))
        if row["steps"] and row["flops_per_token"] and row["tokens_per_step"]:
            row["train_flops"] = row["flops_per_token"] * row["tokens_per_step"] * row["steps"]
        rows.append(row)
    return rows


def steps_to_target(curve: Sequence[Tuple[int, float]], target: float) -> Optional[int]:
    """The first validated step whose BPC is at or below ``target`` (None: never)."""
    for step, bpc in curve:
        if bpc <= target:
            return step
    return None


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None or (isinstance(r[k], float) and not math.isfinite(r[k])) else r[k])
                        for k in CSV_FIELDS})


__all__ = ["CSV_FIELDS", "collect", "compute_of", "read_log", "read_json", "steps_to_target", "write_csv"]
