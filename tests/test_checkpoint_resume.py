"""Crash-safe saves and exact resume at 2 ranks, ep_size=2 (real torchrun processes).

Case 1 (one set of runs, several assertions): Transformer-XL + VQMoE with an EMA codebook and dead-code
restarts, gradient accumulation 2, ZeRO 2.
  * an uninterrupted run saves every 2 steps with --keep-last 2: only the newest two regular checkpoints and
    best remain, each with its completion marker;
  * a second run is killed (SIGKILL, inside the save of step 6, after DeepSpeed wrote its files): ``latest``
    still names step4, the partial save is only a ``.tmp_`` folder;
  * resuming from that folder starts at step 5 and gives the uninterrupted run's losses bit for bit
    (memory, codebook EMA, dead-code counters, RNG, data position, optimizer restored);
  * a checkpoint with a file deleted is refused with a one-line error naming the file.
Case 2: the shipped default (GPT + VQMoE, ZeRO 1) resumed at step 3: losses, learning rates and validation bit for
bit, the resumed run's config.json names what it loaded; the checkpoint exported to safetensors holds the
checkpoint's tensors, and tools/generate.py (at ep 1) samples the same text from the checkpoint and the export.
Case 3: GPT + SMoE-Dropout (top-k schedule 1 -> 4 over steps 0..6) resumed at step 3, in the middle of the
schedule: bit-exact too.
Case 4: GPT + StableMoE, stage switch at step 2, resumed at step 3: the stage-2 snapshot comes back from the
checkpoint (the distilled parameters moved on after the switch), bit-exact.
"""
import json
import os
import subprocess
import sys

import pytest
from test_launchers import CPU_CFG, records, tiny_args

from vqmoe_ds import checkpoint as ckpt
from vqmoe_ds.training.launch import DRIVER, ROOT, env_for_ranks, free_port, remove_new_shm, shm_files, torchrun_cmd

FAULTY = os.path.join(ROOT, "tests", "workers", "faulty.py")  # runs a driver with VQMOE_FAULT's faults


def _run(cmd, tmp_path, env_extra=None, expect_ok=True, timeout=240):
    before = shm_files()
    env = env_for_ranks(str(tmp_path))
    env.update(env_extra or {})
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    finally:
        remove_new_shm(before)
    if expect_ok:
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def _zero2(tmp_path):
    ds = json.load(open(CPU_CFG))
    ds["zero_optimization"] = {"stage": 2}
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps(ds))
    return str(path)


def txl_args(out, cfg, *extra):
    return tiny_args(out, "--model", "txl", "--seq-length", "16", "--mem-len", "16", "--micro-batch-size", "4",
                     "--gradient-accumulation-steps", "2", "--vq-ema", "--vq-dead-code-threshold", "0.5",
                     "--deepspeed_config", cfg, "--save-interval", "2", "--eval-iters", "1", "--test-iters", "1",
                     *extra, steps=8)


def _losses(out):
    return {r["step"]: r["loss"] for r in records(out, "train")}


def test_kill_during_save_then_exact_resume_txl_vq_ema_zero2(tmp_path):
    cfg = _zero2(tmp_path)
    full, crashed, resumed = tmp_path / "full", tmp_path / "crashed", tmp_path / "resumed"
    _run(torchrun_cmd(2, txl_args(full, cfg, "--keep-last", "2"), free_port()), tmp_path)
    saved = full / "checkpoints"
    assert sorted(n for n in os.listdir(saved) if not n.endswith(".py")) == ["best", "latest", "step6", "step8"]
    assert (saved / "latest").read_text() == "step8"
    for tag in ("best", "step6", "step8"):
        marker = ckpt.verify(str(saved), tag)
        assert "rank0_state.pt" in marker["files"] and "rank1_state.pt" in marker["files"]
        assert any(f.startswith("layer_0_expert_") for f in marker["files"])

    # kill -9 of rank 1 in the middle of the step-6 save (DeepSpeed's files written, marker not yet)
    r = _run(torchrun_cmd(2, [DRIVER, *txl_args(crashed, cfg)], free_port(), script=FAULTY), tmp_path,
             {"VQMOE_FAULT": "kill_in_save@6@1"}, expect_ok=False)
    assert r.returncode != 0
    ck = crashed / "checkpoints"
    assert (ck / "latest").read_text() == "step4"
    assert (ck / ".tmp_step6").is_dir() and not (ck / "step6").exists()
    assert ckpt.resolve(str(ck))[1] == "step4"

    # resume from the crashed run's folder: step 5 onwards equals the uninterrupted run bit for bit
    _run(torchrun_cmd(2, txl_args(resumed, cfg, "--load", str(ck), "--save", str(tmp_path / "ck3")), free_port()),
         tmp_path)
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    for s in b:
        assert a[s] == b[s], (s, a[s], b[s])
    assert records(full, "valid")[-1]["loss"] == records(resumed, "valid")[-1]["loss"]
    assert not (tmp_path / "ck3" / ".tmp_step6").exists()

    # a checkpoint with a file deleted is named on load
    victim = next(f for f in sorted(os.listdir(ck / "step4")) if f.startswith("layer_0_expert_1"))
    os.remove(ck / "step4" / victim)
    with pytest.raises(ckpt.CheckpointError, match=f"missing {victim}"):
        ckpt.verify(str(ck), "step4")
    r = _run(torchrun_cmd(2, txl_args(tmp_path / "bad", cfg, "--load", str(ck)), free_port()), tmp_path,
             expect_ok=False)
    assert r.returncode != 0  # the ranks exit 2; torchrun reports 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    # every rank that finds a bad input says so (the launcher may kill rank 0 first): the same line per rank
    assert len(set(errors)) == 1 and victim in errors[0], r.stderr[-2000:]


