"""The command line of ``tools/sweep.py``: run a preset's grid (arms x seeds x override sets) and report it.

    python tools/sweep.py --preset seeds --out runs/sweep_seeds -- --data-file ../shared/data/warpeace.txt
    python tools/sweep.py --preset paper --out runs/paper --launcher none -- --data-file ../shared/data/warpeace.txt
    python tools/sweep.py --preset table1 --out runs/table1 --launcher slurm --slurm slurm_partition=gpu \\
        timeout_min=600 gpus_per_node=1 -- --data-path data/enwik8/byte

A preset (``--preset``, listed below) names the arms (a router and its settings), the seeds, the driver settings
every run gets and the override sets (e.g. model sizes) the grid runs over; every part of it can be replaced:
``--routers`` (arms or plain router names), ``--seeds``, ``--set FLAG=VALUE`` (a driver setting for every run,
over the preset's value), ``--vary FLAG=V1,V2,...`` (the override sets become the product of the given values),
``--groups`` (only these override sets) and driver flags after ``--``.  Settings are the driver's flags without
the dashes (``python pretrain_vqmoe.py --help``) or config keys (``optim.train_iters``); booleans as
``FLAG=true|false``.

Each run's settings are written to ``OUT/<run>.yaml`` and the run starts as ``pretrain_vqmoe.py --config-file
OUT/<run>.yaml`` under ``--launcher`` (``none``: one plain process; ``torchrun``, ``deepspeed``, ``mpirun``:
``--nproc`` ranks; ``slurm``: one submitit job per run, requeued on pre-emption, ``--slurm KEY=VALUE`` for the
executor's parameters, ``cluster=local`` for submitit's local executor); ``--parallel N`` runs N local runs at
once.  A run lives in ``OUT/<run>/`` and logs to ``OUT/<run>.log``.  The sweep is resumable: a run with
``results.json`` is skipped, a run with a checkpoint restarts from it with ``--load``, any other started run starts
again.  SIGINT/SIGTERM stop the sweep: every live run saves its step and exits.

Before any run starts, every run's config file is read by the driver's own parser and its task built in this
process, so a bad setting fails at once (one ``error:`` line, exit status 2); so does an OUT folder whose
``sweep.json`` records another grid.  A sweep may extend the one in OUT -- more ``--seeds``, arms or override sets,
every other setting the same -- and then runs only what is new; its report covers every run in OUT.

Outputs, rewritten after every sweep (``--report-only``: only these, from the runs in OUT): ``OUT/sweep.csv``,
``OUT/sweep.md`` (per arm: BPC, parameters, routes and FLOPs per token, training FLOPs, tokens/s, wall time; paired
differences with 95% Student t intervals, TOST equivalence at ``--margin``, and whether each pair is
compute-matched; steps and FLOPs to ``--target-bpc``), ``OUT/valid_curve.png``, ``OUT/bpc_vs_flops.png`` and
``OUT/test_bpc.png``.  Exit status: 0 every run finished, 1 some run failed (see its log; rerunning retries it),
2 bad input, 130 stopped by a signal.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from typing import Any, Dict, Optional, Sequence

from .grid import build_grid, check_grid, check_out, config_path, grid_from_record, run_dir, write_config, write_sweep
from .presets import PRESETS, SweepError
from .report import ReportOptions, comparisons_for, write_reports
from .runner import LAUNCHERS, Runner, SlurmRunner, driver_argv, finished, launch_cmd, resumable
from .settings import DriverSettings


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise SweepError(f"{message} (see tools/sweep.py --help)")


def _slurm_params(items: Sequence[str]) -> Dict[str, Any]:
    import yaml

    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SweepError(f"--slurm {item!r} is not KEY=VALUE: write it like slurm_partition=gpu or timeout_min=600")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    epilog = "presets:\n" + "\n".join(
        f"  {name:14} {p.description}\n  {'':14} arms {' '.join(p.routers)}; seeds {' '.join(map(str, p.seeds))}"
        + (f"; override sets {' '.join(g.name for g in p.groups)}" if any(g.name for g in p.groups) else "")
        for name, p in PRESETS.items())
    p = _Parser(prog="tools/sweep.py", description=__doc__, epilog=epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--preset", help="the experiment: " + ", ".join(PRESETS))
    p.add_argument("--out", required=True, help="the sweep's folder (runs, logs, sweep.csv/.md/.json, plots)")
    p.add_argument("--routers", nargs="+", help="replace the preset's arms (its arm names, or names of --router)")
    p.add_argument("--seeds", nargs="+", type=int, help="replace the preset's seeds (--seed of each run)")
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="FLAG=VALUE",
                   help="a driver setting for every run, over the preset's value")
    p.add_argument("--vary", nargs="+", action="extend", default=[], metavar="FLAG=V1,V2",
                   help="replace the preset's override sets by the product of these values")
    p.add_argument("--groups", nargs="+", help="run only these override sets of the preset (or of --vary)")
    p.add_argument("--launcher", default="torchrun", help=f"one of {', '.join(LAUNCHERS)} (default torchrun)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (default 1)")
    p.add_argument("--parallel", type=int, default=1, help="local runs at once (default 1)")
    p.add_argument("--slurm", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="--launcher slurm: submitit executor parameters (slurm_partition=..., timeout_min=..., "
                        "gpus_per_node=..., cluster=local for submitit's local executor)")
    p.add_argument("--baseline", help="compare every arm with this one (default: the preset's pairs, else topk when "
                                      "swept, else the first arm)")
    p.add_argument("--margin", type=float, default=0.01, help="TOST equivalence margin in BPC (default 0.01)")
    p.add_argument("--target-bpc", type=float, nargs="+", default=[],
                   help="validation BPC targets for steps-to-target (default: the highest best BPC of a set's runs)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the reports of the sweep in --out from its sweep.json and runs; run nothing")
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
    if args.slurm and args.launcher != "slurm":
        raise SweepError("--slurm sets the Slurm executor's parameters: give it with --launcher slurm")
    if not args.margin > 0:
        raise SweepError(f"--margin {args.margin}: give a TOST margin > 0 in BPC, like 0.01")
    if not args.preset and not args.report_only:
        raise SweepError("--preset is required (or --report-only to rewrite the reports of --out)")
    args.slurm_params = _slurm_params(args.slurm)
    return args


def report_only(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    grid = grid_from_record(out)
    if args.baseline is not None and args.baseline not in grid.routers:
        raise SweepError(f"--baseline {args.baseline} is not among the arms ({', '.join(grid.routers)}): choose one")
    opts = ReportOptions(comparisons_for(grid, args.baseline), args.margin, args.target_bpc)
    for p in write_reports(grid, out, opts):
        print(f"wrote {p}", flush=True)
    return 0


def sweep(args: argparse.Namespace) -> int:
    if args.report_only:
        return report_only(args)
    out = os.path.abspath(args.out)
    ds = DriverSettings()
    grid = build_grid(args.preset, args.routers, args.seeds, args.sets, args.vary, args.extra, args.nproc, ds,
                      args.groups or ())
    if args.baseline is not None and args.baseline not in grid.routers:
        raise SweepError(f"--baseline {args.baseline} is not among the routers ({', '.join(grid.routers)}): choose "
                         f"one of them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SweepError(f"--out {args.out} is a file: give a folder")
    extends = check_out(grid, out)
    check_grid(grid, out, args.launcher, ds)
    if args.dry_run:
        for spec in grid.runs:
            state = ("finished" if finished(run_dir(out, spec)) else
                     "resumes" if resumable(run_dir(out, spec)) else "starts")
            launcher = args.launcher if args.launcher != "slurm" else ("torchrun" if args.nproc > 1 else "none")
            cmd = launch_cmd(launcher, args.nproc, driver_argv(spec, out), 0)[0]
            print(f"{spec.name} ({state}): {shlex.join(cmd)}", flush=True)
        return 0
    os.makedirs(out, exist_ok=True)
    write_sweep(grid, out, ["tools/sweep.py", *(sys.argv[1:] if args.argv is None else args.argv)])
    for spec in grid.runs:  # every run's settings, readable before it starts
        if not finished(run_dir(out, spec)) or not os.path.exists(config_path(out, spec)):
            write_config(out, spec)
    todo = [s for s in grid.runs if not finished(run_dir(out, s))]
    how = (f"{args.parallel} at a time, {args.launcher}" if args.launcher != "slurm" else "one Slurm job each")
    print(f"sweep {grid.preset}: {len(grid.runs)} runs, {len(grid.runs) - len(todo)} finished before, "
          f"{len(todo)} to run ({how}, {args.nproc} rank(s) each) in {out}"
          + (f" (its sweep.json: {len(grid_from_record(out).runs)} runs)" if extends else ""), flush=True)
    if args.launcher == "slurm":
        params = dict(args.slurm_params)
        cluster = params.pop("cluster", None)
        runner = SlurmRunner(out, args.nproc, os.getcwd(), params, cluster)
    else:
        runner = Runner(out, args.launcher, args.nproc, args.parallel, os.getcwd())
    handler_set = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_interrupt) if handler_set else None
    try:
        outcomes, interrupted = runner.run_all(todo)
    finally:
        if handler_set:
            signal.signal(signal.SIGTERM, old)
    reported = grid_from_record(out) if extends else grid  # the folder's report covers every run it holds
    opts = ReportOptions(comparisons_for(reported, args.baseline), args.margin, args.target_bpc, args.launcher)
    for p in write_reports(reported, out, opts):
        print(f"wrote {p}", flush=True)
    if interrupted:
        left = sum(not finished(run_dir(out, s)) for s in grid.runs)
        print(f"error: stopped by a signal: rerun the same command to resume the {left} unfinished runs",
              file=sys.stderr, flush=True)
        return 130
    failed = [o for o in outcomes if o.status not in ("done", "skipped")]
    if failed:
        print(f"error: {len(failed)} of {len(todo)} runs failed ({', '.join(o.name for o in failed[:4])}"
              f"{', ...' if len(failed) > 4 else ''}): see {out}/<run>.log, then rerun the same command to retry them",
              file=sys.stderr, flush=True)
        return 1
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..training.launch import run_tool
    from ..training.loop import INPUT_ERRORS

    status = {"code": 0}

    def body(argv):
        args = parse_args(argv)
        args.argv = None if argv is None else list(argv)
        status["code"] = sweep(args)

    return run_tool(body, argv, (SweepError, *INPUT_ERRORS)) or status["code"]


__all__ = ["main", "parse_args", "sweep"]
