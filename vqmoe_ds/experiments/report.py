"""A sweep's report: ``sweep.md`` (per arm: quality, parameters and compute; paired differences with Student t
intervals, TOST equivalence at a stated margin and whether the pair is compute-matched; steps and FLOPs to a
target validation BPC), ``sweep.csv`` and the plots ``valid_curve.png``, ``test_bpc.png`` and ``bpc_vs_flops.png``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..analysis.sweep_stats import by_seed, paired_difference, paired_values, summarize, tost
from .grid import Grid
from .presets import PRESETS
from .results import collect, steps_to_target, write_csv

LEVEL = 0.95
MATCH_TOLERANCE = 0.05  # training FLOPs per token within 5% of each other: compute-matched


@dataclass
class ReportOptions:
    comparisons: Sequence[Tuple[str, str]]  # (arm, reference)
    margin: float = 0.01  # TOST equivalence margin, BPC
    targets: Sequence[float] = ()  # validation BPC targets; empty: one per override set (see `default_target`)
    launcher: str = ""


def comparisons_for(grid: Grid, baseline: Optional[str]) -> List[Tuple[str, str]]:
    """``baseline`` given: every other arm against it; else the preset's pairs of arms that the grid holds, or
    every arm against the first one (top-k SMoE when swept)."""
    if baseline is None and grid.preset in PRESETS and PRESETS[grid.preset].comparisons:
        pairs = [(a, b) for a, b in PRESETS[grid.preset].comparisons if a in grid.routers and b in grid.routers]
        if pairs:
            return pairs
    base = baseline or ("topk" if "topk" in grid.routers else grid.routers[0])
    return [(a, base) for a in grid.routers if a != base]


def default_target(rows: Sequence[Mapping[str, Any]]) -> Optional[float]:
    """The highest best validation BPC of the finished runs, rounded up to 0.01: every run reaches it."""
    vals = [r["best_valid_bpc"] for r in rows if r["status"] == "done" and math.isfinite(r["best_valid_bpc"])]
    return math.ceil(max(vals) * 100 - 1e-9) / 100 if vals else None


def _ms(values: Sequence[float], digits: int) -> str:
    s = summarize(values)
    if s.n == 0:
        return "–"
    return f"{s.mean:.{digits}f}" if s.n < 2 else f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _iv(d, digits: int = 4) -> str:
    if d.n == 0:
        return "–"
    if d.n < 2:
        return f"{d.mean:+.{digits}f} (n = 1)"
    return f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"


def _first(rows: Sequence[Mapping[str, Any]], key: str):
    return next((r[key] for r in rows if r.get(key) is not None), None)


def _si(x: Optional[float], unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "–"
    for div, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {p}{unit}"
    return f"{x:.3g} {unit}".strip()


def _or_dash(v) -> str:
    return "–" if v is None else str(v)


def _tost_text(diffs: Sequence[float], margin: float) -> str:
    e = tost(diffs, margin)
    if e.n < 2:
        return "–"
    return f"{'equivalent' if e.equivalent else 'not shown'} (p = {e.p:.3f})"


def _cell(done, arm, g):
    return [x for x in done if x["arm"] == arm and x["group"] == g]


def report(grid: Grid, rows: Sequence[Mapping[str, Any]], opts: ReportOptions) -> str:
    done = [r for r in rows if r["status"] == "done"]
    named = any(grid.groups)
    preset = PRESETS.get(grid.preset)
    lines = [f"# Sweep `{grid.preset}`", ""]
    if preset is not None:
        lines += [f"{preset.description}.", ""]
    wall = sum(r["wall_s"] or 0.0 for r in rows)
    lines += [f"{len(done)} of {len(rows)} runs finished: arms {', '.join(grid.routers)}; seeds "
              f"{', '.join(map(str, grid.seeds))}" + (f"; override sets {', '.join(grid.groups)}" if named else "")
              + f"; {grid.nproc} rank(s) per run" + (f" ({opts.launcher})" if opts.launcher else "")
              + f"; {wall / 3600:.2f} h of run time in all.", ""]
    if grid.common:
        lines += ["Settings of every run: `" + " ".join(f"--{k} {v}" for k, v in grid.common.items()) + "`.", ""]
    specific = sorted({f"{r['arm']}{' ' + r['group'] if r['group'] else ''}: `{r['overrides']}`"
                       for r in rows if r["overrides"]})
    if specific:
        lines += ["Per run on top of those: " + "; ".join(specific) + ".", ""]
    lines += ["BPC: bits per character (per byte for byte-level data) of the validation split at the best "
              "validation step and of the test split on that checkpoint; PPL: test perplexity per token. "
              "Mean ± sample standard deviation over seeds; n: finished seeds. Compute: routes = expert routes per "
              "token of an MoE layer; FLOPs/token = training FLOPs of one forward + backward per token "
              "(`flops_per_token`); train FLOPs = FLOPs/token x tokens per step x steps; tokens/s = median over "
              "logging windows of the training throughput (machine shared: rough); wall = all attempts of a run, "
              "start-up, evaluation and test included.", "",
              "## Per arm" + (" and override set" if named else ""), "",
              "| arm |" + (" set |" if named else "") + " n | best valid BPC | test BPC | test PPL | params total / "
              "active | routes | FLOPs/token | train FLOPs | tokens/s | wall s |",
              "|---|" + ("---|" if named else "") + "---|---|---|---|---|---|---|---|---|---|"]
    for g in grid.groups:
        for arm in grid.routers:
            sel = _cell(done, arm, g)
            allrows = [x for x in rows if x["arm"] == arm and x["group"] == g]
            pt, pa = _first(allrows, "params_total"), _first(allrows, "params_active")
            params = f"{pt / 1e6:.2f}M / {pa / 1e6:.2f}M" if pt else "–"
            routes = _first(allrows, "routes_per_token")
            lines.append(
                f"| {arm} |" + (f" {g} |" if named else "") + f" {len(sel)} | "
                f"{_ms([x['best_valid_bpc'] for x in sel], 4)} | {_ms([x['test_bpc'] for x in sel], 4)} | "
                f"{_ms([x['test_ppl'] for x in sel], 3)} | {params} | {_or_dash(routes)} | "
                f"{_si(_first(allrows, 'flops_per_token'))} | {_si(_first(sel, 'train_flops'))} | "
                f"{_ms([x['tokens_per_s'] for x in sel if x['tokens_per_s']], 0)} | "
                f"{_ms([x['wall_s'] for x in sel if x['wall_s']], 0)} |")
    if opts.comparisons:
        m = opts.margin
        lines += ["", "## Paired differences (by seed, Student t interval, TOST)", "",
                  f"Δ = arm − reference at the same seed (and override set), over the seeds both finished; in brackets "
                  f"the {LEVEL:.0%} interval mean ± t({(1 + LEVEL) / 2:g}, n − 1) · s / √n (scipy.stats), s the "
                  f"standard deviation of the paired differences; Δ < 0: lower BPC than the reference. TOST: two "
                  f"one-sided t tests of Δ against ±{m:g} BPC; \"equivalent\" when both reject at 5% (p = the larger "
                  f"p-value), so a tie is a measured claim. Compute-matched: training FLOPs per token within "
                  f"{MATCH_TOLERANCE:.0%} of each other (routes per token shown as arm/reference); params: the arm's total and "
                  f"active parameters relative to the reference's.", "",
                  "| arm | reference |" + (" set |" if named else "") + f" n | Δ best valid BPC [{LEVEL:.0%} CI] | "
                  f"TOST ±{m:g} valid | Δ test BPC [{LEVEL:.0%} CI] | TOST ±{m:g} test | routes | FLOPs ratio | "
                  "compute-matched | params total / active |",
                  "|---|---|" + ("---|" if named else "") + "---|---|---|---|---|---|---|---|---|"]
        for g in grid.groups:
            for arm, ref in opts.comparisons:
                a, b = _cell(done, arm, g), _cell(done, ref, g)
                aa = [x for x in rows if x["arm"] == arm and x["group"] == g]
                bb = [x for x in rows if x["arm"] == ref and x["group"] == g]
                dv = paired_difference(by_seed(a, "best_valid_bpc"), by_seed(b, "best_valid_bpc"), LEVEL)
                dt = paired_difference(by_seed(a, "test_bpc"), by_seed(b, "test_bpc"), LEVEL)
                tv = _tost_text(paired_values(by_seed(a, "best_valid_bpc"), by_seed(b, "best_valid_bpc"))[1], m)
                tt = _tost_text(paired_values(by_seed(a, "test_bpc"), by_seed(b, "test_bpc"))[1], m)
                fa, fb = _first(aa, "flops_per_token"), _first(bb, "flops_per_token")
                ratio = fa / fb if fa and fb else None
                matched = "–" if ratio is None else ("yes" if abs(ratio - 1) <= MATCH_TOLERANCE else "no")
                ra, rb = (_or_dash(_first(x, "routes_per_token")) for x in (aa, bb))
                params = "–"
                if _first(aa, "params_total") and _first(bb, "params_total"):
                    params = " / ".join(f"{_first(aa, k) / _first(bb, k) - 1:+.0%}" for k in ("params_total",
                                                                                              "params_active"))
                lines.append(f"| {arm} | {ref} |" + (f" {g} |" if named else "") + f" {dt.n} | {_iv(dv)} | {tv} | "
                             f"{_iv(dt)} | {tt} | {ra}/{rb} | " + ("–" if ratio is None else f"{ratio:.3f}")
                             + f" | {matched} | {params} |")
    lines += _targets_section(grid, done, opts, named)
    missing = [r for r in rows if r["status"] != "done"]
    if missing:
        lines += ["", "Not finished (rerun the sweep to resume them): "
                  + ", ".join(f"{r['run']} ({r['status']}, log {r['run']}.log)" for r in missing) + "."]
    return "\n".join(lines) + "\n"


def _targets_section(grid: Grid, done, opts: ReportOptions, named: bool) -> List[str]:
    lines = ["", "## Steps and training FLOPs to a target validation BPC", "",
             "The first validation step at or below the target (resolution: the validation interval); FLOPs = that "
             "step x tokens per step x FLOPs/token. Mean ± std over the seeds that reached it (n: reached / "
             "finished); Δ steps: paired by seed against the reference, over the seeds where both reached it. "
             "Default target: the highest best validation BPC of the set's finished runs, rounded up to 0.01, which "
             "every run reaches.", ""]
    rows_out = []
    for g in grid.groups:
        sel_g = [x for x in done if x["group"] == g]
        targets = list(opts.targets) or [t for t in [default_target(sel_g)] if t is not None]
        for target in targets:
            reach: Dict[str, Dict[int, float]] = {}
            flops: Dict[str, Dict[int, float]] = {}
            for arm in grid.routers:
                reach[arm], flops[arm] = {}, {}
                for x in _cell(done, arm, g):
                    s = steps_to_target(x["curve"], target)
                    if s is not None:
                        reach[arm][x["seed"]] = float(s)
                        if x.get("flops_per_token") and x.get("tokens_per_step"):
                            flops[arm][x["seed"]] = s * x["tokens_per_step"] * x["flops_per_token"]
            for arm in grid.routers:
                n_done = len(_cell(done, arm, g))
                st = summarize(list(reach[arm].values()))
                fl = summarize(list(flops[arm].values()))
                refs = [ref for a, ref in opts.comparisons if a == arm]
                deltas = "; ".join(f"vs {ref}: {_iv(paired_difference(reach[arm], reach[ref], LEVEL), 0)}"
                                   for ref in refs) or "–"
                rows_out.append(f"| {target:.2f} |" + (f" {g} |" if named else "") + f" {arm} | {st.n}/{n_done} | "
                                + (_ms(list(reach[arm].values()), 0) if st.n else "–") + " | "
                                + (f"{_si(fl.mean)}" + (f" ± {_si(fl.std)}" if fl.n > 1 else "") if fl.n else "–")
                                + f" | {deltas} |")
    if not rows_out:
        return []
    return lines + ["| target BPC |" + (" set |" if named else "") + " arm | n | steps | train FLOPs | Δ steps "
                    f"[{LEVEL:.0%} CI] |", "|---|" + ("---|" if named else "") + "---|---|---|---|---|"] + rows_out


def plots(grid: Grid, rows: Sequence[Mapping[str, Any]], out: str) -> List[str]:
    """valid_curve.png (validation BPC against step: mean and min-max band over seeds per arm; one panel per
    override set), bpc_vs_flops.png (the same against training FLOPs) and test_bpc.png (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    curves = [r for r in rows if r["curve"]]
    for fname, xlabel, scale in (("valid_curve.png", "step", None), ("bpc_vs_flops.png", "training FLOPs", "flops")):
        if not curves:
            break
        n = len(grid.groups)
        cols = min(n, 3)
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6 * cols, 4 * ((n + cols - 1) // cols)),
                                 squeeze=False)
        drawn = False
        for ax, g in zip(axes.flat, grid.groups):
            for arm in grid.routers:
                sel = [r for r in curves if r["arm"] == arm and r["group"] == g]
                if scale == "flops":
                    sel = [r for r in sel if r.get("flops_per_token") and r.get("tokens_per_step")]
                if not sel:
                    continue
                steps = sorted({s for r in sel for s, _ in r["curve"]})
                vals = [[v for r in sel for s2, v in r["curve"] if s2 == s] for s in steps]
                x = np.array(steps, dtype=float)
                if scale == "flops":
                    x = x * sel[0]["tokens_per_step"] * sel[0]["flops_per_token"]
                line, = ax.plot(x, [np.mean(v) for v in vals], label=f"{arm} (n={len(sel)})")
                ax.fill_between(x, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.2)
                drawn = True
            ax.set_title((f"{g}: " if g else "") + "validation BPC, mean and min-max over seeds")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation BPC")
            if scale == "flops":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.tight_layout()
        if drawn:
            written.append(os.path.join(out, fname))
            fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    done = [r for r in rows if r["status"] == "done" and math.isfinite(r["test_bpc"])]
    if done:
        groups = grid.groups if any(grid.groups) else []
        arms = grid.routers
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(arms) * max(1, len(groups)) + 2), 4))
        width = 0.8 / len(arms) if groups else 0.6
        lows, highs = [], []
        for i, arm in enumerate(arms):
            stats = [summarize([r["test_bpc"] for r in done if r["arm"] == arm and r["group"] == g])
                     for g in (groups or [""])]
            x = (np.arange(len(groups)) + (i - (len(arms) - 1) / 2) * width) if groups else np.array([i])
            err = [0.0 if s.n < 2 else s.std for s in stats]
            ax.bar(x, [s.mean for s in stats], width, yerr=err, capsize=3, label=arm)
            lows += [s.mean - e for s, e in zip(stats, err) if s.n]
            highs += [s.mean + e for s, e in zip(stats, err) if s.n]
        ticks = groups or arms
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


def write_reports(grid: Grid, out: str, opts: ReportOptions, with_plots: bool = True) -> List[str]:
    rows = collect(grid, out)
    write_csv(rows, os.path.join(out, "sweep.csv"))
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(report(grid, rows, opts))
    return [os.path.join(out, "sweep.csv"), os.path.join(out, "sweep.md"), *(plots(grid, rows, out) if with_plots
                                                                            else [])]


__all__ = ["ReportOptions", "comparisons_for", "default_target", "report", "plots", "write_reports", "LEVEL",
           "MATCH_TOLERANCE"]
