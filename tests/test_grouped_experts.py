"""Grouped-GEMM experts (``--moe-expert-impl``): equal to a per-token loop over the experts' raw weights, sync-free
capacity dispatch equal to a route-by-route reference, one-line refusals, and no host sync in the forward and
backward of the shipped layers.

The references take the experts' weights as raw tensors and apply ``x W1^T + b1 -> act -> W2^T + b2`` token by
token; nothing here calls ``grouped_experts`` or the dispatch to compute an expected value."""
import collections
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from layer_harness import make_layer

from vqmoe_ds.moe import MoEConfig
from vqmoe_ds.moe.grouped import grouped_experts, use_grouped


def _expert_ref(x_D, w1, b1, w2, b2, activation):
    h = x_D @ w1.t() + (b1 if b1 is not None else 0)
    if activation == "swiglu":
        F_ = h.shape[-1] // 2
        h = F.silu(h[..., :F_]) * h[..., F_:]
    else:
        h = F.gelu(h)
    return h @ w2.t() + (b2 if b2 is not None else 0)


def _layer(**kw):
    """The harness's small layer (non-zero expert biases) with MoEConfig's own capacity settings: the shipped
    defaults drop routes beyond capacity."""
    shipped = {f.name: f.default for f in dataclasses.fields(MoEConfig)
               if f.name in ("drop_tokens", "min_capacity", "capacity_factor", "dispatcher")}
    return make_layer(**{**shipped, **kw})


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_experts_equal_a_token_loop(activation, bias):
    layer = _layer(activation=activation, linear_bias=bias)
    experts = layer.experts
    counts = [3, 0, 5, 2]  # an expert with no rows too
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), 16, generator=g, requires_grad=True)
    R = torch.randn(sum(counts), 16, generator=g)
    y = grouped_experts(experts, x, torch.tensor(counts))
    (y * R).sum().backward()
    gx, gw = x.grad.clone(), [e.fc1.weight.grad.clone() for e in experts]

    x2 = x.detach().clone().requires_grad_(True)
    raw = [(e.fc1.weight.detach().clone().requires_grad_(True), e.fc1.bias, e.fc2.weight.detach().clone(),
            e.fc2.bias) for e in experts]
    owner = [e for e, n in enumerate(counts) for _ in range(n)]
    y_ref = torch.stack([_expert_ref(x2[m], raw[e][0], None if raw[e][1] is None else raw[e][1].detach(), raw[e][2],
                                     None if raw[e][3] is None else raw[e][3].detach(), activation)
                         for m, e in enumerate(owner)])
    (y_ref * R).sum().backward()
    assert y.shape == (10, 16)
    assert (y - y_ref).abs().max() < 1e-5
    assert (gx - x2.grad).abs().max() < 1e-5
    for e in (0, 2, 3):
        assert (gw[e] - raw[e][0].grad).abs().max() < 1e-5
    assert raw[1][0].grad is None and gw[1].abs().max() == 0  # the expert without rows gets no gradient


def test_capacity_dispatch_without_sync_equals_route_by_route_reference():
    """Grouped on one rank keeps dropped routes in the GEMM and gives them weight 0: the output must be the
    capacity semantics (first ``capacity`` routes per expert in priority order, choice-major), written here as
    a loop over routes."""
    layer = _layer(drop_tokens=True, capacity_factor=0.5, min_capacity=0, expert_impl="grouped")
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        X_SD, grid, _, _ = layer.route(x)
        y = layer(x)[0]
    K, S = grid.experts_KS.shape
    cap = -(-int(0.5 * K * S) // 4)  # ceil(0.5 * routes / experts)
    taken = collections.Counter()
    y_ref = torch.zeros(12, 16)
    for kk in range(K):
        for s in range(S):
            e = int(grid.experts_KS[kk, s])
            if taken[e] >= cap:
                continue
            taken[e] += 1
            ex = layer.experts[e]
            y_ref[s] += grid.weights_KS[kk, s] * _expert_ref(X_SD[s], ex.fc1.weight, ex.fc1.bias, ex.fc2.weight,
                                                             ex.fc2.bias, "gelu")
    assert sum(taken.values()) < K * S  # the capacity did drop routes
    assert (y - y_ref).abs().max() < 1e-5


def test_expert_impl_choices_and_refusals():
    x32 = torch.zeros(2, 16)
    assert use_grouped("loop", x32, 16, 24) is False
    assert use_grouped("auto", x32, 16, 24) is False  # auto: bf16 on CUDA sm90+ only
    assert use_grouped("grouped", x32, 16, 24) is True
    with pytest.raises(ValueError) as e:
        use_grouped("grouped", torch.zeros(2, 10), 10, 24)  # 40-byte rows are not a multiple of 16
    msg = str(e.value)
    assert "\n" not in msg and "hidden size (10)" in msg and "--moe-expert-impl loop" in msg
    with pytest.raises(ValueError):
        use_grouped("grouped", torch.zeros(2, 16, dtype=torch.float64), 16, 24)
    for kw, words in [(dict(expert_impl="fast"), "unknown expert implementation 'fast'"),
                      (dict(expert_impl="grouped", dispatcher="deepspeed"), "sorted dispatcher only")]:
        with pytest.raises(ValueError) as e:
            MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, **kw)
        assert words in str(e.value) and "\n" not in str(e.value)
    assert MoEConfig(hidden_size=16, ffn_hidden_size=24).expert_impl == "auto"


