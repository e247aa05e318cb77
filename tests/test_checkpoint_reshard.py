"""tools/reshard_checkpoint.py: a 2-rank ep_size 2 checkpoint of the driver (real torchrun processes) converted to
world 1 / ep 1, then to world 4 / ep 4 and back to world 2 / ep 2.

  * every resharded checkpoint gives the source's logits exactly (all loaded in this process, same input);
  * a 1-rank run resumes from the world-1 checkpoint (fresh optimizer, one notice) with a finite loss near the
    source's last one;
  * experts keep their identity (DeepSpeed #6589): expert e of layer l gets fc1 bias 10*l + e, and after
    resharding each rank of a real 2-rank ep 2 load holds exactly the values of its global experts;
  * bad sources (experts swapped between files, ep not dividing the experts or the world, ep > 1 for a dense
    model, missing or incomplete checkpoint, existing output) are refused with one line.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from dist_helper import run_ranks
from test_launchers import records, tiny_args

from vqmoe_ds import checkpoint as ckpt
from vqmoe_ds.checkpoint.layout import EXPERT_FILE, digests, list_files
from vqmoe_ds.training.launch import ROOT, env_for_ranks, free_port, remove_new_shm, shm_files, torchrun_cmd

TOOL = os.path.join(ROOT, "tools", "reshard_checkpoint.py")
_spec = importlib.util.spec_from_file_location("reshard_checkpoint", TOOL)
reshard_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reshard_tool)


def _torchrun(nproc, args, tmp):
    before = shm_files()
    try:
        r = subprocess.run(torchrun_cmd(nproc, args, free_port()), env=env_for_ranks(str(tmp)), capture_output=True,
                           text=True, timeout=240, cwd=ROOT)
    finally:
        remove_new_shm(before)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def _args(out, *extra, ep=2, steps=3):
    args = tiny_args(out, "--eval-iters", "1", "--test-iters", "1", "--eval-interval", "0", *extra, steps=steps)
    args[args.index("--moe-expert-parallel-size") + 1] = str(ep)
    return args


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-rank, ep_size 2 run of 3 steps; returns (its out dir, its checkpoint folder)."""
    tmp = tmp_path_factory.mktemp("reshard_src")
    _torchrun(2, _args(tmp / "run"), tmp)
    return tmp / "run", tmp / "run" / "checkpoints"


def _reshard(src, out, world, ep):
    return reshard_tool.main(["--load", str(src), "--out", str(out), "--world-size", str(world), "--ep-size", str(ep)])


def _logits(load_dir):
    model, cfg, _ = ckpt.load_for_inference(str(load_dir))
    x = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(x, None, None)[0], model.state_dict()


def test_reshard_2_1_4_2_exact_logits_and_resume(source, tmp_path):
    run, src = source
    one, four, two = tmp_path / "ep1", tmp_path / "ep4", tmp_path / "ep2"
    r = subprocess.run([sys.executable, TOOL, "--load", str(src), "--out", str(one), "--world-size", "1",
                        "--ep-size", "1"], env=env_for_ranks(str(tmp_path)), capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum(line.startswith("notice:") for line in r.stdout.splitlines()) == 1
    assert _reshard(one, four, 4, 4) == 0 and _reshard(four, two, 2, 2) == 0

    for folder, world, ep in ((one, 1, 1), (four, 4, 4), (two, 2, 2)):
        marker = ckpt.verify(str(folder), ckpt.resolve(str(folder))[1])
        assert marker["world_size"] == world and marker["model_config"]["moe"]["ep_size"] == ep
        assert marker["resharded"]["optimizer"] == "fresh"
        assert sorted(f for f in marker["files"] if f.startswith("rank")) == [f"rank{r}_state.pt" for r in range(world)]
        assert not any("optim_states" in f for f in marker["files"])
    data = {f: torch.load(f / "step3" / "mp_rank_00_model_states.pt", weights_only=False)["data"]
            for f in (src, one, four, two)}
    assert data[src]["index"] == 3 * 8  # 3 steps of micro batch 8 per rank at 2 ranks
    assert [data[f]["index"] for f in (one, four, two)] == [48, 12, 24]  # the same 48 samples consumed in all

    ref_logits, ref_state = _logits(src)
    for folder in (one, four, two):
        logits, state = _logits(folder)
        assert torch.equal(logits, ref_logits), folder
        assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)

    # training goes on at 1 rank, ep 1 from the world-1 checkpoint: fresh optimizer, step and data kept
    resumed = tmp_path / "resumed"
    r = _torchrun(1, _args(resumed, "--load", str(one), ep=1, steps=5), tmp_path)
    assert sum("notice:" in line and "resharded" in line for line in (r.stdout + r.stderr).splitlines()) == 1
    before, after = records(run, "train"), records(resumed, "train")
    assert [x["step"] for x in after] == [4, 5]
    first = after[0]["loss"]
    assert torch.isfinite(torch.tensor([x["loss"] for x in after])).all()
    assert abs(first - before[-1]["loss"]) < 0.5 and first < before[0]["loss"] - 0.2, (before, after)
    marker = ckpt.verify(str(resumed / "checkpoints"), "step5")  # its own saves are ordinary again
    assert "resharded" not in marker and any("optim_states" in f for f in marker["files"])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _remark(folder, tag="step3"):
    """Rewrite the completion marker after a test edited files (sizes may change)."""
    path = folder / tag / ckpt.MARKER
    marker = json.loads(path.read_text())
    marker["files"] = {k: v for k, v in list_files(str(folder / tag)).items() if k != ckpt.MARKER}
    marker["sha256"] = digests(str(folder / tag), list(marker["files"]))
    path.write_text(json.dumps(marker))


