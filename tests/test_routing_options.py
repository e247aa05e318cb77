"""The routing options of current MoE systems (Megatron-core's names in the flags) against loop references written
from their definitions: z-loss, sigmoid scores with top-k scaling, the balance loss per sequence and over the
global batch, the expert bias of aux-loss-free balancing and its update, forced balancing, shared experts (added,
gated, and DeepSpeed's PR-MoE residual mix), and the per-layer routing metrics of the log.

The references see only the layer's raw tensors (``run_raw``: weights and buffers detached and cloned once, by name)."""
import math

import pytest
import torch

from layer_harness import make_layer, raw_tensors, run_raw
from reference import (capacity_ref, experts_raw, linear_raw, mlp_raw, moe_ref, sigmoid_raw, softmax_raw,
                       top_indices)

from vqmoe_ds.routers import update_expert_biases
from vqmoe_ds.training.run_log import load_metrics, moe_summary

TOL = 1e-5


def route_ref(W, cfg, x_t, t):
    """(scores, chosen experts, combine weights, logits) of token t from the raw router weights and expert bias."""
    E, k = cfg.num_experts, cfg.top_k
    Wr = W["router.wg.weight"]
    logits = torch.stack([x_t @ Wr[e] for e in range(E)])
    scores = sigmoid_raw(logits) if cfg.score_function == "sigmoid" else softmax_raw(logits)
    if cfg.force_load_balancing:
        chosen = [(t * k + j) % E for j in range(k)]
    else:  # the expert bias (aux-loss-free balancing) shifts the choice only, not the weights
        bias = W["router.expert_bias_E"] if cfg.expert_bias else torch.zeros(E)
        chosen = top_indices([scores[e] + bias[e] for e in range(E)], k)
    g = [scores[e] for e in chosen]
    if k == 1 and cfg.top1_weight == "one":  # the softmax of the chosen logit alone: a constant 1
        g = [torch.ones(())]
    if k > 1 and cfg.norm_topk_prob:
        tot = sum(g) + (1e-20 if cfg.score_function == "sigmoid" else 0)
        g = [v / tot for v in g]
    return scores, chosen, [v * cfg.topk_scaling_factor for v in g], logits


