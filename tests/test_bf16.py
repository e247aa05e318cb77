"""bf16 end to end, on the CPU: every router, with the expert loop and the grouped GEMM, gives, in bf16, its fp32 output within bf16's
rounding (the same parameter values and inputs in both: the bf16 ones), with the same routing decisions and exactly
the same expert loads and code counts (counts are never bf16; router scores, codebook distances and the VQ loss are
computed in fp32; the combine accumulates in fp32).  And a 2-rank bf16 ZeRO-2 training run whose loss falls."""
import json
import os
import subprocess

import pytest
import torch

from layer_harness import make_layer

from vqmoe_ds.training.launch import ROOT, env_for_ranks, free_port, remove_new_shm, shm_files, torchrun_cmd

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.002 per value); an expert MLP's two products and the
# combine of 3 routes stay within a few of those.  Measured: the worst relative error over these cases is 0.0028.
REL_TOL = 0.01
CASES = {
    "topk": dict(router="topk"),
    "topk top-1": dict(router="topk", top_k=1),
    "xmoe": dict(router="xmoe"),
    "stablemoe": dict(router="stablemoe"),
    "smoe_dropout": dict(router="smoe_dropout"),
    "hash": dict(router="hash", vocab_size=50),
    "vqmoe (default codebook)": dict(router="vqmoe", codebook_size=8),
    "vqmoe low-dim": dict(router="vqmoe", codebook_size=8, codebook_dim=4),
    "vq (discrete only)": dict(router="vq", codebook_size=8),
    "vqmoe with capacity drops": dict(router="vqmoe", codebook_size=8, drop_tokens=True, capacity_factor=1.0,
                                      min_capacity=1),
}


@pytest.mark.parametrize("experts", ["loop", "grouped"])
@pytest.mark.parametrize("name", list(CASES))
def test_bf16_layer_matches_its_fp32_run(name, experts):
    layer = make_layer(expert_impl=experts, **CASES[name]).eval()
    g = torch.Generator().manual_seed(4)
    x16 = torch.randn(4, 12, layer.cfg.hidden_size, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 50, (4, 12), generator=g)
    layer16 = layer.to(torch.bfloat16)
    ref = make_layer(expert_impl=experts, **CASES[name]).eval()
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in layer16.state_dict().items()})
    with torch.no_grad():
        y16, aux16 = layer16(x16, None, ids)
        s16 = layer16.stats()
        y32, aux32 = ref(x16.float(), None, ids)
        s32 = ref.stats()
    assert y16.dtype == torch.bfloat16
    rel = ((y16.float() - y32).norm() / y32.norm()).item()
    assert rel < REL_TOL, rel
    assert abs(float(aux16) - float(aux32)) <= 1e-5 + 1e-3 * abs(float(aux32))  # fp32 losses in both
    for key in ("expert_load", "code_counts"):
        if key in s32:
            assert torch.equal(s16[key].float(), s32[key].float()), key  # exact counts


def test_two_rank_bf16_zero2_training_loss_falls(tmp_path):
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "cpu_fp32.json")))
    cfg.update(bf16={"enabled": True}, zero_optimization={"stage": 2})
    ds = tmp_path / "bf16_zero2.json"
    ds.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = ["--config", "tiny", "--router", "vqmoe", "--moe-expert-parallel-size", "2", "--deepspeed_config", str(ds),
            "--train-iters", "30", "--log-interval", "1", "--eval-iters", "2", "--test-iters", "2", "--corpus-bytes",
            "200000", "--micro-batch-size", "8", "--lr", "3e-3", "--no-progress", "--no-plots", "--out-dir", str(out)]
    before = shm_files()
    try:
        r = subprocess.run(torchrun_cmd(2, args, free_port()), env=env_for_ranks(str(tmp_path)), capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    finally:
        remove_new_shm(before)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    train = [x for x in map(json.loads, open(out / "log.jsonl")) if x["kind"] == "train"]
    first, last = train[0]["loss"], sum(x["loss"] for x in train[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert all(x["loss"] == x["loss"] for x in train)  # no NaN