def test_reshard_keeps_every_expert_with_its_id(source, tmp_path):
    _, src = source
    marked = _copy(src, tmp_path / "marked")
    for name in os.listdir(marked / "step3"):
        m = EXPERT_FILE.match(name)
        if m:
            layer, e = map(int, m.groups())
            state = torch.load(marked / "step3" / name, weights_only=False)
            key = next(k for k in state if k.endswith(f"deepspeed_experts.{e}.fc1.bias"))
            state[key].fill_(10 * layer + e)
            torch.save(state, marked / "step3" / name)
    _remark(marked)
    assert _reshard(marked, tmp_path / "m2", 2, 2) == 0 and _reshard(marked, tmp_path / "m1", 1, 1) == 0

    out = tmp_path / "experts.json"
    run_ranks("reshard_load.py", str(tmp_path / "m2"), "2", str(out), nprocs=2)
    seen = {}
    for rank in range(2):
        got = json.loads((tmp_path / f"experts.json.{rank}").read_text())
        assert got["step"] == 3
        assert sorted(got["experts"]) == sorted(f"{layer}:{2 * rank + i}" for layer in (0, 1) for i in (0, 1))
        seen.update(got["experts"])
    assert seen == {f"{layer}:{e}": 10.0 * layer + e for layer in (0, 1) for e in range(4)}

    model, _, _ = ckpt.load_for_inference(str(tmp_path / "m1"))
    biases = {k: v for k, v in model.state_dict().items() if k.endswith("fc1.bias") and "deepspeed_experts" in k}
    assert len(biases) == 8
    for k, v in biases.items():
        layer = int(k.split("blocks.")[1].split(".")[0])
        e = int(k.split("deepspeed_experts.")[1].split(".")[0])
        assert torch.all(v == 10 * layer + e), k


def _error(capsys, *argv):
    assert reshard_tool.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_reshard_refuses_bad_sources(source, tmp_path, capsys):
    _, src = source
    # the #6589 shape of damage: expert 2's weights in the file of expert 1 (same size: the marker still agrees)
    swapped = _copy(src, tmp_path / "swapped")
    a, b = (swapped / "step3" / f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in (1, 2))
    tmp = a.with_suffix(".x")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)
    with pytest.raises(ckpt.CheckpointError, match="layer_0_expert_1_.* does not match the checksum"):
        ckpt.verify(str(swapped), "step3")  # files swapped after the save: their checksums say so
    _remark(swapped)  # a save that wrote experts to the wrong files (#6589) has matching checksums: the tool checks
    ckpt.verify(str(swapped), "step3")
    msg = _error(capsys, "--load", swapped, "--out", tmp_path / "o", "--world-size", "1", "--ep-size", "1")
    assert "layer_0_expert_1_mp_rank_00_model_states.pt holds" in msg and "(expert 2 of" in msg, msg
    assert not (tmp_path / "o" / "step3").exists()

    msg = _error(capsys, "--load", src, "--out", tmp_path / "o", "--world-size", "3", "--ep-size", "3")
    assert "--ep-size 3 does not divide the 4 experts" in msg
    msg = _error(capsys, "--load", src, "--out", tmp_path / "o", "--world-size", "3", "--ep-size", "2")
    assert "does not divide --world-size 3" in msg
    # a dense model's checkpoint (no expert files; the marker's model says router "dense", num_experts still 4)
    dense = _copy(src, tmp_path / "dense")
    for f in (dense / "step3").iterdir():
        if EXPERT_FILE.match(f.name):
            f.unlink()
    marker_path = dense / "step3" / ckpt.MARKER
    marker = json.loads(marker_path.read_text())
    marker["model_config"]["moe"]["router"] = "dense"
    marker_path.write_text(json.dumps(marker))
    _remark(dense)
    msg = _error(capsys, "--load", dense, "--out", tmp_path / "o", "--world-size", "2", "--ep-size", "2")
    assert "has a dense model without experts; use --ep-size 1" in msg, msg
    assert not (tmp_path / "o" / "step3").exists()
    msg = _error(capsys, "--load", tmp_path / "nowhere", "--out", tmp_path / "o", "--world-size", "1", "--ep-size", "1")
    assert "does not exist" in msg
    incomplete = _copy(src, tmp_path / "incomplete")
    os.remove(incomplete / "step3" / ckpt.MARKER)
    msg = _error(capsys, "--load", incomplete, "--out", tmp_path / "o", "--world-size", "1", "--ep-size", "1")
    assert "is incomplete" in msg
    lacking = _copy(src, tmp_path / "lacking")
    os.remove(lacking / "step3" / "layer_1_expert_3_mp_rank_00_model_states.pt")
    msg = _error(capsys, "--load", lacking, "--out", tmp_path / "o", "--world-size", "1", "--ep-size", "1")
    assert "missing layer_1_expert_3_mp_rank_00_model_states.pt" in msg
    assert _reshard(src, tmp_path / "o", 1, 1) == 0
    msg = _error(capsys, "--load", src, "--out", tmp_path / "o", "--world-size", "1", "--ep-size", "1")
    assert "already exists" in msg