def options_ref(W, cfg, x_BSD):
    """(y, aux) of a top-k layer with its options, token by token from the definitions."""
    E, k = cfg.num_experts, cfg.top_k
    B, S, D = x_BSD.shape
    x = x_BSD.reshape(B * S, D)
    T = x.shape[0]
    rows, chosen_rows, choices = [], [], [[None] * T for _ in range(k)]
    z_terms = []
    for t in range(T):
        scores, chosen, g, logits = route_ref(W, cfg, x[t], t)
        z_terms.append(torch.log(torch.exp(logits).sum()) ** 2)  # (log sum_e exp l_e)^2
        rows.append(scores / scores.sum() if cfg.score_function == "sigmoid" else scores)
        chosen_rows.append(chosen)
        for c in range(k):
            choices[c][t] = (t, chosen[c], g[c], x[t])
    cap = capacity_ref(T * k, E, cfg.capacity_factor, cfg.min_capacity) if cfg.drop_tokens else None
    y = moe_ref(choices, experts_raw(W, E), T, cap)
    if cfg.shared_expert_size:
        shared_w = tuple(W["shared." + n] for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
        shared = torch.stack([mlp_raw(x[t], *shared_w) for t in range(T)])
        if cfg.shared_expert_mode == "add":
            y = y + shared
        elif cfg.shared_expert_mode == "gate":  # Qwen2-MoE: sigmoid(w x + b) times the shared expert
            gate = torch.stack([sigmoid_raw(linear_raw(W, "shared_gate", x[t])[0]) for t in range(T)])
            y = y + gate.unsqueeze(1) * shared
        else:  # PR-MoE: softmax(W x + b) mixes the routed and the shared output
            c = torch.stack([softmax_raw(linear_raw(W, "shared_gate", x[t])) for t in range(T)])
            y = y * c[:, :1] + shared * c[:, 1:]

    def balance(token_ids):
        n = len(token_ids)
        f = [sum(1 for t in token_ids for e in chosen_rows[t] if e == j) / (n * k) for j in range(E)]
        P = [sum(rows[t][j] for t in token_ids) / n for j in range(E)]
        return E * sum(f[j] * P[j] for j in range(E))

    aux = torch.zeros(())
    if cfg.load_balancing_type in ("aux_loss", "global_aux_loss"):  # one process: the global batch is this one
        aux = aux + cfg.balance_loss_coef * balance(range(T))
    elif cfg.load_balancing_type == "seq_aux_loss":
        aux = aux + cfg.balance_loss_coef * sum(balance(range(b * S, (b + 1) * S)) for b in range(B)) / B
    if cfg.z_loss_coef > 0:
        aux = aux + cfg.z_loss_coef * sum(z_terms) / T
    return y.reshape(B, S, D), aux


def compare(layer, B=3, S=8, seed=1):
    """The layer on a [B, S, D] batch against ``options_ref``: output, aux loss and every gradient within TOL."""
    diffs, _ = run_raw(layer, options_ref, shape=(B, S, layer.cfg.hidden_size), seed=seed)
    assert max(diffs.values()) <= TOL, diffs
    return layer


OPTIONS = {
    "shipped defaults": dict(drop_tokens=True, capacity_factor=1.25, min_capacity=4),
    "z-loss": dict(z_loss_coef=0.01),
    "sigmoid scores, normalised top-2, scaling 2.5": dict(score_function="sigmoid", topk_scaling_factor=2.5),
    "sigmoid scores, top-1": dict(score_function="sigmoid", top_k=1),
    "top-1, weight one": dict(top_k=1, top1_weight="one"),
    "top-1, weight one, capacity drops": dict(top_k=1, top1_weight="one", drop_tokens=True, capacity_factor=0.75,
                                              min_capacity=1),
    "sigmoid, no normalisation": dict(score_function="sigmoid", norm_topk_prob=False),
    "balance loss per sequence": dict(load_balancing_type="seq_aux_loss"),
    "balance loss of the global batch, one rank": dict(load_balancing_type="global_aux_loss"),
    "no balance loss": dict(load_balancing_type="none"),
    "forced balancing": dict(force_load_balancing=True),
    "shared expert, added": dict(shared_expert_size=12),
    "shared expert, sigmoid gate": dict(shared_expert_size=12, shared_expert_mode="gate"),
    "shared expert, PR-MoE residual": dict(shared_expert_size=12, shared_expert_mode="residual"),
    "z-loss with capacity drops": dict(z_loss_coef=0.01, drop_tokens=True, capacity_factor=0.75, min_capacity=1),
}


@pytest.mark.parametrize("experts", ["loop", "grouped"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_matches_its_definition(name, experts):
    compare(make_layer(router="topk", expert_impl=experts, **OPTIONS[name]))


def test_forced_balancing_spreads_tokens_evenly():
    layer = make_layer(router="topk", force_load_balancing=True)
    layer(torch.randn(2, 8, 16))
    assert layer.stats()["expert_load"].tolist() == [8, 8, 8, 8]  # 16 tokens x 2 routes over 4 experts


def test_expert_bias_selects_and_is_updated_by_the_sign_rule():
    layer = make_layer(router="topk", expert_bias=True, bias_update_rate=0.05)
    router = layer.router
    start = torch.tensor([0.5, 0.0, 0.0, -0.5])  # selection leans to expert 0, away from 3
    router.expert_bias_E.copy_(start)
    compare(layer)  # selection by scores + bias, weights from the scores alone
    router.load_E.zero_()
    router.expert_bias_E.copy_(start)
    W = raw_tensors(layer)
    loads = torch.zeros(4)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # two micro-batches of one step: the loads of both count, chosen with the bias
        x = torch.randn(2, 8, 16, generator=g)
        layer(x)
        for t, x_t in enumerate(x.reshape(16, 16)):
            for e in route_ref(W, layer.cfg, x_t, t)[1]:
                loads[e] += 1
    assert torch.equal(router.load_E, loads)
    update_expert_biases(layer)
    want = start + 0.05 * torch.sign(loads.mean() - loads)
    assert torch.allclose(router.expert_bias_E, want) and float(router.load_E.sum()) == 0.0
    assert float(loads[0]) > float(loads.mean()) and float(router.expert_bias_E[0]) < 0.5  # over-loaded: bias down


def test_routing_options_refused_where_they_mean_nothing():
    from vqmoe_ds.moe import ConfigError, MoEConfig

    for kw, words in [(dict(router="hash", score_function="sigmoid"), "router 'hash' has no such scores"),
                      (dict(router="vq", expert_bias=True), "in discrete_only mode"),
                      (dict(router="cluster", z_loss_coef=0.1), "router 'cluster' has none"),
                      (dict(router="topk", bias_update_rate=-1.0), "bias_update_rate=-1.0 must be >= 0"),
                      (dict(router="topk", z_loss_coef=-0.1), "z_loss_coef=-0.1 must be >= 0"),
                      (dict(router="topk", shared_expert_size=-4), "shared_expert_size=-4 must be >= 0")]:
        with pytest.raises(ConfigError) as e:
            MoEConfig(hidden_size=8, ffn_hidden_size=8, **kw)
        assert words in str(e.value) and "\n" not in str(e.value)


def test_load_metrics_and_summary_by_hand():
    m = load_metrics([6.0, 2.0, 2.0, 2.0])  # mean 3, max 6, std sqrt((9 + 1 + 1 + 1) / 4) = sqrt(3)
    assert m["load_max_over_mean"] == 2.0 and math.isclose(m["load_cv"], math.sqrt(3) / 3)
    rows = [{"balance_loss": 1.0, "z_loss": 2.0, "load_cv": 0.2, "expert_bias_range": 0.1, "expert_load": [1, 2]},
            {"balance_loss": 1.5, "z_loss": 3.0, "load_cv": 0.4, "expert_bias_range": 0.3, "dropped_fraction": 0.5}]
    s = moe_summary(rows)
    assert (s["balance_loss"], s["z_loss"], s["expert_bias_range"], s["dropped_fraction"]) == (2.5, 5.0, 0.3, 0.5)
    assert math.isclose(s["load_cv"], 0.3)


def test_driver_logs_the_routing_metrics_and_moves_the_expert_bias(tmp_path):
    """One process, 6 steps of the tiny model with the expert bias and the z-loss: every train record carries the
    model-wide routing summary, and the bias range grows by at most 2 x rate per step (two experts moving apart)."""
    import json
    import subprocess
    import sys

    from vqmoe_ds.training.launch import DRIVER, ROOT, env_for_ranks, free_port

    env = env_for_ranks(str(tmp_path))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, DRIVER, "--router", "topk", "--moe-router-enable-expert-bias",
                        "--moe-router-bias-update-rate", "0.01", "--moe-z-loss-coeff", "0.001",
                        "--moe-per-layer-logging", "--train-iters", "6", "--log-interval", "2", "--eval-iters", "1",
                        "--test-iters", "1", "--corpus-bytes", "100000", "--no-progress", "--no-plots",
                        "--out-dir", str(out)], env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    train = [x for x in map(json.loads, open(out / "log.jsonl")) if x["kind"] == "train"]
    assert [x["step"] for x in train] == [2, 4, 6]
    for rec in train:
        s = rec["moe_summary"]
        assert {"balance_loss", "z_loss", "load_max_over_mean", "load_cv", "expert_bias_range"} <= set(s)
        assert s["load_max_over_mean"] >= 1.0 and s["z_loss"] > 0
        assert 0 < s["expert_bias_range"] <= 2 * 0.01 * rec["step"] + 1e-9
        assert all("load_cv" in layer for layer in rec["moe"])
