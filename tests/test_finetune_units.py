"""Fine-tuning parts against hand-computed cases: pooling, eval sharding, the strict checkpoint remap, and the
expert-FLOPs counter on single MoE layers (dropless, capacity drops, discrete-only)."""
import math

import numpy as np
import pytest
import torch

from vqmoe_ds.analysis import ExpertFlopsCounter
from vqmoe_ds.finetune.data import EncodedSet, eval_batches
from vqmoe_ds.finetune.model import pool
from vqmoe_ds.checkpoint import CheckpointError, StrictRemap
from vqmoe_ds.moe import MoEConfig


def test_pool_mean_and_last():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # h[b, t] = [6b + 2t, 6b + 2t + 1]
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert pool(h, mask, "mean").tolist() == [[1.0, 2.0], [8.0, 9.0]]
    assert pool(h, mask, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]


def test_eval_batches_cover_every_example_once_with_equal_batches_per_rank():
    data = EncodedSet([np.array([i + 1]) for i in range(7)], np.arange(7), ["a"], 0)
    seen, n_batches = [], []
    for rank in range(2):
        batches = list(eval_batches(data, 3, rank, 2))
        n_batches.append(len(batches))
        for idx, mask, labels, w in batches:
            seen += [int(l) for l, wt in zip(labels, w) if wt > 0]
    assert n_batches == [2, 2] and sorted(seen) == list(range(7))


def test_strict_remap_allows_only_the_named_differences():
    src = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "router": torch.nn.Linear(2, 1)})
    dst = torch.nn.ModuleDict({"m": torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2)}), "head": torch.nn.Linear(2, 3)})
    sd = {k: v + 1.0 for k, v in src.state_dict().items()}
    remap = StrictRemap("m.", may_drop=["m.router.*"], may_be_new=["head.*"])
    remap(sd, dst)
    assert torch.equal(dst["m"]["a"].weight, sd["a.weight"])
    assert remap.report["dropped"] == ["m.router.bias", "m.router.weight"]
    with pytest.raises(CheckpointError, match="unexpected key"):
        StrictRemap("m.", may_be_new=["head.*"])(sd, dst)  # the router may not vanish silently
    with pytest.raises(CheckpointError, match="missing key"):
        StrictRemap("m.", may_drop=["m.router.*"])(sd, dst)  # nor may the head stay uninitialised silently


def _layer(**kw):
    torch.manual_seed(0)
    return MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, **kw).build().eval()


def test_flops_counter_dropless_topk_and_discrete_only():
    x = torch.randn(3, 10, 8)
    per_route = 4 * 8 * 16
    topk = _layer(router="topk", top_k=2, drop_tokens=False)
    with ExpertFlopsCounter(topk) as c:
        topk(x)
    s = c.summary()
    assert s["layers"][0]["expert_rows"] == 60 and s["layers"][0]["routes"] == 60
    assert s["expert_flops_per_token"] == 2 * per_route
    disc = _layer(router="vqmoe", vqmoe_mode="discrete_only", codebook_size=8, drop_tokens=False)
    with ExpertFlopsCounter(disc) as c:
        disc(x)
    assert c.summary()["expert_flops_per_token"] == per_route
    both = _layer(router="vqmoe", top_k=2, codebook_size=8, drop_tokens=False)
    with ExpertFlopsCounter(both) as c:
        both(x)
    assert c.summary()["expert_flops_per_token"] == 3 * per_route  # top-2 + the discrete route


def test_flops_counter_counts_what_capacity_lets_through():
    layer = _layer(router="topk", top_k=1, drop_tokens=True, eval_capacity_factor=1.0, min_capacity=1)
    x = torch.randn(40, 8)
    with torch.no_grad():
        load = torch.bincount(layer.router(x).experts_TK[:, 0], minlength=4)
    cap = math.ceil(1.0 * 40 / 4)
    with ExpertFlopsCounter(layer) as c:
        layer(x)
    s = c.summary()["layers"][0]
    assert int(load.max()) > cap  # the case really drops
    assert s["expert_rows"] == int(load.clamp(max=cap).sum())
    assert s["routes"] == 40 and s["dropped_routes"] == 40 - s["expert_rows"]
