"""Each continuous router inside the MoE layer against a loop-over-tokens-and-experts reference:
outputs, aux loss, input and parameter gradients to 1e-5, with the expert loop and the grouped GEMM."""
import math

import pytest
import torch
import torch.nn.functional as F

from layer_harness import make_layer, run_both
from reference import capacity_ref, gate_ref, moe_ref, topk_ref

TOL = 1e-5


def _balance(probs_rows, chosen_rows, E):
    T, k = len(chosen_rows), len(chosen_rows[0])
    f = [sum(1 for c in chosen_rows for e in c if e == j) / (T * k) for j in range(E)]
    P = [sum(p[j] for p in probs_rows) / T for j in range(E)]
    return E * sum(f[j] * P[j] for j in range(E))


def softmax_router_ref(logit_fn, extra_aux=None, k_override=None, frozen_choice=None):
    def ref(layer, x):
        cfg, router = layer.cfg, layer.router
        E, T = cfg.num_experts, x.shape[0]
        k = k_override or cfg.top_k
        probs_rows, chosen_rows, choices = [], [], [[None] * T for _ in range(k)]
        for t in range(T):
            probs = torch.softmax(logit_fn(router, x[t]), dim=0)
            chosen, _ = topk_ref(probs.detach() if frozen_choice is None else frozen_choice(router, x[t]), k)
            w = gate_ref(probs, chosen, cfg.norm_topk_prob)  # the gates of the chosen experts, from the live probs
            probs_rows.append(probs)
            chosen_rows.append(chosen)
            for c in range(k):
                choices[c][t] = (t, chosen[c], w[c], x[t])
        cap = capacity_ref(T * k, E, cfg.capacity_factor, cfg.min_capacity) if cfg.drop_tokens else None
        y = moe_ref(choices, layer.experts, T, cap)
        aux = torch.zeros(())
        if router.balance_loss_coef > 0 and frozen_choice is None:
            aux = aux + router.balance_loss_coef * _balance([p for p in probs_rows], chosen_rows, E)
        if extra_aux is not None:
            aux = aux + extra_aux(router, x, probs_rows)
        return y, aux
    return ref


def topk_logits(router, v):
    return torch.stack([v @ router.wg.weight[e] for e in range(router.wg.weight.shape[0])])


def xmoe_logits(router, v):
    z = v @ router.proj.weight.t()
    z = z / z.norm()
    tau = torch.exp(router.log_temperature.reshape(()))
    return torch.stack([z @ (e / e.norm()) / tau for e in router.expert_emb])


def check(diffs):
    bad = {k: v for k, v in diffs.items() if v > TOL}
    assert not bad, bad


@pytest.mark.parametrize("experts", ["loop", "grouped"])
@pytest.mark.parametrize("k,drop,norm", [(1, False, True), (2, False, True), (2, True, True), (3, True, True),
                                         (2, False, False), (3, True, False)])
def test_topk_router(experts, k, drop, norm):
    layer = make_layer(router="topk", top_k=k, expert_impl=experts, drop_tokens=drop, capacity_factor=1.0,
                       norm_topk_prob=norm)
    diffs, _ = run_both(layer, softmax_router_ref(topk_logits))
    check(diffs)
    assert diffs["grad:router.wg.weight"] <= TOL


