"""Routing metrics against hand-made cases."""
import math

import torch

from vqmoe_ds.analysis import consistency_score, load_summary, nmi, purity
from vqmoe_ds.moe import MoEConfig


def test_purity_hand_case():
    labels = [0, 0, 0, 1, 1, 1]
    assigned = [5, 5, 7, 7, 7, 7]  # expert 5: {0,0} -> 2; expert 7: {0,1,1,1} -> 3
    assert purity(labels, assigned) == 5 / 6


def test_nmi_extremes_and_hand_case():
    assert math.isclose(nmi([0, 0, 1, 1], [3, 3, 9, 9]), 1.0)
    assert nmi([0, 1, 0, 1], [0, 0, 1, 1]) < 1e-12  # independent
    # L = [0,0,1,1], A = [0,0,0,1]: I = H(A) - H(A|L) = h(1/4) - 1/2 * h(1/2) (nats)
    h = lambda *p: -sum(q * math.log(q) for q in p if q > 0)  # noqa: E731
    i = h(0.75, 0.25) - 0.5 * h(0.5, 0.5)
    assert math.isclose(nmi([0, 0, 1, 1], [0, 0, 0, 1]), i / ((h(0.5, 0.5) + h(0.75, 0.25)) / 2), rel_tol=1e-12)


def test_consistency_hand_case():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    x = torch.tensor([[0.1, 0.0], [9.0, 0.0], [4.0, 0.0], [6.0, 0.0]])
    # the "router" sends x[0] < 5 to expert 0 ... except it sends 4.0 to expert 1
    expert_of = lambda v: torch.where(v[:, 0] < 3.5, 0, 1)  # noqa: E731
    # nearest centres: 0, 1, 0, 1 -> centre experts 0, 1, 0, 1; token experts 0, 1, 1, 1 -> 3/4
    assert consistency_score(expert_of, x, centres) == 0.75


def test_vq_router_is_consistent_with_its_codebook():
    layer = MoEConfig(hidden_size=8, ffn_hidden_size=8, router="vq", num_experts=3, codebook_size=7,
                      vq_distance="l2").build().eval()
    q = layer.vq_router.quantizer
    expert_of = lambda v: layer.vq_router(v).experts_TK[:, 0]  # noqa: E731
    assert consistency_score(expert_of, torch.randn(200, 8), q.codebook.detach()) == 1.0


def test_load_summary():
    s = load_summary([10, 30, 0, 60])
    assert s["min"] == 0 and s["max"] == 0.6 and s["empty_experts"] == 1 and math.isclose(s["max_over_mean"], 2.4)
