"""Expert parallelism on 2 real gloo ranks: ep_size=2 gives the ep_size=1 result, outputs and grads."""
import pytest
import torch

from dist_helper import run_ranks


@pytest.mark.parametrize("case,dispatcher", [("top2", "sorted"), ("vq", "sorted"), ("vqmoe", "sorted"),
                                             ("vqmoe", "deepspeed"), ("vqmoe_default", "sorted"),
                                             ("hash", "sorted"), ("hash", "deepspeed"), ("cluster", "sorted"),
                                             ("zloss", "sorted"), ("sigmoid", "deepspeed"), ("shared_gate", "sorted"),
                                             ("residual", "sorted"), ("force", "sorted"), ("expert_bias", "sorted"),
                                             ("global_aux", "sorted"), ("seq_aux", "sorted")])
def test_ep2_equals_ep1(tmp_path, case, dispatcher):
    out = str(tmp_path / "res")
    run_ranks("ep_equivalence.py", case, dispatcher, out)
    for rank in range(2):
        res = torch.load(f"{out}.{rank}")
        assert len([k for k in res if k.startswith("g:")]) >= 4 - 2 * (case in ("hash", "cluster"))
        bad = {k: v for k, v in res.items() if v > 1e-5}
        assert not bad, (rank, bad)
