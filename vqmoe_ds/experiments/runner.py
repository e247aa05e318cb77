"""Running the grid's unfinished runs: locally (``Runner``: each run one process group started by a launcher,
``parallel`` at a time) or on a Slurm cluster (``SlurmRunner``: one submitit job per run, requeued on
pre-emption).

A run starts with ``pretrain_vqmoe.py --config-file OUT/<run>.yaml``; a run with ``results.json`` is finished and
skipped; a run with a checkpoint (``checkpoints/latest``) restarts from it with ``--load``; any other started run
starts again from scratch.  A stop (SIGINT/SIGTERM to the sweep, or a Slurm pre-emption) sends SIGTERM to the
run's process group: the driver saves its step and exits.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..training.launch import DRIVER, bin_path, env_for_ranks, free_port, remove_new_shm, shm_files, torchrun_cmd
from .grid import RunSpec, config_path, run_dir, write_config

LAUNCHERS = ("torchrun", "deepspeed", "mpirun", "none", "slurm")


def finished(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "results.json"))


def resumable(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "checkpoints", "latest"))


def driver_argv(spec: RunSpec, out: str) -> List[str]:
    """The run's driver command line: its config file, and ``--load`` when it has a checkpoint to restart from."""
    path = run_dir(out, spec)
    resume = ["--load", os.path.join(path, "checkpoints")] if resumable(path) and not finished(path) else []
    return ["--config-file", config_path(out, spec), *resume]


