"""tools/estimate_memory.py answers "does it fit?": --gpu-memory-gib gives the verdict for the configuration and a
search over ZeRO stage x ep size x micro-batch, --json echoes the inputs.  References: bytes per parameter counted
by hand from DeepSpeed's accounting (bf16 + Adam), and the tool's own point estimates for the search's edges."""
import json

import pytest

from tool_loader import load_tool

GiB = 2 ** 30


def _run(capsys, *argv):
    tool = load_tool("estimate_memory")
    assert tool.main(list(argv)) == 0
    return capsys.readouterr().out


def _json(capsys, *argv):
    return json.loads(_run(capsys, *argv, "--json").strip().splitlines()[-1])


def test_expert_states_by_hand_and_why_zero2_can_exceed_zero1(capsys):
    from vqmoe_ds.models.configs import count_params, named_config

    experts = count_params(named_config("base"))["experts"]
    # ep = world: the experts' data-parallel group is one rank -- ZeRO 1: 4 + 12 = 16 B, ZeRO 2: 2 + 18 = 20 B
    for zero, per_param in ((1, 16), (2, 20)):
        est = _json(capsys, "--config", "base", "--zero", str(zero), "--ep", "8", "--gpus", "8")
        assert est["expert_states_gib"] == pytest.approx(experts / 8 * per_param / GiB, rel=1e-9)
    # ep 1 on 8 GPUs: dp 8 -- ZeRO 1: 4 + 12/8, ZeRO 2 below it
    z1 = _json(capsys, "--config", "base", "--zero", "1", "--ep", "1", "--gpus", "8")
    z2 = _json(capsys, "--config", "base", "--zero", "2", "--ep", "1", "--gpus", "8")
    assert z1["expert_states_gib"] == pytest.approx(experts * (4 + 12 / 8) / GiB, rel=1e-9)
    assert z2["expert_states_gib"] < z1["expert_states_gib"]


def test_fits_verdict_json_inputs_and_the_search(capsys):
    argv = ["--config", "olmoe-1b-7b", "--zero", "1", "--ep", "8", "--gpus", "8", "--micro-batch", "1",
            "--max-micro-batch", "8"]
    point = _json(capsys, *argv)
    assert point["inputs"]["config"] == "olmoe-1b-7b" and point["inputs"]["seq_length"] == 4096
    assert "fits" not in point
    need = point["total_gib"]
    for gib, fits in ((need + 0.01, True), (need - 0.01, False)):
        out = _json(capsys, *argv, "--gpu-memory-gib", str(gib))
        assert out["fits"] is fits and out["inputs"]["gpu_memory_gib"] == gib and out["total_gib"] == need
    res = _json(capsys, *argv, "--gpu-memory-gib", "40")
    rows = {(r["zero"], r["ep"]): r for r in res["search"]}
    assert set(rows) == {(z, e) for z in (0, 1, 2) for e in (1, 2, 4, 8)}
    for (zero, ep), r in rows.items():  # the largest micro-batch fits, the next power of two does not
        base = ["--config", "olmoe-1b-7b", "--zero", str(zero), "--ep", str(ep), "--gpus", "8"]
        m = r["max_micro_batch"]
        if m is None:
            assert _json(capsys, *base, "--micro-batch", "1")["total_gib"] > 40
            continue
        assert _json(capsys, *base, "--micro-batch", str(m))["total_gib"] <= 40
        if 2 * m <= 8:
            assert _json(capsys, *base, "--micro-batch", str(2 * m))["total_gib"] > 40
    text = _run(capsys, *argv, "--gpu-memory-gib", "40")
    assert "fits in 40 GiB per GPU" in text and "ZeRO 2, ep 8" in text


def test_bad_sizes_are_one_line(capsys):
    tool = load_tool("estimate_memory")
    assert tool.main(["--config", "base", "--ep", "3", "--gpus", "8"]) == 2
    assert tool.main(["--config", "base", "--gpu-memory-gib", "0"]) == 2
    err = capsys.readouterr().err
    assert "--ep 3 does not divide --gpus 8" in err and "--gpu-memory-gib 0.0 must be" in err