def _full_and_resumed(tmp_path, args, steps, resume_at):
    """An uninterrupted run of ``steps`` steps that saves every ``resume_at`` steps, and a run resumed from its
    checkpoint of step ``resume_at``; returns their output folders."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(torchrun_cmd(2, tiny_args(full, *args, "--save-interval", str(resume_at), steps=steps), free_port()), tmp_path)
    (full / "checkpoints" / "latest").write_text(f"step{resume_at}")
    _run(torchrun_cmd(2, tiny_args(resumed, *args, "--save-interval", str(resume_at), "--load",
                                   str(full / "checkpoints"), "--save", str(tmp_path / "ck2"), steps=steps),
                      free_port()), tmp_path)
    return full, resumed


def _same_continuation(full, resumed, first, last):
    a = {r["step"]: r for r in records(full, "train")}
    b = {r["step"]: r for r in records(resumed, "train")}
    assert sorted(b) == list(range(first, last + 1))  # step and data position restored
    for s in b:
        assert a[s]["loss"] == b[s]["loss"], (s, a[s]["loss"], b[s]["loss"])
        assert abs(a[s]["lr"] - b[s]["lr"]) < 1e-12, s  # the scheduler restored
    assert records(full, "valid")[-1]["loss"] == records(resumed, "valid")[-1]["loss"]


SHORT = ("--eval-iters", "1", "--test-iters", "1", "--seq-length", "32")


def test_exact_resume_default_vqmoe_then_export_and_generate(tmp_path):
    full, resumed = _full_and_resumed(tmp_path, SHORT, steps=6, resume_at=3)
    _same_continuation(full, resumed, 4, 6)
    with open(resumed / "config.json") as f:
        assert json.load(f)["run"]["load"] == str(full / "checkpoints")

    # export step6 to safetensors + JSON; tools/generate.py samples the same text from it as from the checkpoint
    from safetensors.torch import load_file

    import torch

    exported = tmp_path / "export" / "model.safetensors"
    tool = os.path.join(ROOT, "tools")
    r = subprocess.run([sys.executable, os.path.join(tool, "export_checkpoint.py"), "--load", str(full / "checkpoints"),
                        "--tag", "step6", "--out", str(exported)], env=env_for_ranks(str(tmp_path)),
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    tensors = load_file(str(exported))
    meta = json.load(open(exported.with_suffix(".json")))
    n_exp = meta["model_config"]["moe"]["num_experts"]
    assert meta["model_config"]["moe"]["ep_size"] == 1 and n_exp == 4
    assert meta["model_config"]["moe"]["router"] == "vqmoe"
    states = torch.load(full / "checkpoints" / "step6" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)
    assert states["tokenizer"] == {"kind": "byte", "vocab_size": 256}  # the checkpoint says how to decode
    dense = states["module"]
    shared = [k for k in dense if k in tensors and "deepspeed_experts" not in k]
    assert len(shared) > 10 and all(torch.equal(dense[k], tensors[k]) for k in shared)
    assert any("codebook" in k for k in shared)
    expert_keys = {k.split("deepspeed_experts.")[1].split(".")[0] for k in tensors if "deepspeed_experts." in k}
    assert expert_keys == {str(e) for e in range(n_exp)}  # every expert gathered at ep 1
    samples = []
    for source in (["--load", str(full / "checkpoints"), "--tag", "step6"], ["--weights", str(exported)]):
        r = subprocess.run([sys.executable, os.path.join(tool, "generate.py"), *source, "--prompt", "7 + 5 = ",
                            "--tokens", "30"], env=env_for_ranks(str(tmp_path)), capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        samples.append(r.stdout[r.stdout.index("7 + 5 = "):])  # DeepSpeed's log lines before it differ
    assert samples[0] == samples[1] and len(samples[0]) > 30


def test_exact_resume_gpt_smoe_dropout_schedule(tmp_path):
    args = ("--router", "smoe_dropout", "--smoe-dropout-k-start", "1", "--smoe-dropout-k-end", "4",
            "--smoe-dropout-k-steps", "6", *SHORT)
    full, resumed = _full_and_resumed(tmp_path, args, steps=6, resume_at=3)  # in the middle of the k schedule
    _same_continuation(full, resumed, 4, 6)


def test_exact_resume_gpt_stablemoe_after_stage_switch(tmp_path):
    """StableMoE switches to its frozen snapshot at step 2; resuming at step 3 must route with the snapshot
    taken at step 2 (saved in buffers), not with the distilled parameters, which Adam kept moving."""
    args = ("--router", "stablemoe", "--top-k", "1", "--stablemoe-stage1-steps", "2", *SHORT)
    full, resumed = _full_and_resumed(tmp_path, args, steps=5, resume_at=3)
    _same_continuation(full, resumed, 4, 5)
