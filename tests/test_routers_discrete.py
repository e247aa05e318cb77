"""The discrete baselines beside VQ routing -- hash routing and the clustering router -- inside the MoE layer
against loop-over-tokens references (outputs, input and parameter gradients to 1e-5, the expert loop and the grouped GEMM), their
tables and centroids checked from the definitions, and the models and drivers that use them."""
import pytest
import torch
import torch.nn.functional as F

from layer_harness import make_layer, run_both
from reference import capacity_ref, moe_ref

from vqmoe_ds.models import build_model, count_params, flops_per_token, named_config
from vqmoe_ds.routers import balanced_table, fit_hash_tables
from vqmoe_ds.routers.cluster import ClusterRouter

TOL = 1e-5


def _run(layer, reference, ids=None, T=24, seed=1):
    """The layer against ``reference(x)``: output, aux loss and every gradient within TOL (an expert no token reached
    has no gradient, or zeros where DeepSpeed's dispatch ran it on its capacity padding: both count as zeros)."""
    diffs, _ = run_both(layer, lambda _, x: reference(x), T=T, seed=seed, ids=ids)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("experts", ["loop", "grouped"])
@pytest.mark.parametrize("drop", [False, True])
def test_hash_routing_matches_a_table_lookup(experts, drop):
    layer = make_layer(router="hash", vocab_size=50, hash_seed=3, expert_impl=experts, drop_tokens=drop,
                       capacity_factor=0.75, min_capacity=1)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 50, (24,), generator=g)
    table = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(3))  # the seeded random table
    assert torch.equal(layer.router.table_V, table)

    def reference(x):
        routes = [[(t, int(table[ids[t]]), torch.tensor(1.0), x[t]) for t in range(x.shape[0])]]
        cap = capacity_ref(x.shape[0], 4, 0.75, 1) if drop else None
        return moe_ref(routes, layer.experts, x.shape[0], cap), torch.zeros(())

    _run(layer, reference, ids)
    with pytest.raises(ValueError, match="needs the input token ids"):
        layer(torch.randn(4, 16))


def test_balanced_hash_table_by_hand():
    # ids by frequency: 0 (10) -> e0; 2 (7) -> e1; 3 (3) -> e1 (7 < 10); 4 (3) -> e0 (10 = 10: lower expert);
    # 1 (1) -> e1 (13 > 10)
    assert balanced_table([10, 1, 7, 3, 3], 2).tolist() == [0, 1, 1, 1, 0]
    counts = torch.randint(1, 1000, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    table = balanced_table(counts, 8)
    load = torch.zeros(8, dtype=torch.long).index_add_(0, table, torch.tensor(counts))
    assert int(load.max() - load.min()) <= max(counts)  # greedy packing: spread within one id's frequency


def test_models_fit_balanced_tables_from_token_counts():
    torch.manual_seed(0)
    cfg = named_config("tiny", moe={"router": "hash", "num_experts": 4, "hash_table": "balanced"})
    model = build_model(cfg)
    counts = [0] * 256
    for i, c in enumerate([500, 400, 300, 200]):
        counts[97 + i] = c
    assert fit_hash_tables(model, counts) == cfg.n_layer
    table = model.blocks[0].ffn.router.table_V
    assert sorted(int(table[97 + i]) for i in range(4)) == [0, 1, 2, 3]  # the four frequent ids on four experts
    logits, loss, aux, _ = model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))
    assert torch.isfinite(loss) and float(aux) == 0.0
    assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
    assert flops_per_token(cfg) > 0


def test_hash_routing_refused_for_images():
    from vqmoe_ds.moe.config import ConfigError
    from vqmoe_ds.vision import vit_config

    with pytest.raises(ConfigError, match="image patches have no ids"):
        vit_config("tiny", moe={"router": "hash"})


def _nearest(z, centroids, distance):
    """Nearest centroid of every token from the definitions (ties to the lower index)."""
    out = []
    for row in z:
        if distance == "cosine":
            s = [-float(row @ c / (row.norm() * c.norm())) for c in centroids]
        else:
            s = [float(((row - c) ** 2).sum()) for c in centroids]
        out.append(min(range(len(s)), key=lambda j: (s[j], j)))
    return out


@pytest.mark.parametrize("experts", ["loop", "grouped"])
@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_cluster_router_routes_to_the_nearest_fixed_centroid(experts, distance):
    layer = make_layer(router="cluster", cluster_distance=distance, cluster_warmup_steps=2, expert_impl=experts)
    router = layer.router
    g = torch.Generator().manual_seed(2)
    clusters = torch.randn(4, 16, generator=g) * 3
    batches = [clusters[torch.randint(0, 4, (32,), generator=g)] + 0.3 * torch.randn(32, 16, generator=g)
               for _ in range(3)]
    for step, xb in enumerate(batches):  # steps 0, 1: warm-up; step 2: fit
        router.set_step(step)
        layer(xb)
        assert router.fitted == (step == 2)
    centroids = router.centroids_ED.clone()
    # Lloyd's fixed point on the kept samples: each centroid is the mean of the samples nearest to it
    samples = router.samples_RD[:int(router.filled)]
    assign = torch.tensor(_nearest(samples, centroids, distance))
    for e in range(4):
        if (assign == e).any():
            mean = samples[assign == e].mean(0)
            want = F.normalize(mean, dim=0) if distance == "cosine" else mean
            assert torch.allclose(centroids[e], want.float(), atol=1e-4)
    layer(batches[0])  # fitted: the centroids stay
    assert torch.equal(router.centroids_ED, centroids)

    def reference(x):
        z = F.normalize(x.detach(), dim=-1) if distance == "cosine" else x.detach()
        chosen = _nearest(z, centroids, distance)
        routes = [[(t, chosen[t], torch.tensor(1.0), x[t]) for t in range(x.shape[0])]]
        return moe_ref(routes, layer.experts, x.shape[0], None), torch.zeros(())

    _run(layer, reference)


def test_cluster_router_state_resumes():
    a = ClusterRouter(8, 4, warmup_steps=1)
    x = torch.randn(16, 8)
    a.train()
    a(x)
    a.set_step(1)
    a(x)
    b = ClusterRouter(8, 4, warmup_steps=1)
    b.load_state_dict(a.state_dict())
    assert b.fitted and torch.equal(b(x).experts_TK, a(x).experts_TK)


def test_cluster_fit_is_the_same_on_every_rank(tmp_path):
    from dist_helper import run_ranks

    out = str(tmp_path / "res")
    run_ranks("cluster_fit.py", out)
    for rank in range(2):
        res = torch.load(f"{out}.{rank}")
        assert res["fitted"] and res["same"] and res["err"] < 1e-6, res
