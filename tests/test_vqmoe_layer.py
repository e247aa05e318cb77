"""The VQ router and the VQMoE layer (eq. 4-5 and eq. 7) against loop references: outputs, aux loss and all
gradients to 1e-5 with the expert loop and the grouped-GEMM experts; K != N mapping, low capacity, frozen VQ,
discrete input choice.

The references see only the layer's raw tensors (``run_raw``: weights detached and cloned once, by name) and write
the paper's formulas out token by token: the nearest code by brute force over the codebook, expert = code mod N,
[g_c, g_d] = softmax(W_g x + b_g), f(x) = g_c sum_k w_k FFN_k(x) + g_d FFN_{code mod N}(x~) (eq. 4-5), the VQ loss
alpha (||sg[z] - v||^2 + beta ||z - sg[v]||^2) (eq. 8, means over the elements) and N sum_e f_e P_e."""
import pytest
import torch

from layer_harness import make_layer, raw_tensors, run_raw
from reference import (capacity_ref, experts_raw, linear_raw, mlp_raw, moe_ref, softmax_raw, top_indices,
                       vq_raw)

TOL = 1e-5
Q = "vq_router.quantizer."


def quantize_raw(W, cfg, x_t):
    """(code, x~, codebook term, commitment term, elements) of one token from the raw codebook and projections."""
    proj = (lambda name: (W[Q + name + ".weight"], W[Q + name + ".bias"]) if Q + name + ".weight" in W else None)
    return vq_raw(x_t, W[Q + "codebook"], cfg.vq_distance, proj("in_proj"), proj("out_proj"), cfg.vq_scale)


def vqmoe_ref(W, cfg, x, info=None):
    """(y, aux) of the VQMoE layer from its raw tensors W; ``info`` (a dict) receives the codes and the kept routes."""
    T, E, k = x.shape[0], cfg.num_experts, cfg.top_k
    experts = experts_raw(W, E)
    codebook_sum = commit_sum = 0.0
    n = 0
    codes, disc = [], []
    for t in range(T):
        code, xq, cb_term, commit, numel = quantize_raw(W, cfg, x[t])
        codebook_sum, commit_sum, n = codebook_sum + cb_term, commit_sum + commit, n + numel
        codes.append(code)
        disc.append((code % E, xq if cfg.discrete_input == "quantized" else x[t]))
    aux = cfg.vq_alpha * (codebook_sum / n + cfg.vq_beta * commit_sum / n)
    if cfg.router == "vqmoe" and cfg.vqmoe_mode == "discrete_only":
        choices = [[(t, disc[t][0], torch.tensor(1.0), disc[t][1]) for t in range(T)]]
        num_routes = T
    else:
        Wr = W["router.wg.weight"]
        probs_rows, chosen_rows = [], []
        cont = [[None] * T for _ in range(k)]
        d_routes = [None] * T
        for t in range(T):
            g_c, g_d = softmax_raw(linear_raw(W, "mix", x[t]))  # [g_c, g_d] = softmax(W_g x + b_g)
            probs = softmax_raw(torch.stack([x[t] @ Wr[e] for e in range(E)]))
            chosen = top_indices(probs.detach(), k)
            w = [probs[e] for e in chosen]
            if k > 1 and cfg.norm_topk_prob:
                w = [v / sum(probs[e] for e in chosen) for v in w]
            for c in range(k):
                cont[c][t] = (t, chosen[c], g_c * w[c], x[t])
            d_routes[t] = (t, disc[t][0], g_d, disc[t][1])
            probs_rows.append(probs)
            chosen_rows.append(chosen)
        f = [sum(1 for c in chosen_rows for e in c if e == j) / (T * k) for j in range(E)]
        P = [sum(p[j] for p in probs_rows) / T for j in range(E)]
        aux = aux + cfg.balance_loss_coef * E * sum(f[j] * P[j] for j in range(E))
        if cfg.discrete_input == "quantized":  # X = [x; x~]: first choices of all rows, then the discrete rows
            choices = [cont[0], d_routes] + cont[1:]
        else:  # one matrix, k+1 routes per token: continuous choices first, the discrete route last
            choices = cont + [d_routes]
        num_routes = T * (k + 1)
    cap = capacity_ref(num_routes, E, cfg.capacity_factor, cfg.min_capacity) if cfg.drop_tokens else None
    kept = []
    y = moe_ref(choices, experts, T, cap, kept)
    if info is not None:
        info.update(codes=codes, kept=kept, num_routes=num_routes)
    return y, aux


