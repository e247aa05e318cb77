"""Training-free VQMoE: the converted model computes exactly the source's outputs while its discrete path is off,
its codebook is the router's W_e (code i -> expert i), turning the path on changes the outputs, and the tool's
checkpoint loads and evaluates."""
import json
import os

import pytest
import torch

from test_finetune_support import pretrained, reference_model, reference_state, tmpdir, tool
from vqmoe_ds.finetune.convert import OFF_LOGIT, convert_state, gate_bias, vqmoe_config
from vqmoe_ds.checkpoint import CheckpointError
from vqmoe_ds.models import ModelConfig, build_model, named_config


def _tiny_topk():
    cfg = named_config("tiny", moe={"router": "topk", "top_k": 2, "drop_tokens": False})
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


def _converted(cfg, src, share, distance="l2"):
    vcfg = vqmoe_config(cfg, distance)
    torch.manual_seed(1)
    dst = build_model(vcfg)
    dst.load_state_dict(convert_state(src.state_dict(), cfg, dst.state_dict(), share), strict=True)
    return vcfg, dst.eval()


def test_off_reproduces_source_exactly_and_on_does_not():
    cfg, src = _tiny_topk()
    x = torch.randint(0, 256, (4, 64))
    _, off = _converted(cfg, src, 0.0)
    with torch.no_grad():
        assert torch.equal(src(x)[0], off(x)[0])
        _, on = _converted(cfg, src, 0.3)
        assert (src(x)[0] - on(x)[0]).abs().max() > 1e-3
    assert gate_bias(0.0) == (0.0, OFF_LOGIT) and torch.softmax(torch.tensor([0.0, OFF_LOGIT]), 0)[1] == 0.0
    assert abs(torch.softmax(torch.tensor(gate_bias(0.3)), 0)[1].item() - 0.3) < 1e-7


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_codebook_is_the_expert_embeddings_and_codes_pick_the_nearest(distance):
    cfg, src = _tiny_topk()
    _, dst = _converted(cfg, src, 0.0, distance)
    layer = dst.blocks[0].ffn
    w_e = src.blocks[0].ffn.router.wg.weight.detach()
    assert torch.equal(layer.vq_router.quantizer.codebook.detach(), w_e)
    x = torch.randn(50, 64)
    if distance == "l2":
        want = torch.cdist(x, w_e).argmin(1)
    else:
        want = (torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(w_e, dim=-1).t()).argmax(1)
    with torch.no_grad():
        assert torch.equal(layer.vq_router(x).experts_TK[:, 0], want)  # K = N: code i is expert i


def test_refuses_a_non_topk_source():
    with pytest.raises(CheckpointError, match="router topk"):
        vqmoe_config(named_config("tiny"))  # tiny is already a VQMoE


def test_tool_converts_a_driver_checkpoint_and_evaluates():
    out = tmpdir("conv")
    tool("convert_to_vqmoe.py", "--load", pretrained("topk"), "--out-dir", out, "--eval", "--eval-iters", "2")
    res = json.load(open(os.path.join(out, "conversion.json")))["eval"]
    assert res["max_abs_logit_diff"] < 1e-5  # see below
    assert res["converted"]["loss"] == pytest.approx(res["source"]["loss"], abs=1e-6)
    assert res["discrete_only"]["loss"] != res["source"]["loss"]  # a different (top-1 nearest-code) model
    cfg, sd = reference_state(os.path.join(out, "checkpoints", "converted"))
    _, src_sd = reference_state(os.path.join(pretrained("topk"), "checkpoints", "step20"))
    assert cfg.moe.router == "vqmoe" and cfg.moe.codebook_size == 4
    for i in range(2):
        assert torch.equal(sd[f"blocks.{i}.ffn.vq_router.quantizer.codebook"], src_sd[f"blocks.{i}.ffn.router.wg.weight"])
        assert sd[f"blocks.{i}.ffn.mix.bias"].tolist() == [0.0, OFF_LOGIT]
    # and the source and converted checkpoints, read independently of DeepSpeed, agree on every logit
    x = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        a = reference_model(os.path.join(pretrained("topk"), "checkpoints", "step20"))(x)[0]
        b = reference_model(os.path.join(out, "checkpoints", "converted"))(x)[0]
    # equal up to float reassociation: an expert's matmul may round a row differently when its batch also holds
    # the (zero-weighted) discrete rows; a wrong conversion differs by O(1)
    assert (a - b).abs().max() < 1e-5, (a - b).abs().max()
    written = json.load(open(os.path.join(out, "config.json")))  # the resolved config, with the converted model
    assert ModelConfig.from_dict({**written["model"], "moe": written["moe"]}).moe.router == "vqmoe"
