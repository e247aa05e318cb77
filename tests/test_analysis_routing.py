"""Routing analysis: stability and consistency on hand-made cases, k-means, effective rank, the probe against
the layer's own statistics, and tools/analyze_routing.py's JSON/PNGs against an independent reading of the
checkpoint."""
import json
import os

import torch

from test_finetune_support import pretrained, reference_model, tmpdir, tool
from vqmoe_ds.analysis import (RoutingProbe, consistency_score, effective_rank, expert_of, kmeans, load_summary,
                               routing_stability, stability_series)
from vqmoe_ds.moe import MoEConfig


def test_stability_hand_case():
    a, b, c = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 3, 3]), torch.tensor([1, 1, 3, 0])
    assert routing_stability(a, b) == 0.75
    assert stability_series([a, b, c]) == [0.75, 0.5]


def test_kmeans_finds_separated_blobs_and_consistency_of_a_nearest_centre_router():
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(50, 2, generator=g) for c in true])
    cent = kmeans(x, 3, seed=1)
    matched = torch.cdist(true, cent).min(1).values
    assert matched.max() < 0.2
    # a router that is exactly "nearest true centre" is fully consistent; one that flips the 2nd blob is not
    nearest = lambda v: torch.cdist(v, true).argmin(1)  # noqa: E731
    assert consistency_score(nearest, x, cent) == 1.0
    flipped = lambda v: torch.where(nearest(v) == 1, torch.where(v[:, 0] > 10.0, 1, 2), nearest(v))  # noqa: E731
    share = float((x[50:100, 0] <= 10.0).float().mean())  # blob-1 tokens the flipped router sends elsewhere
    centre1_expert = int(flipped(cent[torch.cdist(true, cent).argmin(1)[1:2]])[0])
    want = 1 - (share if centre1_expert == 1 else 1 - share) * 50 / 150
    assert abs(consistency_score(flipped, x, cent) - want) < 1e-6


def test_effective_rank_of_a_line_and_of_isotropic_points():
    t = torch.linspace(-1, 1, 100).unsqueeze(1)
    assert abs(effective_rank(t * torch.tensor([[1.0, 2.0, 3.0]])) - 1.0) < 1e-6
    assert effective_rank(torch.randn(5000, 4, generator=torch.Generator().manual_seed(0))) > 3.9


def test_probe_matches_the_layer_statistics():
    torch.manual_seed(0)
    layer = MoEConfig(hidden_size=8, ffn_hidden_size=16, router="vqmoe", num_experts=4, top_k=2, codebook_size=6,
                      drop_tokens=False).build().eval()
    x = torch.randn(30, 8)
    with RoutingProbe(layer) as p, torch.no_grad():
        layer(x)
    rec = p.records[0]
    s = layer.stats()
    assert torch.equal(rec.expert_load(), s["expert_load"].cpu())
    assert torch.equal(rec.code_counts().float(), s["code_counts"].float())
    assert torch.equal(rec.disc_T, rec.codes_T % 4)
    rows = rec.expert_rows("in")
    assert {e: r.shape[0] for e, r in rows.items()} == {e: int(n) for e, n in enumerate(s["expert_load"]) if n > 0}
    assert torch.equal(expert_of(layer, "discrete")(x), rec.disc_T)


def test_tool_summary_and_plots_on_a_tiny_checkpoint():
    pre, out = pretrained("vqmoe"), tmpdir("ana")
    tool("analyze_routing.py", "--load", pre, "--tags", "step10,step20,step20", "--out-dir", out,
         "--max-tokens", "512")
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["tags"] == ["step10", "step20", "step20"]
    for p in s["plots"]:
        assert os.path.getsize(p) > 1000 and open(p, "rb").read(4) == b"\x89PNG"
    T = 512  # 8 windows of the tiny context (64)
    # an independent forward of the same tokens through the checkpoint read without DeepSpeed
    from vqmoe_ds.finetune.lm_eval import run_corpus
    from vqmoe_ds.checkpoint import read_run

    run = read_run(pre, "step20")
    ids = torch.as_tensor(run_corpus(run).streams["valid"].read(0, T), dtype=torch.long).view(8, 64)
    model = reference_model(os.path.join(pre, "checkpoints", "step20"))
    with RoutingProbe(model) as p, torch.no_grad():
        model(ids)
    for i, l in enumerate(s["layers"]):
        rec = p.records[i]
        assert l["tokens"] == T
        assert l["expert_load"] == rec.expert_load().tolist() and sum(l["expert_load"]) == 3 * T  # top-2 + discrete
        assert l["code_counts"] == rec.code_counts().tolist() and sum(l["code_counts"]) == T
        assert l["dead_codes"] == sum(c == 0 for c in l["code_counts"])
        assert l["load_summary"] == load_summary(l["expert_load"])
        assert set(l["consistency"]) == {"continuous", "discrete"}
        assert all(0.0 <= v <= 1.0 for v in l["consistency"].values())
        for path in ("continuous", "discrete"):
            stab = s["stability"][f"layer{i} {path}"]
            assert stab[1] == 1.0  # the same checkpoint twice: every token keeps its expert
            assert 0.0 <= stab[0] <= 1.0
