"""Under a DeepSpeed engine with ZeRO 1 and 2 at ep_size=2 (2 gloo ranks): the router gate, the VQMoE mixing
gate and the codebook receive non-zero gradients and change after a step (DeepSpeed #4482 was a gate that
never trained), and the shared codebook, gradient-trained or EMA with k-means init and dead-code restarts,
stays identical on all ranks although each rank sees different data (one 2-rank process group, an engine per case)."""
import json

import pytest

from dist_helper import run_ranks


CASES = [("1", "grad"), ("2", "grad"), ("2", "ema")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero") / "res.json"
    run_ranks("zero_step.py", str(out), *[f"{stage}:{ema}" for stage, ema in CASES], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage,ema", CASES)
def test_zero_moe_trains_gates_and_keeps_codebook_in_sync(results, stage, ema):
    res = results[f"{stage}:{ema}"]
    assert "error" not in res, res.get("error")
    assert res["grad_norm"]["gate"] > 0 and res["grad_norm"]["mix"] > 0
    assert res["changed"]["gate"] > 1e-4 and res["changed"]["mix"] > 1e-4 and res["changed"]["codebook"] > 1e-4
    if ema == "grad":
        assert res["grad_norm"]["codebook"] > 0
    assert res["codebook_rank_diff"] == 0.0
    assert res["usage_rank_diff"] == 0.0


def test_an_expert_without_tokens_still_gets_a_zero_gradient():
    """An expert that receives no rows (here: a -1e9 expert bias keeps every token away from expert 3) must still
    take part in the graph: its parameters get a zero gradient, not none.  Under ZeRO the gradient buckets hold
    the parameters that have gradients, so a replicated expert without tokens on one rank only would make the
    ranks reduce buffers of different sizes (gloo: "Received data size doesn't match expected size")."""
    import torch

    from layer_harness import make_layer

    for experts in ("loop", "grouped"):
        layer = make_layer(router="topk", top_k=1, expert_impl=experts, expert_bias=True, drop_tokens=False)
        with torch.no_grad():
            layer.router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, -1e9]))
        y, aux = layer(torch.randn(2, 12, 16))
        (y.square().sum() + aux).backward()
        assert int(layer.stats()["expert_load"][3]) == 0
        for name, p in layer.experts[3].named_parameters():
            assert p.grad is not None, (experts, name)
            assert float(p.grad.abs().max()) == 0.0, (experts, name)


def test_zero1_data_parallel_with_experts_that_get_no_tokens_on_one_rank(tmp_path):
    """2 ranks at ep 1 (experts replicated), ZeRO 1: 8 tokens per rank over 8 top-1 experts, so some expert gets
    none on a rank in most steps; training runs and the loss is finite."""
    import subprocess

    from test_launchers import CPU_CFG, records

    from vqmoe_ds.training.launch import DRIVER, ROOT, env_for_ranks, free_port, remove_new_shm, shm_files, torchrun_cmd

    out = tmp_path / "run"
    args = ["--config", "tiny", "--router", "topk", "--top-k", "1", "--num-experts", "8", "--seq-length", "8",
            "--micro-batch-size", "1", "--deepspeed_config", CPU_CFG, "--train-iters", "6", "--log-interval", "1",
            "--eval-iters", "1", "--test-iters", "1", "--corpus-bytes", "100000", "--no-progress", "--no-plots",
            "--out-dir", str(out)]
    before = shm_files()
    try:
        r = subprocess.run(torchrun_cmd(2, args, free_port(), DRIVER), env=env_for_ranks(str(tmp_path)),
                           capture_output=True, text=True, timeout=240, cwd=ROOT)
    finally:
        remove_new_shm(before)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    loads = [rec for rec in records(out, "train")]
    assert len(loads) == 6
