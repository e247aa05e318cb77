"""Grouped-GEMM experts (``--moe-expert-impl``): equal to a per-token loop over the experts' raw weights, sync-free
capacity dispatch equal to a route-by-route reference, one-line refusals, no host sync in the forward and backward
of the shipped layers at one rank (no op that reads device data, no ``tolist``/``item``/``cpu``/``numpy``), and the
syncs that remain elsewhere, counted.

The references take the experts' weights as raw tensors and apply ``x W1^T + b1 -> act -> W2^T + b2`` token by
token; nothing here calls ``grouped_experts`` or the dispatch to compute an expected value."""
import collections
import dataclasses
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from layer_harness import make_layer
from sync_spy import SyncSpy

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
               if f.name in ("drop_tokens", "min_capacity", "capacity_factor")}
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
    for kw, words in [(dict(expert_impl="fast"), "unknown expert implementation 'fast'")]:
        with pytest.raises(ValueError) as e:
            MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, **kw)
        assert words in str(e.value) and "\n" not in str(e.value)
    assert MoEConfig(hidden_size=16, ffn_hidden_size=24).expert_impl == "auto"


def test_the_spy_sees_each_kind_of_host_read(monkeypatch):
    """Each host read the spy is for, done once on purpose, is counted (so an empty count below means none)."""
    t = torch.arange(6.0)
    with SyncSpy().watch(monkeypatch) as spy:
        t.tolist(), t[0].item(), t.cpu(), t.numpy(), float(t[1]), t.nonzero(), t[t > 2], torch.bincount(t.long())
    assert {k: spy.hits[k] for k in ("Tensor.tolist", "Tensor.item", "Tensor.cpu", "Tensor.numpy")} == \
        {"Tensor.tolist": 1, "Tensor.item": 1, "Tensor.cpu": 1, "Tensor.numpy": 1}
    assert spy.hits["_local_scalar_dense"] >= 2 and spy.hits["nonzero"] >= 1 and spy.hits["index(bool)"] == 1
    assert spy.hits["bincount"] == 1


def _spied_step(layer, x, monkeypatch, mask=None):
    """One forward and backward of ``layer`` in training after a first step (the k-means init may sync once), with
    the loop's per-step announcement of the step; returns the spy."""
    layer(x, mask)
    for m in layer.modules():
        if hasattr(m, "set_step"):
            m.set_step(3)  # the loop announces the step once per optimizer step
    with SyncSpy().watch(monkeypatch) as spy:
        y, aux = layer(x, mask)
        (y.sum() + aux).backward()
    return spy


@pytest.mark.parametrize("kw", [dict(), dict(router="vqmoe"), dict(router="vq"), dict(router="xmoe"),
                                dict(router="stablemoe"), dict(router="smoe_dropout"),
                                dict(router="vqmoe", discrete_input="token"), dict(drop_tokens=False)],
                         ids=["topk-default", "vqmoe", "vq", "xmoe", "stablemoe", "smoe_dropout", "vqmoe-token",
                              "dropless"])
def test_grouped_layer_forward_and_backward_have_no_host_sync(kw, monkeypatch):
    """The shipped defaults (capacity on, top-2, default VQ) and each learned router, one rank, in training: no op
    of the forward or backward needs the host, and no tensor is copied to it."""
    layer = _layer(expert_impl="grouped", **kw).train()
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    spy = _spied_step(layer, x, monkeypatch)
    assert dict(spy.hits) == {}, dict(spy.where)


def test_where_the_host_syncs_are(monkeypatch):
    """The syncs docs/training.md lists for one rank, measured: the expert loop reads the expert counts to the host
    (one ``tolist`` per layer forward, to split the rows) and, under a capacity, removes the dropped routes by a
    boolean index; a padding mask reads its kept positions (``nonzero``).  (Expert parallelism: test_expert_parallel.)"""
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loop = _spied_step(_layer(router="vqmoe", expert_impl="loop").train(), x, monkeypatch)
    assert dict(loop.hits) == {"Tensor.tolist": 1, "index(bool)": 1}, dict(loop.where)
    assert all("vqmoe_ds/moe/dispatch.py" in w for w in loop.where), dict(loop.where)
    dropless = _spied_step(_layer(router="vqmoe", expert_impl="loop", drop_tokens=False).train(), x, monkeypatch)
    assert dict(dropless.hits) == {"Tensor.tolist": 1}, dict(dropless.where)
    mask = torch.ones(24, dtype=torch.bool)
    mask[::5] = False
    masked = _spied_step(_layer(router="vqmoe", expert_impl="grouped").train(), x, monkeypatch, mask=mask)
    assert dict(masked.hits) == {"nonzero": 1}, dict(masked.hits)


def test_driver_step_reads_the_host_once_per_micro_batch(tmp_path):
    """The pretraining driver at ep 1 with grouped-GEMM experts, 2 micro-batches per step, steps 3 and 4 recorded
    (tests/workers/host_reads.py; no log or evaluation in them): vqmoe-ds reads the host once per micro-batch, the
    loop's ``tolist`` of (loss, aux loss, the all-ranks non-finite flag); every other read is inside DeepSpeed's
    engine step (ZeRO's non-finite check of the gradient norm, the optimizer)."""
    import json
    import subprocess

    from test_launchers import CPU_CFG

    from vqmoe_ds.training.launch import DRIVER, ROOT, env_for_ranks, free_port

    env = env_for_ranks(str(tmp_path))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = tmp_path / "reads"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "host_reads.py"), str(out), DRIVER,
                        "--config", "tiny", "--router", "vqmoe", "--moe-expert-impl", "grouped", "--deepspeed_config",
                        CPU_CFG, "--train-iters", "4", "--micro-batch-size", "4", "--gradient-accumulation-steps", "2",
                        "--log-interval", "100", "--eval-interval", "100", "--eval-iters", "1", "--test-iters", "1",
                        "--corpus-bytes", "100000", "--no-progress", "--no-plots", "--out-dir", str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "reads.0").read_text())
    assert rec["steps"] == 2
    ours = collections.Counter()
    for key, n in rec["reads"].items():
        what, where = key.split(" @ ")
        if " in deepspeed/" in where:
            assert where.startswith("vqmoe_ds/training/loop.py") and "deepspeed/runtime/" in where, key
        else:
            ours[(what, where.split(":")[0])] += n
    assert dict(ours) == {("Tensor.tolist", "vqmoe_ds/training/loop.py"): 2 * 2}, rec["reads"]


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