def check(diffs):
    bad = {k: v for k, v in diffs.items() if v > TOL}
    assert not bad, bad


VARIANTS = {
    "default": dict(),  # the shipped default: cosine codebook in the model dim, x~ at the token's scale
    "cosine_code_scale": dict(vq_scale="code"),
    "top1_unnormalised": dict(top_k=1),
    "top2_no_norm": dict(norm_topk_prob=False),
    "l2": dict(vq_distance="l2"),
    "cosine_lowdim": dict(vq_distance="cosine", codebook_dim=6),
    "l2_lowdim": dict(vq_distance="l2", codebook_dim=6),
}


def shipped_capacity():
    """MoEConfig's own capacity settings (the harness's small layer is dropless by default)."""
    import dataclasses

    from vqmoe_ds.moe import MoEConfig

    return {f.name: f.default for f in dataclasses.fields(MoEConfig)
            if f.name in ("drop_tokens", "capacity_factor", "min_capacity")}


@pytest.mark.parametrize("experts", ["loop", "grouped"])
@pytest.mark.parametrize("variant", list(VARIANTS) + ["shipped"])
def test_vqmoe_pretrain_matches_reference(experts, variant):
    kw = shipped_capacity() if variant == "shipped" else VARIANTS[variant]
    layer = make_layer(router="vqmoe", codebook_size=6, expert_impl=experts, **kw)
    diffs, _ = run_raw(layer, vqmoe_ref)
    check(diffs)
    grads = dict(layer.named_parameters())
    for name in ("mix.weight", "mix.bias", "router.wg.weight", Q + "codebook"):
        assert grads[name].grad is not None and grads[name].grad.abs().max() > 0, name  # all of them learn


@pytest.mark.parametrize("experts", ["loop", "grouped"])
def test_vqmoe_low_capacity_drops_like_reference(experts):
    layer = make_layer(router="vqmoe", codebook_size=6, expert_impl=experts, drop_tokens=True,
                       capacity_factor=0.5, min_capacity=1)
    info = {}
    g = torch.Generator().manual_seed(1)
    vqmoe_ref(raw_tensors(layer), layer.cfg, torch.randn(24, 16, generator=g), info)
    diffs, y = run_raw(layer, vqmoe_ref)  # the same x (seed 1)
    check(diffs)
    stats = layer.stats()
    assert info["num_routes"] == 24 * 3 and int(stats["expert_load"].sum()) == 24 * 3
    assert len(info["kept"]) < 0.6 * 24 * 3  # the capacity (half the routes) did drop routes
    assert float(stats["dropped_fraction"]) == pytest.approx(1 - len(info["kept"]) / (24 * 3))


@pytest.mark.parametrize("experts", ["loop", "grouped"])
def test_vqmoe_token_input_variant(experts):
    layer = make_layer(router="vqmoe", codebook_size=5, discrete_input="token", expert_impl=experts,
                       drop_tokens=True, capacity_factor=0.75, min_capacity=1)
    check(run_raw(layer, vqmoe_ref)[0])


@pytest.mark.parametrize("router,mode", [("vq", "pretrain"), ("vqmoe", "discrete_only")])
@pytest.mark.parametrize("experts", ["loop", "grouped"])
def test_discrete_only_matches_reference(router, mode, experts):
    layer = make_layer(router=router, vqmoe_mode=mode, codebook_size=7, vq_distance="cosine", codebook_dim=5,
                       expert_impl=experts)
    assert layer.router is None and layer.mix is None
    check(run_raw(layer, vqmoe_ref)[0])


