"""The one training loop under the image- and text-classification drivers, with 2 real gloo ranks at ep_size 2
(the language-model driver has the same checks in test_failures.py and test_checkpoint_resume.py):

  * a non-finite loss on one rank at step 2 is skipped by both ranks and counted, and the run goes on;
  * resuming from that run's step-3 checkpoint gives its losses of steps 4-6 bit for bit;
  * SIGTERM to one rank: both save the same step, complete (the checkpoint resumes like any other: above), and exit
    0 without testing;
  * a broken checkpoint given to ``--load`` (``--resume`` when fine-tuning, whose ``--load`` is the pretrained
    run) is refused with one line before any step.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from test_failures import finish, start_ranks
from test_finetune_support import CPU_CFG, ROOT, pretrained, source_task

from vqmoe_ds import checkpoint as ckpt
from vqmoe_ds.training.launch import env_for_ranks, free_port, remove_new_shm, shm_files

VISION = os.path.join(ROOT, "train_vision.py")
FINETUNE = os.path.join(ROOT, "finetune_vqmoe.py")
DRIVERS = ["vision", "finetune"]


def driver_args(kind, out, *extra, steps):
    """(script, args, the flag that resumes) of a tiny 2-rank, ep 2 run of ``kind``."""
    common = ["--deepspeed_config", CPU_CFG, "--moe-expert-parallel-size", "2", "--train-iters", str(steps),
              "--log-interval", "1", "--lr", "3e-3", "--micro-batch-size", "16", "--no-progress", "--no-plots",
              "--out-dir", str(out), *extra]
    if kind == "vision":
        return VISION, ["--config", "tiny", "--router", "vqmoe", "--synthetic-train-size", "512", "--valid-size", "64",
                        "--synthetic-test-size", "64", *common], "--load"
    task = source_task()
    return FINETUNE, ["--load", pretrained("vqmoe"), "--mode", "full", "--task", "csv", "--train", task["train"],
                      "--test", task["test"], "--no-drop-tokens", *common], "--resume"


def records(out, kind):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def losses(out):
    return {r["step"]: r["loss"] for r in records(out, "train")}


def run_ranks(tmp_path, script, args, fault=None, expect=(0, 0)):
    before = shm_files()
    try:
        procs = start_ranks(tmp_path, args, fault=fault, script=script)
        outs = finish(procs, timeout=240)
    finally:
        remove_new_shm(before)
    assert tuple(p.returncode for p in procs) == expect, (outs[0][1][-3000:], outs[1][1][-3000:])
    return outs


@pytest.mark.parametrize("kind", DRIVERS)
def test_nan_step_skipped_then_exact_resume(tmp_path, kind):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    script, args, resume_flag = driver_args(kind, full, "--save-interval", "3", steps=6)
    run_ranks(tmp_path, script, args, fault="nan@2@1")
    skips = records(full, "skip")
    assert [(r["step"], r["skipped_total"]) for r in skips] == [(2, 1)]
    a = losses(full)
    assert sorted(a) == [1, 3, 4, 5, 6]  # the skipped step is not logged as a training step
    saved = full / "checkpoints"
    sd = ckpt.verify(str(saved), "step3")
    assert sd["step"] == 3
    (saved / "latest").write_text("step3")
    _, args, _ = driver_args(kind, resumed, resume_flag, str(saved), "--save", str(tmp_path / "ck2"), steps=6)
    run_ranks(tmp_path, script, args)
    b = losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for s in b:
        assert a[s] == b[s], (s, a[s], b[s])
    metric = "acc" if kind == "vision" else "accuracy"
    assert records(full, "test")[-1][metric] == records(resumed, "test")[-1][metric]


@pytest.mark.parametrize("kind", DRIVERS)
def test_sigterm_saves_the_step(tmp_path, kind):
    out = tmp_path / "run"
    script, args, _ = driver_args(kind, out, steps=500)
    log = out / "log.jsonl"
    before = shm_files()
    try:
        procs = start_ranks(tmp_path, args, script=script)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log.exists() and log.read_text().count('"kind": "train"') >= 3:
                break
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        outs = finish(procs, timeout=60)
    finally:
        remove_new_shm(before)
    assert [p.returncode for p in procs] == [0, 0], (outs[0][1][-2000:], outs[1][1][-2000:])
    last = records(out, "train")[-1]["step"]
    assert 3 <= last < 500 and not records(out, "test")
    saved = out / "checkpoints"
    assert (saved / "latest").read_text() == f"step{last}"
    assert ckpt.verify(str(saved), f"step{last}")["step"] == last
    assert "stopped by a signal on another rank" in outs[0][0] + outs[0][1]  # rank 0 logs; rank 1 got it


def _one_process(tmp_path, script, args):
    env = env_for_ranks(str(tmp_path))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    before = shm_files()
    try:
        return subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=180,
                              cwd=ROOT)
    finally:
        remove_new_shm(before)


def _broken_copy(src, dst):
    """A copy of checkpoint folder ``src`` whose latest checkpoint lacks one expert file; returns that file."""
    shutil.copytree(src, dst)
    tag = (dst / "latest").read_text()
    victim = next(f for f in sorted(os.listdir(dst / tag)) if f.startswith("layer_0_expert_1"))
    os.remove(dst / tag / victim)
    return victim


@pytest.mark.parametrize("kind", DRIVERS)
def test_broken_checkpoint_is_one_line_before_any_step(tmp_path, kind):
    if kind == "vision":
        src = tmp_path / "src"
        script, args, _ = driver_args(kind, src, steps=1)
        run_ranks(tmp_path, script, args)
        victim = _broken_copy(src / "checkpoints", tmp_path / "broken")
        _, args, _ = driver_args(kind, tmp_path / "out", "--load", str(tmp_path / "broken"), steps=2)
        args[args.index("--moe-expert-parallel-size") + 1] = "1"
    else:  # fine-tuning: --load names the pretrained run
        victim = _broken_copy(os.path.join(pretrained("vqmoe"), "checkpoints"), tmp_path / "broken")
        script, args, _ = driver_args(kind, tmp_path / "out", steps=2)
        args[args.index("--load") + 1] = str(tmp_path / "broken")
        args[args.index("--moe-expert-parallel-size") + 1] = "1"
    r = _one_process(tmp_path, script, args)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"is missing {victim}" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "log.jsonl").exists()  # no step was taken
