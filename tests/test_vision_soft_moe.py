"""SoftMoE against a reference written here with explicit loops over images, slots and tokens (outputs and
gradients to 1e-5), its per-image mixing, its stats, and expert parallelism: at ep=2 on 2 gloo ranks the
layer gives each rank the output (and gradients) of the ep=1 layer with the same weights.

Run as a script (``python tests/test_vision_soft_moe.py --worker OUT``) this file is the rank worker."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vqmoe_ds.vision.soft_moe import SoftMoE, SoftMoEConfig  # noqa: E402


def reference(x_BND, phi_DS, experts, p, scale=None):
    """Puigcerver et al.'s equations, one image, one slot, one token at a time."""
    B, N, D = x_BND.shape
    S = phi_DS.shape[1]
    out = []
    for b in range(B):
        xs = [x_BND[b, n] for n in range(N)]
        if scale is not None:
            xs_l = [v / v.norm().clamp_min(1e-12) for v in xs]
            cols = [phi_DS[:, s] / phi_DS[:, s].norm().clamp_min(1e-12) for s in range(S)]
            logit = [[scale * torch.dot(xs_l[n], cols[s]) for s in range(S)] for n in range(N)]
        else:
            logit = [[torch.dot(xs[n], phi_DS[:, s]) for s in range(S)] for n in range(N)]
        slot_out = []
        for s in range(S):
            z = sum(torch.exp(logit[n][s]) for n in range(N))
            slot_in = sum(torch.exp(logit[n][s]) / z * xs[n] for n in range(N))
            e = experts[s // p]
            h = F.gelu(slot_in @ e.fc1.weight.t() + e.fc1.bias)
            slot_out.append(h @ e.fc2.weight.t() + e.fc2.bias)
        rows = []
        for n in range(N):
            z = sum(torch.exp(logit[n][s]) for s in range(S))
            rows.append(sum(torch.exp(logit[n][s]) / z * slot_out[s] for s in range(S)))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_reference_outputs_and_gradients(normalize):
    torch.manual_seed(0)
    E, p, D = 3, 2, 8
    layer = SoftMoEConfig(hidden_size=D, ffn_hidden_size=12, num_experts=E, slots_per_expert=p, init_std=0.3,
                          normalize=normalize).build()
    if normalize:
        with torch.no_grad():
            layer.scale.fill_(1.7)
    x = torch.randn(2, 5, D, requires_grad=True)
    y, aux = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference(x_ref, layer.phi_DS, list(layer.experts), p, layer.scale)
    assert y.shape == (2, 5, D) and aux.item() == 0.0
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    params = [layer.phi_DS] + [q for e in layer.experts for q in e.parameters()] + ([layer.scale] if normalize else [])
    grads = torch.autograd.grad((y * g).sum(), [x] + params)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x_ref] + params)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[1].abs().sum() > 0  # Phi learns


def test_tokens_mix_within_an_image_only_and_stats():
    torch.manual_seed(1)
    layer = SoftMoEConfig(hidden_size=6, ffn_hidden_size=10, num_experts=4, slots_per_expert=1, init_std=0.3).build()
    x = torch.randn(3, 7, 6)
    y, _ = layer(x)
    st = layer.stats()
    # the combine weights of every token sum to 1: the experts' "load" sums to all tokens
    assert st["expert_load"].shape == (4,)
    assert abs(st["expert_load"].sum().item() - 3 * 7) < 1e-4
    assert 0.0 < st["dispatch_entropy"].item() <= 1.0
    x2 = x.clone()
    x2[1] = torch.randn(7, 6)  # change image 1 only
    y2, _ = layer(x2)
    torch.testing.assert_close(y2[0], y[0])
    torch.testing.assert_close(y2[2], y[2])
    assert (y2[1] - y[1]).abs().max() > 1e-3
    # a token permutation inside an image permutes the outputs the same way (no position dependence)
    perm = torch.randperm(7)
    y3, _ = layer(x[:, perm])
    torch.testing.assert_close(y3, y[:, perm], atol=1e-6, rtol=1e-5)


def test_needs_image_axis_and_valid_config():
    layer = SoftMoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=2).build()
    with pytest.raises(ValueError, match=r"\[batch, tokens, dim\]"):
        layer(torch.randn(10, 4))
    from vqmoe_ds.moe.config import ConfigError

    with pytest.raises(ConfigError, match="not divisible by ep_size"):
        SoftMoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=3, ep_size=2)
    with pytest.raises(ConfigError, match="slots_per_expert"):
        SoftMoEConfig(hidden_size=4, ffn_hidden_size=4, slots_per_expert=0)


def test_expert_parallel_two_ranks_match_single_rank(tmp_path):
    """2 gloo ranks, ep=2: each rank holds 2 of 4 experts and its own images; outputs and the gradients of
    its local experts must equal those of one ep=1 layer (all experts, same global-id init) run on the same
    images of both ranks."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from dist_helper import free_port

    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, outs[rank][-4000:]
        assert f"rank {rank} ok" in outs[rank]


def _worker(out_dir):
    import deepspeed
    import torch.distributed as dist

    from vqmoe_ds.parallel import setup_expert_parallel

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    cfg = dict(hidden_size=8, ffn_hidden_size=16, num_experts=4, slots_per_expert=2, init_std=0.2)
    torch.manual_seed(0)
    full = SoftMoEConfig(**cfg).build()  # ep=1: all 4 experts, seed drawn from the same RNG state
    torch.manual_seed(0)
    layer = SoftMoEConfig(**cfg, ep_size=2).build()
    setup_expert_parallel(layer)
    layer.phi_DS.data.copy_(full.phi_DS.data)
    gen = torch.Generator().manual_seed(7)
    x_all = torch.randn(2, 3, 5, 8, generator=gen)  # [rank, images, tokens, dim]: different images per rank
    x = x_all[rank].clone().requires_grad_(True)
    y, _ = layer(x)
    (y * y).sum().backward()
    y_full, _ = full(x_all[rank])
    (y_full * y_full).sum().backward()
    torch.testing.assert_close(y, y_full, atol=1e-6, rtol=1e-5)
    # local expert i of this rank is global expert 2 * rank + i: its gradient sums both ranks' images
    for i, e in enumerate(layer.experts):
        g = e.fc1.weight.grad.clone()
        ref = torch.zeros_like(g)
        for r in range(2):
            full.zero_grad()
            yr, _ = full(x_all[r])
            (yr * yr).sum().backward()
            ref += full.experts[2 * rank + i].fc1.weight.grad
        torch.testing.assert_close(e.fc1.weight, full.experts[2 * rank + i].fc1.weight)
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)
    dist.barrier()
    print(f"rank {rank} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])


def test_no_zero_dim_parameters_with_normalize():
    """DeepSpeed's initial broadcast views every parameter as bytes, which fails on 0-dim tensors."""
    layer = SoftMoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, normalize=True).build()
    assert layer.scale.shape == (1,)
    assert [n for n, p in layer.named_parameters() if p.dim() == 0] == []
