"""The combine weight of a single route (``--moe-router-top1-weight``): "score" (Switch: the router's probability,
the shipped default) or "one" (the softmax of the chosen logit alone, as Megatron-core's default routing, FastMoE's
gates and OLMoE's ``norm_topk_prob`` compute it at k = 1).  The layer's outputs against the option's definition are
in test_routing_options.py; here: which parameters learn from the task, and the Hugging Face round trip, whose
reference is transformers' own OLMoE."""
import json

import pytest
import torch

from layer_harness import make_layer
from test_hf_olmoe import TOL, _logits, _tool, hf, imported  # noqa: F401  (module fixtures)
from test_hf_vqmoe import _save

transformers = pytest.importorskip("transformers")


def _router_grad(top1_weight, router="topk"):
    """The router weights' gradient from the task alone (no balance loss, no z-loss) of a top-1 layer."""
    layer = make_layer(router=router, top_k=1, top1_weight=top1_weight, load_balancing_type="none",
                       z_loss_coef=0.0)
    x = torch.randn(2, 8, layer.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    y = layer(x)[0]
    y.square().sum().backward()
    return layer.router.wg.weight.grad


@pytest.mark.parametrize("router", ["topk", "vqmoe"])
def test_weight_one_leaves_the_router_without_task_gradient(router):
    g_one, g_score = _router_grad("one", router), _router_grad("score", router)
    assert g_one is None or torch.count_nonzero(g_one) == 0
    assert g_score is not None and g_score.abs().max() > 1e-4


def test_weight_one_router_still_learns_from_the_balance_loss():
    layer = make_layer(top_k=1, top1_weight="one", balance_loss_coef=0.01)
    x = torch.randn(2, 8, layer.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    out = layer(x)
    aux = out[1]
    aux.backward()
    assert layer.router.wg.weight.grad.abs().max() > 0


def test_the_default_is_the_router_probability():
    from vqmoe_ds.moe.config import MoEConfig

    assert MoEConfig(hidden_size=8, ffn_hidden_size=8).top1_weight == "score"


@pytest.mark.parametrize("top1_weight, hf_norm", [("score", False), ("one", True)])
def test_top1_model_exports_to_olmoe_with_equal_logits_and_imports_back(hf, imported, tmp_path, top1_weight,
                                                                        hf_norm):  # noqa: F811
    """A top-1 model exported as OlmoeForCausalLM: transformers' logits equal ours (OLMoE renormalises one route to
    weight 1 under norm_topk_prob, so the flag carries our top1_weight), and the import gives the same setting."""
    from transformers import AutoModelForCausalLM

    from vqmoe_ds.checkpoint import read_run
    from vqmoe_ds.checkpoint.hf import model_config_from_hf

    base = read_run(str(imported)).model_config
    # norm_topk_prob on, as MoEConfig ships it: it must not reach OLMoE's flag at k = 1
    cfg = base.replace_moe(top_k=1, top1_weight=top1_weight, norm_topk_prob=True, ep_size=1)

    def spread_router(model):
        for name, p in model.named_parameters():
            if name.endswith("router.wg.weight"):
                p.copy_(torch.randn_like(p))  # probabilities far from 1: the two weights differ

    src = _save(cfg, tmp_path / "top1", spread_router)
    out = tmp_path / "hf"
    assert _tool("export_checkpoint").main(["--format", "hf", "--load", str(src), "--out", str(out)]) == 0
    written = json.load(open(out / "config.json"))
    assert (written["num_experts_per_tok"], written["norm_topk_prob"]) == (1, hf_norm)
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ours, _ = _logits(src, hf["x"])
    with torch.no_grad():
        theirs = model(hf["x"]).logits
    assert (theirs - ours).abs().max().item() < TOL
    # the other weight gives other logits: the check above can tell the two apart
    model.config.norm_topk_prob = not hf_norm
    for layer in model.model.layers:
        layer.mlp.gate.norm_topk_prob = not hf_norm
    with torch.no_grad():
        assert (model(hf["x"]).logits - ours).abs().max().item() > 1e-3
    back = model_config_from_hf({**written, "_architecture": "OlmoeForCausalLM"})
    assert back.moe_config(0).top1_weight == top1_weight


def test_an_olmoe_config_at_top1_imports_as_weight_one_under_norm_topk_prob(hf):  # noqa: F811
    from vqmoe_ds.checkpoint.hf import model_config_from_hf

    cfg = json.load(open(hf["dir"] / "per_expert" / "config.json"))
    for norm, want in ((True, "one"), (False, "score")):
        got = model_config_from_hf({**cfg, "num_experts_per_tok": 1, "norm_topk_prob": norm,
                                    "_architecture": "OlmoeForCausalLM"})
        assert got.moe_config(0).top1_weight == want
