"""The VQ router and the VQMoE layer (eq. 4-5 and eq. 7) against loop references: outputs, aux loss and all
gradients to 1e-5 under both dispatchers; K != N mapping, low capacity, frozen VQ, discrete input choice."""
import pytest
import torch

from layer_harness import make_layer, run_both
from reference import capacity_ref, gate_ref, moe_ref, topk_ref, vq_ref

TOL = 1e-5


def vqmoe_ref(layer, x):
    cfg = layer.cfg
    T, E, k = x.shape[0], cfg.num_experts, cfg.top_k
    q = layer.vq_router.quantizer
    codebook_sum = commit_sum = 0.0
    n = 0
    disc = []
    for t in range(T):
        code, xq, cb_term, commit, numel = vq_ref(x[t], q, cfg.vq_scale)
        codebook_sum, commit_sum, n = codebook_sum + cb_term, commit_sum + commit, n + numel
        disc.append((code % E, xq if cfg.discrete_input == "quantized" else x[t]))
    vq_loss = codebook_sum / n + cfg.vq_beta * commit_sum / n
    aux = cfg.vq_alpha * vq_loss
    if layer.router is None:  # discrete only
        choices = [[(t, disc[t][0], torch.tensor(1.0), disc[t][1]) for t in range(T)]]
        num_routes = T
    else:
        W = layer.router.wg.weight
        probs_rows, chosen_rows = [], []
        cont = [[None] * T for _ in range(k)]
        d_routes = [None] * T
        for t in range(T):
            g = torch.softmax(x[t] @ layer.mix.weight.t() + layer.mix.bias, 0)
            probs = torch.softmax(torch.stack([x[t] @ W[e] for e in range(E)]), 0)
            chosen, _ = topk_ref(probs.detach(), k)
            w = gate_ref(probs, chosen, cfg.norm_topk_prob)
            for c in range(k):
                cont[c][t] = (t, chosen[c], g[0] * w[c], x[t])
            d_routes[t] = (t, disc[t][0], g[1], disc[t][1])
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
    return moe_ref(choices, layer.experts, T, cap), aux


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


@pytest.mark.parametrize("dispatcher", ["sorted", "deepspeed", "grouped"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vqmoe_pretrain_matches_reference(dispatcher, variant):
    layer = make_layer(router="vqmoe", codebook_size=6, dispatcher=dispatcher, **VARIANTS[variant])
    diffs, _ = run_both(layer, vqmoe_ref)
    check(diffs)
    for name in ("grad:mix.weight", "grad:router.wg.weight", "grad:vq_router.quantizer.codebook"):
        assert name in diffs, name  # the mixing gate, router and codebook all receive gradients


@pytest.mark.parametrize("dispatcher", ["sorted", "deepspeed", "grouped"])
def test_vqmoe_low_capacity_drops_like_reference(dispatcher):
    layer = make_layer(router="vqmoe", codebook_size=6, dispatcher=dispatcher, drop_tokens=True,
                       capacity_factor=0.5, min_capacity=1)
    diffs, y = run_both(layer, vqmoe_ref)
    check(diffs)
    assert layer.stats()["expert_load"].sum() == 24 * 3
    if dispatcher in ("sorted", "grouped"):
        assert layer.stats()["dropped_fraction"] > 0.3  # half the routes fit


@pytest.mark.parametrize("dispatcher", ["sorted", "deepspeed", "grouped"])
def test_vqmoe_token_input_variant(dispatcher):
    layer = make_layer(router="vqmoe", codebook_size=5, discrete_input="token", dispatcher=dispatcher,
                       drop_tokens=True, capacity_factor=0.75, min_capacity=1)
    check(run_both(layer, vqmoe_ref)[0])


@pytest.mark.parametrize("router,mode", [("vq", "pretrain"), ("vqmoe", "discrete_only")])
@pytest.mark.parametrize("dispatcher", ["sorted", "deepspeed", "grouped"])
def test_discrete_only_matches_reference(router, mode, dispatcher):
    layer = make_layer(router=router, vqmoe_mode=mode, codebook_size=7, vq_distance="cosine", codebook_dim=5,
                       dispatcher=dispatcher)
    assert layer.router is None and layer.mix is None
    check(run_both(layer, vqmoe_ref)[0])


def test_code_to_expert_mapping_k_not_n():
    layer = make_layer(router="vq", codebook_size=10, num_experts=4, vq_distance="l2")
    x = torch.randn(50, 16)
    routing = layer.vq_router(x)
    assert torch.equal(routing.experts_TK[:, 0], routing.codes_T % 4)
    assert routing.codes_T.max() < 10
    # codes 1, 5 and 9 all land on expert 1: set three codes to three tokens and check
    with torch.no_grad():
        layer.vq_router.quantizer.codebook[[1, 5, 9]] = x[:3] * 10
    r = layer.vq_router(x[:3] * 10)
    assert r.codes_T.tolist() == [1, 5, 9] and r.experts_TK[:, 0].tolist() == [1, 1, 1]


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
    """With W_g forced to all-continuous / all-discrete, the layer equals the top-k layer / the VQ layer."""
    layer = make_layer(router="vqmoe", codebook_size=6)
    x = torch.randn(20, 16)
    with torch.no_grad():
        layer.mix.weight.zero_()
        layer.mix.bias.copy_(torch.tensor([60.0, -60.0]))
    y_c, _ = layer(x)
    routing = layer.router(x)
    y_topk = torch.zeros_like(x)
    for t in range(20):
        for e, w in zip(routing.experts_TK[t], routing.weights_TK[t]):
            y_topk[t] += w * layer.experts[int(e)](x[t])
    assert torch.allclose(y_c, y_topk, atol=1e-5)
    with torch.no_grad():
        layer.mix.bias.copy_(torch.tensor([-60.0, 60.0]))
    y_d, _ = layer(x)
    r = layer.vq_router(x)
    y_vq = torch.stack([layer.experts[int(e)](xq) for e, xq in zip(r.experts_TK[:, 0], r.quantized_TD)])
    assert torch.allclose(y_d, y_vq, atol=1e-5)


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
