"""--launcher slurm through submitit's local executor: a run is one job; a pre-emption signal mid-run makes the
driver save its step, the job is requeued, and the requeued job resumes from that checkpoint to the end."""
import json
import os
import signal
import time

import pytest

submitit = pytest.importorskip("submitit")

from vqmoe_ds.experiments import DriverSettings, SlurmRunner, build_grid  # noqa: E402
from vqmoe_ds.experiments.grid import run_dir, write_config  # noqa: E402
from vqmoe_ds.training.launch import remove_new_shm, shm_files  # noqa: E402

from tool_loader import load_tool  # noqa: E402


def test_a_preempted_job_is_requeued_and_resumes(tmp_path):
    out = str(tmp_path / "sweep")
    grid = build_grid("seeds", routers=["topk"], seeds=[1],
                      sets=["train-iters=60", "eval-interval=30", "eval-iters=2", "save-interval=2", "log-interval=2",
                            "micro-batch-size=4"],
                      extra=["--corpus-bytes", "50000", "--no-plots"], settings=DriverSettings())
    spec = grid.runs[0]
    write_config(out, spec)
    before = shm_files()
    try:
        runner = SlurmRunner(out, 1, os.getcwd(), {"timeout_min": 10}, cluster="local")
        (_, job), = runner.submit(grid.runs)
        path = run_dir(out, spec)
        deadline = time.time() + 300
        while not os.path.exists(os.path.join(path, "checkpoints", "latest")):  # the run has saved a step
            assert time.time() < deadline and job.state == "RUNNING", (job.state, job.stderr())
            time.sleep(0.5)
        # the pre-emption signal Slurm sends a submitit job's processes, to the job's task (the controller of
        # submitit's local executor stands for Slurm and only watches it)
        task = int(open(f"/proc/{job._process.pid}/task/{job._process.pid}/children").read().split()[0])
        os.kill(task, signal.SIGUSR2)
        result = job.result()
        assert result["status"] == "done", (result, job.stderr())
        res = json.load(open(os.path.join(path, "results.json")))
        assert res["steps"] == 60
        attempts = [json.loads(line) for line in open(os.path.join(path, "sweep_attempts.jsonl"))]
        assert len(attempts) == 2
        assert attempts[0]["exit_status"] == 0 and not attempts[0]["resumed"]  # stopped by the signal, step saved
        assert attempts[1]["resumed"] and attempts[1]["exit_status"] == 0
        log = open(os.path.join(out, spec.name + ".log")).read()
        assert " resume: " in log and f"--config-file {os.path.join(out, spec.name + '.yaml')}" in log
    finally:
        remove_new_shm(before)


def test_the_command_line_runs_a_sweep_as_jobs(tmp_path, capsys):
    out = tmp_path / "sweep"
    sweep = load_tool("sweep")
    before = shm_files()
    try:
        assert sweep.main(["--preset", "seeds", "--routers", "vqmoe", "--seeds", "2", "--out", str(out),
                           "--launcher", "slurm", "--slurm", "cluster=local", "timeout_min=10",
                           "--set", "train-iters=2", "eval-interval=2", "eval-iters=1", "save-interval=2",
                           "micro-batch-size=4", "--", "--corpus-bytes", "50000", "--no-plots"]) == 0, capsys.readouterr()
        assert "vqmoe_s2: submitted as job" in capsys.readouterr().out
        assert (out / "vqmoe_s2" / "results.json").exists() and (out / "sweep.md").exists()
        assert list((out / "slurm").iterdir())  # submitit's job folder
    finally:
        remove_new_shm(before)
