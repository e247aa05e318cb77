"""Expert parallelism on 2 real gloo ranks: ep_size=2 gives the ep_size=1 result, outputs and grads, for every router
and routing option; and the host reads that remain at ep 2.  One 2-rank process group runs all cases
(tests/workers/ep_equivalence.py); each case is reported as its own test."""
import pytest
import torch

from dist_helper import run_ranks

CASES = [("top2", "loop"), ("vq", "loop"), ("vqmoe", "loop"), ("vqmoe", "grouped"), ("vqmoe_default", "loop"),
         ("hash", "loop"), ("hash", "grouped"), ("cluster", "loop"), ("zloss", "loop"), ("sigmoid", "loop"),
         ("shared_gate", "loop"), ("residual", "loop"), ("force", "loop"), ("expert_bias", "loop"),
         ("global_aux", "loop"), ("seq_aux", "loop")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ep") / "res")
    run_ranks("ep_equivalence.py", out, *[f"{c}:{d}" for c, d in CASES], timeout=600)
    return [torch.load(f"{out}.{rank}") for rank in range(2)]


@pytest.mark.parametrize("case,experts", CASES)
def test_ep2_equals_ep1(results, case, experts):
    for rank in range(2):
        res = results[rank][f"{case}:{experts}"]
        assert "error" not in res, res.get("error")
        assert len([k for k in res if k.startswith("g:")]) >= 4 - 2 * (case in ("hash", "cluster"))
        bad = {k: v for k, v in res.items() if v > 1e-5}
        assert not bad, (rank, bad)


def test_host_reads_at_ep2(results):
    """With expert parallelism the uneven all-to-all needs its split sizes on the host: per layer forward two
    ``tolist`` (rows sent, rows received), the regrouping of the received rows by expert (``repeat_interleave``
    sized by the received counts) and, under a capacity, the removal of the dropped routes (a boolean index); the
    backward reuses the splits and reads nothing."""
    for rank in range(2):
        reads = results[rank]["host_reads"]
        assert reads["hits"] == {"Tensor.tolist": 2, "repeat_interleave": 1, "index(bool)": 1}, reads
        assert all(w.startswith("moe/dispatch.py") for w in reads["where"]), reads