SYNC_OPS = {"_local_scalar_dense", "nonzero", "bincount", "masked_select", "unique", "_unique2", "equal"}


class _SyncSpy(TorchDispatchMode):
    """Records the ops that read device data back to the host (or size their output from it) on a GPU."""

    def __init__(self):
        super().__init__()
        self.hits = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            self.hits[name] += 1
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.hits["index(bool)"] += 1
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.hits["repeat_interleave"] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("kw", [dict(), dict(router="vqmoe"), dict(router="vq"), dict(router="xmoe"),
                                dict(router="stablemoe"), dict(router="smoe_dropout"),
                                dict(router="vqmoe", discrete_input="token"), dict(drop_tokens=False)],
                         ids=["topk-default", "vqmoe", "vq", "xmoe", "stablemoe", "smoe_dropout", "vqmoe-token",
                              "dropless"])
def test_grouped_layer_forward_and_backward_have_no_host_sync(kw):
    """The shipped defaults (capacity on, top-2, default VQ) and each learned router, one rank, in training:
    after the first step (the k-means init may sync once) no op of the forward or backward needs the host."""
    layer = _layer(expert_impl="grouped", **kw).train()
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    layer(x)  # first step: codebook k-means init
    for m in layer.modules():
        if hasattr(m, "set_step"):
            m.set_step(3)  # the loop announces the step once per optimizer step
    with _SyncSpy() as spy:
        y, aux = layer(x)
        (y.sum() + aux).backward()
    assert dict(spy.hits) == {}


def test_driver_at_ep2_grouped_then_resumed_with_the_loop(tmp_path):
    """2 ranks, ep 2, the VQMoE GPT trained with grouped-GEMM experts and checkpointed at step 4; resumed from there
    with the expert loop (the checkpoint format is the same; the choice may change on resume): steps 5-8 give the
    losses of the uninterrupted grouped run (the two paths differ only in the order of fp32 sums)."""
    import subprocess

    from test_launchers import records, tiny_args

    from vqmoe_ds.training.launch import ROOT, env_for_ranks, free_port, remove_new_shm, shm_files, torchrun_cmd

    def run(out, *extra):
        before = shm_files()
        try:
            r = subprocess.run(torchrun_cmd(2, tiny_args(out, "--save-interval", "4", "--eval-iters", "1",
                                                         "--test-iters", "1", "--seq-length", "32", *extra, steps=8),
                                            free_port()), env=env_for_ranks(str(tmp_path)), capture_output=True,
                               text=True, timeout=240, cwd=ROOT)
        finally:
            remove_new_shm(before)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        return {rec["step"]: rec["loss"] for rec in records(out, "train")}

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    a = run(full, "--moe-expert-impl", "grouped")
    (full / "checkpoints" / "latest").write_text("step4")
    b = run(resumed, "--moe-expert-impl", "loop", "--load", str(full / "checkpoints"), "--save", str(tmp_path / "ck"))
    assert sorted(b) == [5, 6, 7, 8] and a[8] < a[1] - 0.3
    assert max(abs(a[s] - b[s]) for s in b) < 1e-4, (a, b)