def _task_grads(layer, T=32, seed=3):
    """Gradients of a task loss alone (no auxiliary loss) on every learnable parameter of the layer's routing."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, layer.cfg.hidden_size, generator=g)
    target = torch.randn(T, layer.cfg.hidden_size, generator=g)
    y, _ = layer(x)
    ((y - target) ** 2).mean().backward()
    parts = [("router", layer.router), ("mix", layer.mix)]
    return {f"{name}.{n}": (p.grad.norm().item() if p.grad is not None else 0.0)
            for name, part in parts if part is not None for n, p in part.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("router", ["topk", "xmoe", "stablemoe", "vqmoe"])
def test_every_learned_router_gets_a_task_gradient(router, k):
    """With the balance loss off, the task loss alone must move every learnable routing parameter, at k = 1 as
    at k = 2 (a renormalised single probability is the constant 1 and would give none).  StableMoE in stage 1:
    its distilled router learns from the distillation loss, not from the task, so only its gate is checked."""
    layer = make_layer(router=router, top_k=k, balance_loss_coef=0.0, stablemoe_stage1_steps=100, codebook_size=6)
    grads = _task_grads(layer)
    if router == "stablemoe":
        grads = {n: v for n, v in grads.items() if not n.startswith("router.distilled")}
    assert grads and all(v > 1e-6 for v in grads.values()), grads


@pytest.mark.parametrize("experts", ["loop", "grouped"])
def test_xmoe_router(experts):
    layer = make_layer(router="xmoe", top_k=2, xmoe_dim=8, expert_impl=experts)
    diffs, _ = run_both(layer, softmax_router_ref(xmoe_logits))
    check(diffs)
    assert "grad:router.log_temperature" in diffs  # the temperature is learned


def test_stablemoe_stage1_distills():
    layer = make_layer(router="stablemoe", top_k=1, stablemoe_stage1_steps=10, stablemoe_distill_dim=4)

    def distill(router, x, probs_rows):
        student = x.detach() @ router.distilled[0].weight.t() @ router.distilled[1].weight.t()
        target = torch.tensor([int(torch.argmax(p.detach())) for p in probs_rows])
        ce = sum(-torch.log_softmax(student[t], 0)[target[t]] for t in range(x.shape[0])) / x.shape[0]
        return router.distill_coef * ce

    diffs, _ = run_both(layer, softmax_router_ref(topk_logits, extra_aux=distill))
    check(diffs)
    assert diffs["grad:router.distilled.0.weight"] <= TOL


@pytest.mark.parametrize("experts", ["loop", "grouped"])
def test_stablemoe_stage2_routes_with_frozen_snapshot(experts):
    layer = make_layer(router="stablemoe", top_k=2, stablemoe_stage1_steps=5, expert_impl=experts)
    layer.router.set_step(5)
    assert layer.router.stage == 2
    snap = [w.detach().clone() for w in (layer.router.distilled[0].weight, layer.router.distilled[1].weight)]

    def frozen_choice(router, v):
        return F.softmax(v.detach() @ snap[0].t() @ snap[1].t(), 0)

    diffs, _ = run_both(layer, softmax_router_ref(topk_logits, frozen_choice=frozen_choice))
    check(diffs)
    # moving the distilled parameters after the switch does not change the routing
    with torch.no_grad():
        layer.router.distilled[0].weight.normal_()
    x = torch.randn(10, 16)
    before = layer.route(x)[1].experts_KS
    assert torch.equal(before, torch.stack([F.softmax(x @ snap[0].t() @ snap[1].t(), 1).topk(2, 1).indices[:, i] for i in range(2)]))


@pytest.mark.parametrize("experts", ["loop", "grouped"])
def test_smoe_dropout_k_schedule(experts):
    layer = make_layer(router="smoe_dropout", smoe_dropout_k_start=1, smoe_dropout_k_end=4, smoe_dropout_k_steps=9,
                       expert_impl=experts)
    assert layer.router.current_k() == 1
    layer.router.set_step(4)  # 1 + floor(3 * 4/9) = 2
    assert layer.router.current_k() == 2
    layer.router.set_step(100)
    assert layer.router.current_k() == 4
    layer.router.set_step(4)
    assert not layer.router.wg.weight.requires_grad  # frozen random router

    def frozen(router, v):
        return torch.softmax(topk_logits(router, v), 0).detach()

    diffs, _ = run_both(layer, softmax_router_ref(topk_logits, frozen_choice=frozen, k_override=2))
    check(diffs)


def test_balance_loss_is_one_for_uniform_router():
    layer = make_layer(router="topk", top_k=1)
    with torch.no_grad():
        layer.router.wg.weight.zero_()  # uniform probabilities, argmax ties -> all to expert 0
    _, aux = layer(torch.randn(8, 16))
    # f = [1, 0, 0, 0], P = [1/4]*4 -> N * 1 * 1/4 = 1
    assert math.isclose(aux.item(), layer.cfg.balance_loss_coef * 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("router", ["topk", "xmoe", "stablemoe", "smoe_dropout", "vq", "vqmoe"])
def test_no_zero_dim_parameters(router):
    """DeepSpeed's initial broadcast views every parameter as bytes, which fails on 0-dim tensors."""
    layer = make_layer(router=router, codebook_size=6)
    assert [n for n, p in layer.named_parameters() if p.dim() == 0] == []
