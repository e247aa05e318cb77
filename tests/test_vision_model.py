"""The ViT: closed-form parameter counts equal the built model for every named shape (large on the meta
device), every router of the library plus SoftMoE fits its FFN slots and trains (loss and aux reach the
parameters), pooling, patch embedding layout, and the config checks."""
import pytest
import torch

from vqmoe_ds.moe import MoELayer
from vqmoe_ds.moe.config import ROUTERS, ConfigError
from vqmoe_ds.vision import SoftMoE, build_vit, count_params, vit_config
from vqmoe_ds.vision.vit import NAMED


@pytest.mark.parametrize("name", list(NAMED))
@pytest.mark.parametrize("router", ["vqmoe", "topk", "soft", "dense"])
def test_param_counts_match_built_model(name, router):
    cfg = vit_config(name, moe={"router": router}, num_classes=1000 if name == "large" else 10)
    model = build_vit(cfg, device="meta" if name == "large" else None)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)["total"]


def test_named_sizes():
    small = count_params(vit_config("small"))["total"]
    large = count_params(vit_config("large", num_classes=1000))["total"]
    assert 9.5e6 < small < 11e6, small
    assert 105e6 < large < 115e6, large
    # large: 12 blocks, 6 MoE layers of 8 experts of width 1728, every other block
    cfg = vit_config("large", num_classes=1000)
    assert cfg.moe_layer_ids() == [1, 3, 5, 7, 9, 11]
    assert count_params(cfg)["experts"] == 6 * 8 * (2 * 512 * 1728 + 1728 + 512)


@pytest.mark.parametrize("router", [r for r in ROUTERS if r != "hash"] + ["soft"])  # hash: token ids only
def test_every_router_fits_and_learns(router):
    torch.manual_seed(0)
    moe = {"router": router}
    if router == "soft":
        moe["slots_per_expert"] = 2
    model = build_vit(vit_config("tiny", num_classes=5, moe=moe))
    kinds = [type(b.ffn) for b in model.blocks]
    want = {"dense": "DenseFFN", "soft": "SoftMoE"}.get(router, "MoELayer")
    assert [k.__name__ for k in kinds] == [want, want]
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    logits, loss, aux = model(x, y)
    assert logits.shape == (4, 5)
    assert abs(loss.item() - torch.log(torch.tensor(5.0)).item()) < 1e-5  # zero head: uniform start
    (loss + aux).backward()
    assert model.head.weight.grad.abs().sum() > 0
    # the zero head passes no gradient back at the first step; after one step it reaches through every block
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    _, loss2, aux2 = model(x, y)
    (loss2 + aux2).backward()
    assert model.patch_embed.weight.grad.abs().sum() > 0
    if router != "dense":
        ffn = model.blocks[0].ffn
        assert isinstance(ffn, SoftMoE if router == "soft" else MoELayer)
        assert "expert_load" in ffn.stats()
        expert_grads = [p.grad for e in ffn.experts for p in e.parameters()]
        assert sum(g.abs().sum() for g in expert_grads if g is not None) > 0


def test_pooling_and_patches():
    torch.manual_seed(0)
    mean_model = build_vit(vit_config("tiny", pool="mean", moe={"router": "dense"}))
    assert mean_model.cls_token is None and mean_model.pos_emb.shape == (1, 16, 64)
    cls_model = build_vit(vit_config("tiny", pool="cls", moe={"router": "dense"}))
    assert cls_model.pos_emb.shape == (1, 17, 64)
    # the strided conv sees disjoint 4x4 patches: changing one pixel changes exactly one patch token
    x = torch.randn(1, 3, 16, 16)
    x2 = x.clone()
    x2[0, :, 5, 9] += 1.0  # row 5, column 9 -> patch (1, 2) -> token 1 * 4 + 2
    t1 = cls_model.patch_embed(x).flatten(2).transpose(1, 2)
    t2 = cls_model.patch_embed(x2).flatten(2).transpose(1, 2)
    changed = ((t1 - t2)[0].abs().amax(-1) > 1e-4).nonzero().flatten().tolist()
    assert changed == [6]


def test_config_errors():
    with pytest.raises(ConfigError, match="not a multiple of the patch size"):
        vit_config("tiny", image_size=18)
    with pytest.raises(ConfigError, match="not divisible by 3 attention heads"):
        vit_config("tiny", n_head=3)
    with pytest.raises(ConfigError, match="apply to router soft only"):
        vit_config("tiny", moe={"router": "topk", "slots_per_expert": 2})
    with pytest.raises(ConfigError, match="SoftMoE takes no top_k"):
        vit_config("tiny", moe={"router": "soft", "top_k": 2})
    with pytest.raises(ConfigError, match="unknown pool"):
        vit_config("tiny", pool="max")
    model = build_vit(vit_config("tiny", moe={"router": "dense"}))
    with pytest.raises(ValueError, match="expects 3x16x16"):
        model(torch.randn(1, 3, 32, 32))
