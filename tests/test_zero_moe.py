"""Under a DeepSpeed engine with ZeRO 1 and 2 at ep_size=2 (2 gloo ranks): the router gate, the VQMoE mixing
gate and the codebook receive non-zero gradients and change after a step (DeepSpeed #4482 was a gate that
never trained), and the shared codebook, gradient-trained or EMA with k-means init and dead-code restarts,
stays identical on all ranks although each rank sees different data."""
import json

import pytest

from dist_helper import run_ranks


@pytest.mark.parametrize("stage,ema", [("1", "grad"), ("2", "grad"), ("2", "ema")])
def test_zero_moe_trains_gates_and_keeps_codebook_in_sync(tmp_path, stage, ema):
    out = tmp_path / "res.json"
    run_ranks("zero_step.py", stage, ema, str(out))
    res = json.loads(out.read_text())
    assert res["grad_norm"]["gate"] > 0 and res["grad_norm"]["mix"] > 0
    assert res["changed"]["gate"] > 1e-4 and res["changed"]["mix"] > 1e-4 and res["changed"]["codebook"] > 1e-4
    if ema == "grad":
        assert res["grad_norm"]["codebook"] > 0
    assert res["codebook_rank_diff"] == 0.0
    assert res["usage_rank_diff"] == 0.0