def launch_cmd(launcher: str, nproc: int, args: List[str], port: int) -> Tuple[List[str], Dict[str, str]]:
    """(command, extra environment) of one run under a local ``launcher``."""
    if launcher == "none":
        return [sys.executable, DRIVER, *args], {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                                 "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                                 "MASTER_PORT": str(port)}
    if launcher == "torchrun":
        return torchrun_cmd(nproc, args, port), {}
    if launcher == "deepspeed":
        return [bin_path("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), DRIVER, *args], {}
    if launcher != "mpirun":
        raise ValueError(f"launch_cmd: no local launcher {launcher!r}")
    cmd = ["mpirun", "-np", str(nproc), "--oversubscribe", "--bind-to", "none"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for var in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "PYTHONPATH", "OMP_NUM_THREADS", "TMPDIR",
                "PYTHONUNBUFFERED"):  # the ranks' environment (run_env sets all but DS_ACCELERATOR)
        if var != "DS_ACCELERATOR" or var in os.environ:
            cmd += ["-x", var]
    return [*cmd, sys.executable, DRIVER, *args, "--distributed-port", str(port)], {}


def run_env(tmp: str, threads: int, extra: Mapping[str, str]) -> Dict[str, str]:
    env = env_for_ranks(tmp, threads)
    if "DS_ACCELERATOR" not in os.environ:  # let DeepSpeed pick the accelerator of this machine
        env.pop("DS_ACCELERATOR", None)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra)
    return env


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # kept across exec, by the driver and its ranks


@dataclass
class Outcome:
    name: str
    status: str  # "skipped" (finished before), "done", "failed", "stopped"
    seconds: float = 0.0
    code: Optional[int] = None


class RunProcess:
    """One run as one process group: start (or resume) it, wait for it, record the attempt."""

    def __init__(self, out: str, spec: RunSpec, launcher: str, nproc: int, threads: int, cwd: str,
                 ignore_usr2: bool = False):
        self.out, self.spec, self.launcher, self.nproc, self.threads, self.cwd = out, spec, launcher, nproc, threads, cwd
        self.ignore_usr2 = ignore_usr2  # Slurm signals every process of a job: the job's handler stops the run
        self.proc: Optional[subprocess.Popen] = None
        self.outcome: Optional[Outcome] = None

    def start(self) -> subprocess.Popen:
        spec, path = self.spec, run_dir(self.out, self.spec)
        self.resume = resumable(path)
        if not self.resume and os.path.isdir(path):  # started before, nothing to restart from: start again
            shutil.rmtree(path)
        os.makedirs(path, exist_ok=True)
        write_config(self.out, spec)
        self.tmp = tempfile.mkdtemp(prefix="vqmoe_sweep_")
        cmd, extra = launch_cmd(self.launcher, self.nproc, driver_argv(spec, self.out), free_port())
        self.log = open(os.path.join(self.out, spec.name + ".log"), "a")
        self.log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')} "
                       f"{'resume' if self.resume else 'start'}: {shlex.join(cmd)}\n")
        self.log.flush()
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=run_env(self.tmp, self.threads, extra), cwd=self.cwd, start_new_session=True,
                                     preexec_fn=_ignore_usr2 if self.ignore_usr2 else None)
        return self.proc

    def finish(self, stopping=lambda: False) -> Outcome:
        """Wait for the run and record the attempt; ``stopping()``: whether a stop was asked for (the status of a
        run without results is then "stopped")."""
        if self.outcome is not None:
            return self.outcome
        # polling, not Popen.wait: a signal handler (a Slurm job's checkpoint) may wait for the same process while
        # this wait is interrupted, and Popen.wait would hold its lock through the interruption
        while self.proc.poll() is None:
            time.sleep(0.2)
        if self.outcome is not None:  # a signal handler finished it meanwhile
            return self.outcome
        code = self.proc.returncode
        seconds = time.time() - self.t0
        self.log.write(f"# exit status {code} after {seconds:.1f} s\n")
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        path = run_dir(self.out, self.spec)
        with open(os.path.join(path, "sweep_attempts.jsonl"), "a") as f:
            f.write(json.dumps({"start": self.t0, "seconds": seconds, "exit_status": code, "resumed": self.resume})
                    + "\n")
        status = "done" if finished(path) else ("stopped" if stopping() else "failed")
        self.outcome = Outcome(self.spec.name, status, seconds, code)
        return self.outcome

    def stop(self) -> None:
        """SIGTERM to the run's process group: the driver saves its step and exits."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass


class Runner:
    """Runs the grid's unfinished runs, ``parallel`` at a time, each as its own process group (so that a stop
    reaches every rank of it and nothing else)."""

    def __init__(self, out: str, launcher: str, nproc: int, parallel: int, cwd: str):
        self.out, self.launcher, self.nproc, self.parallel, self.cwd = out, launcher, nproc, parallel, cwd
        self.threads = max(1, (os.cpu_count() or 1) // (parallel * nproc))
        self.live: Dict[str, RunProcess] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def run(self, spec: RunSpec) -> Outcome:
        if finished(run_dir(self.out, spec)):
            return Outcome(spec.name, "skipped")
        rp = RunProcess(self.out, spec, self.launcher, self.nproc, self.threads, self.cwd)
        before = shm_files() if self.parallel == 1 else None
        with self.lock:
            if self.stopping:
                return Outcome(spec.name, "stopped")
            print(f"{spec.name}: {'resuming from its checkpoint' if resumable(run_dir(self.out, spec)) else 'starting'}",
                  flush=True)
            rp.start()
            self.live[spec.name] = rp
        try:
            outcome = rp.finish(lambda: self.stopping)
        finally:
            with self.lock:
                self.live.pop(spec.name, None)
            if before is not None:
                remove_new_shm(before)
        print(f"{spec.name}: {outcome.status} after {outcome.seconds:.1f} s"
              + (f" (exit status {outcome.code}; see {spec.name}.log)" if outcome.status == "failed" else ""),
              flush=True)
        return outcome

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            live = list(self.live.values())
        for rp in live:
            rp.stop()

    def run_all(self, runs: Sequence[RunSpec]) -> Tuple[List[Outcome], bool]:
        """(outcomes, stopped by a signal)."""
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
                        print("stopping: every live run saves its step; rerun the same command to resume", flush=True)
                    self.stop()
        finally:
            pool.shutdown(wait=True)
            if shm_before is not None:
                remove_new_shm(shm_before)
        return [f.result() for f in futures], interrupted


# ---- Slurm (submitit) --------------------------------------------------------------------------------------------
class RunJob:
    """One run as a submitit job: ``__call__`` runs it to the end (resuming from its checkpoint when it has one);
    on pre-emption or time-out (Slurm's USR2, which the driver's processes ignore) submitit calls ``checkpoint``,
    which stops the run with SIGTERM (the driver saves its step) and hands submitit this same job to requeue.
    Ranks: ``nproc`` on the job's node, through torchrun (one rank: no launcher)."""

    def __init__(self, out: str, spec: RunSpec, nproc: int, cwd: str):
        self.out, self.spec, self.nproc, self.cwd = out, spec, nproc, cwd
        self._run: Optional[RunProcess] = None

    def __call__(self) -> Dict[str, Any]:
        if finished(run_dir(self.out, self.spec)):
            return {"name": self.spec.name, "status": "skipped"}
        threads = max(1, (os.cpu_count() or 1) // self.nproc)
        self._run = RunProcess(self.out, self.spec, "torchrun" if self.nproc > 1 else "none", self.nproc, threads,
                               self.cwd, ignore_usr2=True)
        self._run.start()
        o = self._run.finish()
        return {"name": o.name, "status": o.status, "seconds": o.seconds, "exit_status": o.code}

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        if self._run is not None and self._run.proc is not None:
            self._run.stop()  # the driver saves its step and exits
            self._run.finish(lambda: True)
        return DelayedSubmission(RunJob(self.out, self.spec, self.nproc, self.cwd))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_run"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._run = None


def make_executor(folder: str, cluster: Optional[str], params: Mapping[str, Any]):
    """A submitit executor for ``folder``: Slurm (``cluster`` None: submitit's choice, Slurm where sbatch
    exists), or ``"local"`` (submitit's local executor, which runs the jobs as processes of this machine)."""
    import submitit

    if cluster == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(**{k: v for k, v in params.items() if k in ("timeout_min", "signal_delay_s")})
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
    ex.update_parameters(**params)
    return ex


class SlurmRunner:
    """One job per unfinished run, all submitted at once; waits for them all."""

    def __init__(self, out: str, nproc: int, cwd: str, params: Mapping[str, Any], cluster: Optional[str] = None):
        self.out, self.nproc, self.cwd = out, nproc, cwd
        defaults = {"timeout_min": 24 * 60, "slurm_signal_delay_s": 120, "tasks_per_node": 1, "nodes": 1}
        if cluster == "local":
            defaults = {"timeout_min": 24 * 60}
        self.executor = make_executor(os.path.join(out, "slurm"), cluster, {**defaults, **params})
        self.jobs: List[Tuple[RunSpec, Any]] = []

    def submit(self, runs: Sequence[RunSpec]) -> List[Tuple[RunSpec, Any]]:
        for spec in runs:
            if finished(run_dir(self.out, spec)):
                continue
            job = self.executor.submit(RunJob(self.out, spec, self.nproc, self.cwd))
            print(f"{spec.name}: submitted as job {job.job_id}", flush=True)
            self.jobs.append((spec, job))
        return self.jobs

    def run_all(self, runs: Sequence[RunSpec]) -> Tuple[List[Outcome], bool]:
        self.submit(runs)
        outcomes, interrupted = [], False
        try:
            for spec, job in self.jobs:
                try:
                    res = job.result()
                    outcomes.append(Outcome(spec.name, res.get("status", "failed"), res.get("seconds", 0.0),
                                            res.get("exit_status")))
                except Exception as e:  # noqa: BLE001 -- a job that died: its run is failed, the sweep goes on
                    print(f"{spec.name}: job {job.job_id} ended without a result ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})", flush=True)
                    outcomes.append(Outcome(spec.name, "done" if finished(run_dir(self.out, spec)) else "failed"))
        except KeyboardInterrupt:
            interrupted = True
            print("stopping: the jobs are cancelled (each run saves its step); rerun the same command to resume",
                  flush=True)
            for _, job in self.jobs:
                job.cancel(check=False)
        return outcomes, interrupted


__all__ = ["LAUNCHERS", "Outcome", "Runner", "RunProcess", "RunJob", "SlurmRunner", "make_executor", "finished",
           "resumable", "driver_argv", "launch_cmd"]
