"""A checkpoint folder received from someone else cannot run code: a ``.pt`` file carrying a pickled object whose
``__reduce__`` calls a function (here ``os.mkdir``, so that running it leaves a visible trace) is refused with one
line naming the file and the global, by every entry point that reads checkpoints, and the payload never runs.
The attacker recomputes the marker's sizes and checksums, so only the content check can catch it.

Also: checkpoints of the earlier format (numpy RNG state in the rank files) still resume, and DeepSpeed's own
``load_checkpoint`` reads through the safe reader even when the loop's pre-check is bypassed."""
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tool_loader import load_tool

from vqmoe_ds import checkpoint as ckpt
from vqmoe_ds.training.launch import DRIVER, ROOT, env_for_ranks, free_port, remove_new_shm, shm_files

BASE = ["--corpus-bytes", "60000", "--train-iters", "2", "--eval-iters", "1", "--test-iters", "1", "--no-progress",
        "--no-plots", "--seq-length", "32", "--save-interval", "1"]


class Payload:
    """Pickles as ``os.mkdir(trace)``: unpickling it with plain pickle creates the folder ``trace``."""

    def __init__(self, trace):
        self.trace = str(trace)

    def __reduce__(self):
        return (os.mkdir, (self.trace,))


def _run(tmp, name, *argv):
    env = env_for_ranks(str(tmp))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    before = shm_files()
    try:
        r = subprocess.run([sys.executable, DRIVER, *BASE, *argv, "--out-dir", str(tmp / name)], env=env,
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        remove_new_shm(before)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A top-2 SMoE run at ZeRO 1 (model, expert, optimizer and rank files) and a dense run (for --upcycle-from)."""
    tmp = tmp_path_factory.mktemp("safety")
    return {"moe": _run(tmp, "moe", "--router", "topk"), "dense": _run(tmp, "dense", "--router", "dense")}


def _file_of(kind, step):
    """The file of ``kind`` in a checkpoint folder (a dense model at ZeRO 0 keeps its optimizer in the model file)."""
    names = sorted(os.listdir(step))
    if kind == "optimizer" and not any(n.endswith("optim_states.pt") for n in names):
        kind = "model"
    pick = {"model": lambda n: n == ckpt.MODEL_FILE,
            "expert": lambda n: n.startswith("layer_1_expert_"),
            "optimizer": lambda n: n.endswith("optim_states.pt"),
            "rank": lambda n: n == ckpt.rank_file(0)}[kind]
    return step / [n for n in names if pick(n)][0]


def poison(run, kind, tmp_path, trace):
    """A copy of ``run``'s checkpoints whose ``kind`` file (in every complete tag) carries the payload; the markers'
    sizes and checksums recomputed.  Returns the copy's run folder."""
    dst = tmp_path / f"poisoned_{kind}"
    shutil.copytree(run, dst)
    ck = dst / "checkpoints"
    for tag in os.listdir(ck):
        step = ck / tag
        if not (step / ckpt.MARKER).is_file():
            continue
        victim = _file_of(kind, step)
        state = torch.load(victim, map_location="cpu", weights_only=False)  # our own file: trusted here
        state["extra"] = Payload(trace)
        torch.save(state, victim)
        marker = json.loads((step / ckpt.MARKER).read_text())
        marker["files"][victim.name] = victim.stat().st_size
        marker["sha256"][victim.name] = hashlib.sha256(victim.read_bytes()).hexdigest()
        (step / ckpt.MARKER).write_text(json.dumps(marker))
    return dst


def _lm(tmp_path, *argv):
    from vqmoe_ds.training.lm import main

    return main([*BASE, "--out-dir", str(tmp_path / "out"), *argv])


def _csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nhello there,a\nworld of text,b\n" * 8)
    return str(path)


ENTRY_POINTS = {
    "resume": lambda t, r, d: _lm(t, "--router", "topk", "--train-iters", "3", "--load", str(r / "checkpoints")),
    "finetune --load": lambda t, r, d: __import__("vqmoe_ds.finetune.task", fromlist=["main"]).main(
        ["--train-iters", "2", "--no-progress", "--out-dir", str(t / "fout"), "--load", str(r), "--task", "csv",
         "--train", _csv(t), "--test", _csv(t)]),
    "--upcycle-from": lambda t, r, d: _lm(t, "--router", "topk", "--upcycle-from", str(d)),
    "export safetensors": lambda t, r, d: load_tool("export_checkpoint").main(
        ["--load", str(r / "checkpoints"), "--out", str(t / "m.safetensors")]),
    "export hf": lambda t, r, d: load_tool("export_checkpoint").main(
        ["--load", str(r / "checkpoints"), "--out", str(t / "hf"), "--format", "hf"]),
    "generate": lambda t, r, d: load_tool("generate").main(["--load", str(r), "--tokens", "2"]),
    "reshard": lambda t, r, d: load_tool("reshard_checkpoint").main(
        ["--load", str(r / "checkpoints"), "--out", str(t / "re"), "--world-size", "1", "--ep-size", "1"]),
    "analyze_routing": lambda t, r, d: load_tool("analyze_routing").main(
        ["--load", str(r), "--out-dir", str(t / "an"), "--max-tokens", "64", "--no-plots"]),
    "convert_to_vqmoe": lambda t, r, d: load_tool("convert_to_vqmoe").main(
        ["--load", str(r), "--out-dir", str(t / "cv")]),
    "embed": lambda t, r, d: load_tool("embed").main(["--load", str(r), "--sts", _csv(t)]),
}
KINDS = ("model", "expert", "optimizer", "rank")


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_poisoned_file_is_refused_by_every_entry_point_without_running(runs, tmp_path, capsys, kind, entry):
    trace = tmp_path / "payload_ran"
    dense_kind = kind if kind != "expert" else "model"  # a dense run has no expert files
    if entry == "--upcycle-from":
        src, dense = runs["moe"], poison(runs["dense"], dense_kind, tmp_path, trace)
    else:
        src, dense = poison(runs["moe"], kind, tmp_path, trace), runs["dense"]
    assert not trace.exists()
    try:
        rc = ENTRY_POINTS[entry](tmp_path, src, dense)
    except SystemExit as e:  # argparse-style tools exit themselves
        rc = e.code
    err = capsys.readouterr().err
    assert not trace.exists(), f"the payload ran in {entry}"
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and "holds the Python object posix.mkdir" in lines[0] and "refused" in lines[0], err[-3000:]
    assert "Traceback" not in err


def test_the_payload_is_live(runs, tmp_path):
    """The poisoned file really runs its payload under plain unpickling (so the test above can fail)."""
    trace = tmp_path / "payload_ran"
    src = poison(runs["moe"], "model", tmp_path, trace)
    step = src / "checkpoints" / "step2"
    torch.load(step / ckpt.MODEL_FILE, map_location="cpu", weights_only=False)
    assert trace.is_dir()


@pytest.mark.parametrize("kind", KINDS)
def test_deepspeed_engine_loads_through_the_safe_reader(runs, tmp_path, kind):
    """``checkpoint.load`` on a poisoned folder, with no pre-check: DeepSpeed's ``load_checkpoint`` reads every file
    through the safe reader, so the payload still never runs."""
    import deepspeed

    from vqmoe_ds.models import ModelConfig, build_model
    from vqmoe_ds.parallel import init_single_process

    trace = tmp_path / "payload_ran"
    src = poison(runs["moe"], kind, tmp_path, trace)
    marker = json.loads((src / "checkpoints" / "step2" / ckpt.MARKER).read_text())
    init_single_process()
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(marker["model_config"]))
    ds_config = json.loads((runs["moe"] / "ds_config.json").read_text())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    with pytest.raises(ckpt.CheckpointError, match="holds the Python object posix.mkdir"):
        ckpt.load(engine, str(src / "checkpoints"), tag="step2", resume=True, model=model)
    assert not trace.exists()


