"""GPT: causality, the loss it reports, weight init leaving MoE experts alone, tied embeddings."""
import math

import torch
import torch.nn.functional as F

from vqmoe_ds.models import build_model, moe_layers, named_config


def tiny_gpt(router="vqmoe", **kw):
    torch.manual_seed(0)
    moe = {"router": router, "num_experts": 4, "top_k": 2, "drop_tokens": False, "codebook_size": 8}
    return build_model(named_config("tiny", moe=moe, **kw)).eval()


def test_future_token_cannot_change_past_logits():
    for router in ("vqmoe", "topk", "xmoe", "dense"):
        model = tiny_gpt(router)
        idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
        changed = idx.clone()
        changed[:, 20] = (changed[:, 20] + 7) % 256
        with torch.no_grad():
            a, b = model(idx)[0], model(changed)[0]
        assert (a[:, :20] - b[:, :20]).abs().max() == 0, router
        assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-4, router


def test_loss_is_mean_nll_and_aux_is_sum_over_layers():
    model = tiny_gpt("vqmoe", moe_layers="all")
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    tgt = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    logits, loss, aux, mems = model(idx, tgt)
    assert mems is None
    logp = F.log_softmax(logits.double(), -1)
    nll = -logp.gather(-1, tgt[..., None]).mean()
    assert abs(loss.item() - nll.item()) < 1e-5
    # aux = sum of each MoE layer's own aux: recompute layer by layer
    x = model.wte(idx) + model.wpe(torch.arange(16))
    total = 0.0
    for block in model.blocks:
        x = x + block.attn(block.ln1(x))
        y, a = block.ffn(block.ln2(x))
        x = x + y
        total += a.item()
    assert total > 0 and abs(aux.item() - total) < 1e-6


def test_init_keeps_moe_experts_distinct_and_tied_head():
    model = tiny_gpt("topk")
    layer = moe_layers(model)[0]
    w0, w1 = layer.experts[0].fc1.weight, layer.experts[1].fc1.weight
    assert (w0 - w1).abs().max() > 1e-3  # not re-initialised into a shared draw
    assert model.lm_head.weight is model.wte.weight
    stds = model.blocks[0].attn.c_attn.weight.std().item(), model.blocks[0].attn.c_proj.weight.std().item()
    assert abs(stds[0] - 0.02) < 0.003 and abs(stds[1] - 0.02 / math.sqrt(4)) < 0.002
    untied = tiny_gpt("topk", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight


def test_every_other_layer_is_moe():
    model = tiny_gpt("topk", n_layer=4, moe_layers="every_other")
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["DenseFFN", "MoELayer", "DenseFFN", "MoELayer"]


def test_residual_output_projections_get_the_depth_scaled_init():
    """GPT-2's init: every residual branch's output projection -- attention's c_proj, the dense FFN's fc2 and
    every expert's fc2 -- is N(0, std / sqrt(2 n_layer)); the input projections stay N(0, std)."""
    import math

    torch.manual_seed(0)
    cfg = named_config("tiny", n_layer=4, d_model=128, d_inner=256, moe_layers="1,3",
                       moe={"router": "vqmoe", "num_experts": 4, "top_k": 2})
    model = build_model(cfg)
    scaled = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    dense, moe = model.blocks[0].ffn, model.blocks[1].ffn
    for w, want in [(model.blocks[0].attn.c_proj.weight, scaled), (dense.mlp.fc2.weight, scaled),
                    (dense.mlp.fc1.weight, cfg.init_std)] + \
                   [(e.fc2.weight, scaled) for e in moe.experts] + [(e.fc1.weight, cfg.init_std) for e in moe.experts]:
        assert abs(w.std().item() / want - 1) < 0.05, (w.shape, w.std().item(), want)
