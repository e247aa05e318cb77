"""The driver at 2 ranks with expert parallelism (ep_size=2) under every launcher: torchrun, torchrun as 2
"nodes" on loopback, the deepspeed launcher, mpirun.  Each run trains the tiny VQMoE GPT for 2 steps (4 sequences
x 2 micro-batches per rank); validation, test, checkpoints and the log must be there, every route of both ranks
counted, and the launcher must not change the run: the torchrun run is the reference, the 2-"node" run gives its
losses exactly, the deepspeed launcher at ZeRO 2 its step-1 loss exactly and its step-2 loss to 1e-5.  (That the
loss falls over more steps: test_grouped_experts.py, test_checkpoint_resume.py.)"""
import json
import math
import os
import shutil
import subprocess

import pytest

from vqmoe_ds.training.launch import (DRIVER, bin_path, env_for_ranks, free_port, remove_new_shm, shm_files,
                                      torchrun_cmd)

ROOT = os.path.dirname(DRIVER)
CPU_CFG = os.path.join(ROOT, "ds_configs", "cpu_fp32.json")


def tiny_args(out_dir, *extra, steps=20):
    return ["--config", "tiny", "--router", "vqmoe", "--moe-expert-parallel-size", "2",
            "--deepspeed_config", CPU_CFG, "--train-iters", str(steps), "--log-interval", "1", "--eval-iters", "2",
            "--test-iters", "2", "--corpus-bytes", "200000", "--micro-batch-size", "8", "--lr", "3e-3",
            "--no-progress", "--no-plots", "--out-dir", str(out_dir), *extra]


def run(cmd, tmp_path, timeout=240):
    before = shm_files()
    try:
        r = subprocess.run(cmd, env=env_for_ranks(str(tmp_path)), capture_output=True, text=True, timeout=timeout,
                           cwd=ROOT)
    finally:
        remove_new_shm(before)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def records(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


MICRO, ACCUM, STEPS = "4", "2", 2
LAUNCH_ARGS = ("--micro-batch-size", MICRO, "--gradient-accumulation-steps", ACCUM, "--eval-iters", "1", "--test-iters",
               "1")


def check_run(out_dir, world=2, micro=8, accum=1, steps=20, tokens_per_seq=64):
    train = records(out_dir, "train")
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in train)
    # expert load summed over both ranks: every route of the step's last micro-batch counted (top-2 + 1 discrete
    # route per token)
    assert sum(train[-1]["moe"][0]["expert_load"]) == 3 * micro * tokens_per_seq * world
    assert records(out_dir, "valid") and records(out_dir, "test")
    assert os.path.isdir(os.path.join(out_dir, "checkpoints", "best"))
    info = json.load(open(os.path.join(out_dir, "run_info.json")))
    assert info["world_size"] == world
    ds = json.load(open(os.path.join(out_dir, "ds_config.json")))
    assert ds["train_batch_size"] == micro * accum * world
    return train


def losses(out_dir):
    return [r["loss"] for r in records(out_dir, "train")]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    out = tmp / "run"
    run(torchrun_cmd(2, tiny_args(out, *LAUNCH_ARGS, steps=STEPS), free_port()), tmp)
    return out


def test_torchrun(torchrun_run):
    check_run(torchrun_run, micro=4, accum=2, steps=STEPS)


def test_torchrun_two_nodes_on_loopback(tmp_path, torchrun_run):
    out, port = tmp_path / "run", free_port()
    procs = []
    before = shm_files()
    try:
        for node in (0, 1):
            cmd = [bin_path("torchrun"), "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                   "--master_addr=127.0.0.1", f"--master_port={port}", DRIVER, *tiny_args(out, *LAUNCH_ARGS, steps=STEPS)]
            procs.append(subprocess.Popen(cmd, env=env_for_ranks(str(tmp_path)), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, cwd=ROOT))
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        remove_new_shm(before)
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    check_run(out, micro=4, accum=2, steps=STEPS)
    assert losses(out) == losses(torchrun_run)


def test_deepspeed_launcher_zero2(tmp_path, torchrun_run):
    out, cfg = tmp_path / "run", tmp_path / "zero2.json"
    ds = json.load(open(CPU_CFG))
    ds["zero_optimization"] = {"stage": 2}
    cfg.write_text(json.dumps(ds))
    cmd = [bin_path("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), DRIVER,
           *tiny_args(out, *LAUNCH_ARGS, "--deepspeed_config", str(cfg), steps=STEPS)]
    run(cmd, tmp_path)
    check_run(out, micro=4, accum=2, steps=STEPS)
    a, b = losses(out), losses(torchrun_run)
    assert a[0] == b[0] and abs(a[1] - b[1]) < 1e-5, (a, b)  # ZeRO 2 vs 1: the same update


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed (scripts/install.sh adds it)")
def test_mpirun_transformer_xl(tmp_path):
    out = tmp_path / "run"
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-x", "DS_ACCELERATOR", "-x", "TORCH_EXTENSIONS_DIR", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
            "-x", "TMPDIR", bin_path("python"), DRIVER,
            *tiny_args(out, *LAUNCH_ARGS, "--model", "txl", "--seq-length", "32", "--mem-len", "32",
                       "--distributed-port", str(free_port()), steps=STEPS)]
    run(cmd, tmp_path)
    check_run(out, micro=4, accum=2, steps=STEPS, tokens_per_seq=32)