def test_read_states_allows_exactly_what_deepspeed_and_numpy_arrays_need(tmp_path):
    """Plain states load; an object of any other class is refused by name, whichever format torch wrote."""
    ok = {"w": torch.ones(3), "step": 4, "shape": torch.Size([2, 3]), "rng": np.arange(5, dtype=np.uint32)}
    torch.save(ok, tmp_path / "ok.pt")
    back = ckpt.read_states(str(tmp_path / "ok.pt"))
    assert back["step"] == 4 and torch.equal(back["w"], torch.ones(3)) and back["rng"].tolist() == [0, 1, 2, 3, 4]
    trace = tmp_path / "ran"
    for name, zipped in (("zip.pt", True), ("legacy.pt", False)):
        torch.save({"x": Payload(trace)}, tmp_path / name, _use_new_zipfile_serialization=zipped)
        with pytest.raises(ckpt.CheckpointError, match=rf"{name} holds the Python object posix.mkdir"):
            ckpt.read_states(str(tmp_path / name))
    torch.save({"x": random.Random(0)}, tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="holds the Python object random.Random"):
        ckpt.read_states(str(tmp_path / "other.pt"))
    assert not trace.exists()


def test_a_checkpoint_of_the_earlier_format_still_resumes(runs, tmp_path):
    """Rank files written the earlier way (numpy's RNG state as its own tuple with an ndarray) resume, and the
    numpy RNG comes back exactly."""
    src = tmp_path / "old"
    shutil.copytree(runs["moe"], src)
    step = src / "checkpoints" / "step2"
    rank0 = step / ckpt.rank_file(0)
    state = torch.load(rank0, map_location="cpu", weights_only=False)
    rs = np.random.RandomState(77)
    rs.random_sample(3)
    state["rng"]["numpy"] = rs.get_state()  # the earlier format: ('MT19937', ndarray, pos, has_gauss, gauss)
    torch.save(state, rank0)
    marker = json.loads((step / ckpt.MARKER).read_text())
    marker["files"][rank0.name] = rank0.stat().st_size
    marker["sha256"][rank0.name] = hashlib.sha256(rank0.read_bytes()).hexdigest()
    (step / ckpt.MARKER).write_text(json.dumps(marker))
    back = ckpt.read_states(str(rank0))
    from vqmoe_ds.checkpoint.store import set_rng_state

    set_rng_state(back["rng"])
    assert np.random.random_sample() == rs.random_sample()
    rc = _lm(tmp_path, "--router", "topk", "--train-iters", "3", "--load", str(src / "checkpoints"))
    assert rc == 0
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [3]


def test_tools_verify_a_checkpoint_once(runs, tmp_path, monkeypatch, capsys):
    """A tool reads (and hashes) a checkpoint's files once: read_run verifies, and the model is loaded from that
    verified run, not read again."""
    from vqmoe_ds.checkpoint import layout

    calls = []
    real = layout.file_digest
    monkeypatch.setattr(layout, "file_digest", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    assert load_tool("generate").main(["--load", str(runs["moe"]), "--tokens", "2"]) == 0
    capsys.readouterr()
    assert calls and len(calls) == len(set(calls)), sorted(calls)
