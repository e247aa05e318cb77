"""Failures during training, with 2 real gloo ranks (ep_size=2, ZeRO 1) started the way torchrun starts them:
  * non-finite losses (on rank 1 only) are skipped by both ranks, counted, and the run stops with one line
    after --max-skipped-steps in a row; the checkpoints left are finite and loadable;
  * SIGTERM to one rank: both finish the step, save it, exit 0;
  * a rank that dies (os._exit) mid-training: the survivor exits non-zero, naming the dead rank, within the
    distributed timeout instead of hanging.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_launchers import CPU_CFG, records, tiny_args

from vqmoe_ds import checkpoint as ckpt
from vqmoe_ds.training.launch import (DRIVER, ROOT, env_for_ranks, free_port, remove_new_shm, shm_files,
                                     torchrun_cmd)

FAULTY = os.path.join(ROOT, "tests", "workers", "faulty.py")  # runs a driver with VQMOE_FAULT's faults


def start_ranks(tmp_path, args, fault=None, nprocs=2, script=DRIVER):
    port = str(free_port())
    procs = []
    for rank in range(nprocs):
        env = env_for_ranks(str(tmp_path))
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if fault:
            env["VQMOE_FAULT"] = fault
        cmd = [sys.executable, FAULTY, script, *args] if fault else [sys.executable, script, *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))
    return procs


def finish(procs, timeout=180):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def small(out, *extra, steps=10):
    return tiny_args(out, "--seq-length", "32", "--eval-iters", "1", "--test-iters", "1", *extra, steps=steps)


def test_non_finite_steps_skipped_then_stop(tmp_path):
    out = tmp_path / "nan"
    before = shm_files()
    procs = start_ranks(tmp_path, small(out, "--save-interval", "2", "--max-skipped-steps", "3"),
                        fault="nan@3@1,nan@5@1,nan@6@1,nan@7@1")
    outs = finish(procs)
    remove_new_shm(before)
    assert [p.returncode for p in procs] == [3, 3], outs[0][1][-3000:]
    errors = [line for line in outs[0][1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 steps in a row" in errors[0] and "--max-skipped-steps 3" in errors[0], outs[0][1]
    skips = records(out, "skip")
    assert [r["step"] for r in skips] == [3, 5, 6, 7]
    assert [r["skipped_in_row"] for r in skips] == [1, 1, 2, 3]
    train = {r["step"]: r for r in records(out, "train")}
    assert sorted(train) == [1, 2, 4]  # the skipped steps are not logged as training steps
    saved = out / "checkpoints"
    assert (saved / "latest").read_text() == "step4"
    ckpt.verify(str(saved), "step4")
    sd = torch.load(saved / "step4" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in sd["module"].values() if torch.is_tensor(v) and v.is_floating_point())
    assert sd["skipped_steps"] == 1  # DeepSpeed counted step 3 as skipped: no optimizer update
    assert not (saved / "best").exists()  # no validation ran: nothing (and nothing NaN) saved as best


def test_sigterm_to_one_rank_saves_and_exits_zero(tmp_path):
    out = tmp_path / "term"
    before = shm_files()
    procs = start_ranks(tmp_path, small(out, "--log-interval", "1", steps=500))
    try:
        log = out / "log.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log.exists() and len([ln for ln in log.read_text().splitlines() if '"train"' in ln]) >= 3:
                break
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        outs = finish(procs, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        remove_new_shm(before)
    assert [p.returncode for p in procs] == [0, 0], (outs[0][1][-2000:], outs[1][1][-2000:])
    assert elapsed < 30
    last = records(out, "train")[-1]["step"]
    assert 3 <= last < 500
    saved = out / "checkpoints"
    assert (saved / "latest").read_text() == f"step{last}"
    assert ckpt.verify(str(saved), f"step{last}")["step"] == last
    assert "stopped by" in outs[0][0] + outs[0][1] + outs[1][0] + outs[1][1]


def test_sigterm_to_torchrun_saves_the_step(tmp_path):
    """SIGTERM to the torchrun agent (not to a rank): it forwards the signal to every rank, the ranks finish the step,
    save it and exit 0; the agent itself then exits 1 with its own SignalException (torchrun's behaviour, as
    docs/training.md says): the saved step is complete and names itself in ``latest``."""
    out = tmp_path / "agent"
    before = shm_files()
    env = env_for_ranks(str(tmp_path))
    agent = subprocess.Popen(torchrun_cmd(2, small(out, "--log-interval", "1", "--moe-expert-parallel-size", "2",
                                                   steps=500), free_port()),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        log = out / "log.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and agent.poll() is None:
            if log.exists() and len([ln for ln in log.read_text().splitlines() if '"train"' in ln]) >= 3:
                break
            time.sleep(0.2)
        agent.send_signal(signal.SIGTERM)
        stdout, stderr = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
        remove_new_shm(before)
    text = stdout + stderr
    assert agent.returncode == 1, text[-3000:]
    assert "SignalException" in text and "got signal: 15" in text
    last = records(out, "train")[-1]["step"]
    assert 3 <= last < 500
    assert f"stopped by SIGTERM after step {last}" in text, text[-3000:]
    saved = out / "checkpoints"
    assert (saved / "latest").read_text() == f"step{last}"
    assert ckpt.verify(str(saved), f"step{last}")["step"] == last


def test_dead_rank_named_by_survivor(tmp_path):
    out = tmp_path / "dead"
    before = shm_files()
    procs = start_ranks(tmp_path, small(out, "--dist-timeout-minutes", "0.5", steps=50), fault="exit@3@1")
    t0 = time.monotonic()
    outs = finish(procs, timeout=120)
    elapsed = time.monotonic() - t0
    remove_new_shm(before)
    assert procs[1].returncode == 1
    assert procs[0].returncode not in (0, None), outs[0][1][-3000:]
    assert elapsed < 110, elapsed  # the 30 s timeout plus start-up (slower on a busy machine), not a hang
    errors = [line for line in outs[0][1].splitlines() if line.startswith("error:")]
    assert errors and "rank(s) 1 stopped" in errors[-1], outs[0][1][-3000:]


def _lr_run(tmp_path, stage, fault):
    out, cfg = tmp_path / f"z{stage}_{bool(fault)}", tmp_path / f"zero{stage}.json"
    ds = json.load(open(CPU_CFG))
    ds["zero_optimization"] = {"stage": stage}
    cfg.write_text(json.dumps(ds))
    before = shm_files()
    procs = start_ranks(tmp_path, small(out, "--deepspeed_config", str(cfg), "--moe-expert-parallel-size", "1",
                                        "--lr-warmup-iters", "3", "--save-interval", "6", steps=6),
                        fault=fault, nprocs=1)
    outs = finish(procs)
    remove_new_shm(before)
    assert procs[0].returncode == 0, outs[0][1][-3000:]
    sd = torch.load(out / "checkpoints" / "step6" / "mp_rank_00_model_states.pt", map_location="cpu",
                    weights_only=False)
    if stage == 0:  # the optimizer state is in the model file: Adam counted only the steps it took
        adam_steps = {float(v["step"]) for v in sd["optimizer"]["state"].values()}
        assert adam_steps == {6.0 - bool(fault)}, adam_steps
    return {r["step"]: r["lr"] for r in records(out, "train")}, sd["skipped_steps"]


@pytest.mark.parametrize("stage", [0, 1])
def test_skipped_step_does_not_advance_the_lr_schedule(tmp_path, stage):
    """A skipped step moves neither the weights nor the LR schedule, at ZeRO 0 (skipped by hand) as at ZeRO 1
    (DeepSpeed's overflow path): after a skip at step 3, steps 4..6 get the lr the clean run had at 3..5."""
    clean, clean_skips = _lr_run(tmp_path, stage, None)
    lrs, skips = _lr_run(tmp_path, stage, "nan@3@0")
    assert (clean_skips, skips) == (0, 1)
    assert sorted(lrs) == [1, 2, 4, 5, 6]
    # the lr step s trained at (peak 3e-3, 3 warmup steps, cosine from step 3 to 3e-4 at step 6)
    cos = lambda p: 3e-4 + (3e-3 - 3e-4) * (1 + math.cos(math.pi * p)) / 2  # noqa: E731
    assert [clean[s] for s in range(1, 7)] == pytest.approx([1e-3, 2e-3, 3e-3, cos(1 / 3), cos(2 / 3), 3e-4])
    assert [lrs[s] for s in (1, 2)] == [clean[1], clean[2]]
    assert [lrs[s] for s in (4, 5, 6)] == [clean[3], clean[4], clean[5]]  # an advanced schedule: cos(1/3) at 4


def test_full_disk_in_a_save_is_one_line_naming_the_last_good_checkpoint(tmp_path):
    """The save of step 4 fails to write ("No space left on device"): the run stops with exit status 3 and one
    line naming the step, the folder and the last complete checkpoint, which is still what `latest` names."""
    out = tmp_path / "full"
    procs = start_ranks(tmp_path, small(out, "--save-interval", "2", "--moe-expert-parallel-size", "1", steps=6),
                        fault="enospc_in_save@4@0", nprocs=1)
    outs = finish(procs)
    assert procs[0].returncode == 3, outs[0][1][-3000:]
    errors = [line for line in outs[0][1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "saving step 4" in errors[0] and "No space left on device" in errors[0], errors
    saved = out / "checkpoints"
    assert f"the last complete checkpoint is {saved / 'step2'}" in errors[0]
    assert (saved / "latest").read_text() == "step2" and "Traceback" not in outs[0][1]
    ckpt.verify(str(saved), "step2")