def test_code_to_expert_mapping_k_not_n():
    """K = 10 codes on N = 4 experts: codes 1, 5 and 9 all go to expert 1.  Three codes are set to three tokens, so
    the brute-force nearest codes are 1, 5, 9 and the layer's output is expert 1's MLP of each code vector (L2:
    x~ is the code itself)."""
    layer = make_layer(router="vq", codebook_size=10, num_experts=4, vq_distance="l2")
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4)) * 10
    with torch.no_grad():
        layer.vq_router.quantizer.codebook[[1, 5, 9]] = x
    W = raw_tensors(layer)
    assert [quantize_raw(W, layer.cfg, x[t])[0] for t in range(3)] == [1, 5, 9]
    y, _ = layer(x)
    expert1 = experts_raw(W, 4)[1]
    want = torch.stack([mlp_raw(W[Q + "codebook"][c], *expert1) for c in (1, 5, 9)])
    assert (y - want).abs().max() < 1e-5
    assert layer.stats()["expert_load"].tolist() == [0, 3, 0, 0]
    # random tokens: every token's expert is its brute-force code mod 4, the load counted per expert by hand
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(5))
    layer(x)
    codes = [quantize_raw(W, layer.cfg, x[t])[0] for t in range(50)]
    assert max(codes) >= 4  # some codes beyond N, so the mapping is exercised
    assert layer.stats()["expert_load"].tolist() == [sum(1 for c in codes if c % 4 == e) for e in range(4)]
    assert layer.stats()["code_counts"].tolist() == [sum(1 for c in codes if c == j) for j in range(10)]


def test_frozen_vq_receives_no_gradient_in_discrete_only_mode():
    layer = make_layer(router="vqmoe", vqmoe_mode="discrete_only", freeze_vq=True, codebook_size=6, codebook_dim=6,
                       vq_distance="cosine")
    q = layer.vq_router.quantizer
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    assert all(not p.requires_grad for p in q.parameters())
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(32, 16, requires_grad=True)
    y, aux = layer(x)
    (y.square().sum() + aux).backward()
    opt.step()
    assert all(p.grad is None for p in q.parameters())
    assert all(torch.equal(before[n], p) for n, p in q.named_parameters())
    assert x.grad.abs().sum() > 0  # the tokens still learn through the straight-through path
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.experts.parameters())


def test_vqmoe_discrete_gate_mixes_paths():
    """With W_g forced to all-continuous / all-discrete, the layer equals the top-k MoE / the VQ MoE, both written
    here from the raw weights."""
    layer = make_layer(router="vqmoe", codebook_size=6)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        layer.mix.weight.zero_()
        layer.mix.bias.copy_(torch.tensor([60.0, -60.0]))
    W = raw_tensors(layer)
    experts = experts_raw(W, 4)
    y_topk = torch.zeros_like(x)
    for t in range(20):
        probs = softmax_raw(x[t] @ W["router.wg.weight"].t())
        chosen = top_indices(probs, 2)
        for e in chosen:
            y_topk[t] += probs[e] / sum(probs[c] for c in chosen) * mlp_raw(x[t], *experts[e])
    y_c, _ = layer(x)
    assert (y_c - y_topk.detach()).abs().max() < 1e-5
    with torch.no_grad():
        layer.mix.bias.copy_(torch.tensor([-60.0, 60.0]))
    y_vq = []
    for t in range(20):
        code, xq = quantize_raw(W, layer.cfg, x[t])[:2]
        y_vq.append(mlp_raw(xq, *experts[code % 4]))
    y_d, _ = layer(x)
    assert (y_d - torch.stack(y_vq).detach()).abs().max() < 1e-5


def test_router_and_mixing_gate_read_x_in_one_matmul(monkeypatch):
    """The shipped VQMoE layer computes x W_e^T and x W_g^T as one matmul over [W_e; W_g] (x read once): the
    matmuls that take x itself produce E + 2 columns together, in one product; unfused they are two."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from vqmoe_ds.routers.topk import TopKRouter

    class Widths(TorchDispatchMode):
        def __init__(self, x):
            super().__init__()
            self.ptr, self.widths = x.data_ptr(), []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("mm", "addmm") and any(
                    torch.is_tensor(a) and a.dim() == 2 and a.data_ptr() == self.ptr for a in args[:2]):
                self.widths.append(out.shape[-1])
            return out

    x = torch.randn(24, 16)

    def widths():
        layer = make_layer(router="vqmoe").train()  # 4 experts
        layer(x)  # k-means init
        with Widths(x) as w:
            y = layer(x)[0]
        return sorted(w.widths), y

    fused, y_fused = widths()
    monkeypatch.setattr(TopKRouter, "fusable", property(lambda self: False))
    separate, y_separate = widths()
    assert fused == [6] and separate == [2, 4]
    assert (y_fused - y_separate).abs().max() < 1e-5
