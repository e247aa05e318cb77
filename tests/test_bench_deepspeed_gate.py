"""bench/moe_layer.py compares the library's sorted dispatch with DeepSpeed's own ``MOELayer`` dispatch carrying the
same routing (bench/deepspeed_gate.py).  The comparison is fair only if both compute the same layer: with the same
router and expert weights, a stock ``deepspeed.moe.layer.MoE`` whose gate is ``DeepSpeedGate`` gives the library
layer's output and auxiliary loss, with and without capacity drops, and its input gradient."""
import os
import sys

import pytest
import torch

from vqmoe_ds.moe import MoEConfig
from vqmoe_ds.parallel import init_single_process

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


@pytest.mark.parametrize("drop", [True, False])
def test_deepspeed_dispatch_of_our_routing_equals_the_library_layer(drop):
    from deepspeed.moe.layer import MoE
    from deepspeed_gate import DeepSpeedGate

    from vqmoe_ds.moe.layer import ExpertMLP

    init_single_process()
    D, H, E = 12, 20, 4
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=2, drop_tokens=drop,
                    capacity_factor=0.75, eval_capacity_factor=0.75, min_capacity=1)
    torch.manual_seed(0)
    ours = cfg.build()
    stock = MoE(hidden_size=D, expert=ExpertMLP(D, H), num_experts=E, ep_size=1, k=1, capacity_factor=0.75,
                eval_capacity_factor=0.75, min_capacity=1, drop_tokens=drop)
    from vqmoe_ds.routers import build_router

    stock.deepspeed_moe.gate = DeepSpeedGate(E, 0.75, 0.75, 1, drop, router=build_router(cfg))
    stock.deepspeed_moe.gate.router.load_state_dict(ours.router.state_dict())
    for mine, theirs in zip(ours.experts, stock.deepspeed_moe.experts.deepspeed_experts):
        theirs.load_state_dict(mine.state_dict())
    x = torch.randn(2, 16, D)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, aux_ours = ours(xa)
    y_stock, aux_stock, _ = stock(xb)
    assert torch.allclose(y_ours, y_stock, atol=1e-6), (y_ours - y_stock).abs().max()
    assert torch.allclose(aux_ours, aux_stock, atol=1e-7)
    if drop:  # capacity 0.75 x 2 routes x 32 tokens / 4 experts: some routes are dropped, the same ones in both
        assert float(ours.stats()["dropped_fraction"]) > 0
    (y_ours.square().sum() + aux_ours).backward()
    (y_stock.square().sum() + aux_stock).backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
