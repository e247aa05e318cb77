"""Parameter counts of the named configs, built on the meta device, against hand-written formulas."""
import pytest
import torch

from vqmoe_ds.models import build_model, count_params, flops_per_token, named_config
from vqmoe_ds.moe import ConfigError


def hand_count(V, D, L, F, E, K_code, T, active_routes, tied=True, router="vqmoe"):
    ln = 2 * D
    attn = D * 3 * D + 3 * D + D * D + D
    expert = D * F + F + F * D + D
    rtr = D * E + (K_code * D + 2 * D + 2 if router == "vqmoe" else 0)  # W_r, codebook, mixing gate W_g
    emb = V * D + T * D + (0 if tied else V * D)
    non_expert = emb + L * (attn + 2 * ln + rtr) + ln
    return non_expert + L * E * expert, non_expert + L * active_routes * expert


@pytest.mark.parametrize("name,hand", [
    ("base", dict(V=256, D=256, L=4, F=512, E=16, K_code=16, T=512, active_routes=3)),
    ("large", dict(V=256, D=512, L=12, F=1024, E=16, K_code=16, T=512, active_routes=3)),
    ("olmoe", dict(V=50304, D=2048, L=16, F=1024, E=64, K_code=0, T=4096, active_routes=8, tied=False,
                   router="topk")),
])
def test_named_counts_match_formula_and_meta_model(name, hand):
    cfg = named_config(name)
    total, active = hand_count(**hand)
    c = count_params(cfg)
    assert (c["total"], c["active"]) == (total, active)
    model = build_model(cfg, "meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == total


def test_sizes_are_the_advertised_ones():
    assert 17e6 < count_params(named_config("base"))["total"] < 21e6  # ~20M
    assert 200e6 < count_params(named_config("large"))["total"] < 220e6  # ~210M
    olmoe = count_params(named_config("olmoe"))
    assert 4.7e9 < olmoe["total"] < 4.9e9 and 1.0e9 < olmoe["active"] < 1.05e9


def test_txl_count_matches_model():
    cfg = named_config("base", model="txl", mem_len=512)
    model = build_model(cfg, "meta")
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)["total"]


FLOP_CASES = {
    "dense GPT": dict(moe={"router": "dense"}),
    "top-2 GPT": dict(moe={"router": "topk", "num_experts": 4, "top_k": 2, "drop_tokens": False}),
    "VQMoE GPT (default codebook)": dict(moe={"router": "vqmoe", "num_experts": 4, "top_k": 2, "codebook_size": 8,
                                              "drop_tokens": False}),
    "VQMoE GPT (low-dim codebook)": dict(moe={"router": "vqmoe", "num_experts": 4, "top_k": 1, "codebook_size": 8,
                                              "codebook_dim": 8, "drop_tokens": False}),
    "XMoE GPT": dict(moe={"router": "xmoe", "num_experts": 4, "top_k": 1, "drop_tokens": False}),
    "StableMoE GPT (stage 1)": dict(moe={"router": "stablemoe", "num_experts": 4, "top_k": 1, "drop_tokens": False}),
    "SMoE-Dropout GPT (k = 2)": dict(moe={"router": "smoe_dropout", "num_experts": 4, "smoe_dropout_k_start": 2,
                                          "smoe_dropout_k_end": 2, "drop_tokens": False}),
    "Transformer-XL top-2": dict(model="txl", mem_len=32, moe={"router": "topk", "num_experts": 4, "top_k": 2,
                                                               "drop_tokens": False}),
    # the configurable GPT block: RMSNorm, SwiGLU, RoPE, QK-norm, no biases, untied (OLMoE's block)
    "OLMoE-style GPT": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", qk_norm="hidden",
                            add_bias_linear=False, tie_embeddings=False,
                            moe={"router": "topk", "num_experts": 4, "top_k": 2, "norm_topk_prob": False,
                                 "drop_tokens": False}),
    "SwiGLU dense GPT, per-head QK-norm": dict(swiglu=True, qk_norm="head", moe={"router": "dense"}),
    "SwiGLU VQMoE GPT with shared expert": dict(swiglu=True, position_embedding_type="rope",
                                                moe={"router": "vqmoe", "num_experts": 4, "top_k": 2,
                                                     "codebook_size": 8, "shared_expert_size": 32,
                                                     "drop_tokens": False}),
}


@pytest.mark.parametrize("name", list(FLOP_CASES))
def test_flops_per_token_matches_torch_flop_counter(name):
    """flops_per_token against torch's FlopCounterMode on a real forward + backward (the math attention kernel,
    which computes the full T x T products like the formula).  The one thing the counter cannot see is the
    fused nearest-code kernel (a custom op): its distances, 2 C K per token and VQ layer, are added by hand."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from vqmoe_ds.parallel import init_single_process

    init_single_process()
    torch.manual_seed(0)
    cfg = named_config("tiny", **FLOP_CASES[name])
    model = build_model(cfg)
    B, T = 2, cfg.seq_len
    idx, tgt = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))
    mems = model(idx)[3] if cfg.model == "txl" else None  # a full memory, as in training
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss, aux, _ = model(idx, tgt, mems)
        (loss + aux).backward()
    counted = counter.get_total_flops() / (B * T)
    vq_layers = sum(cfg.moe_config(i).router == "vqmoe" for i in range(cfg.n_layer))
    C = cfg.moe.codebook_dim or cfg.d_model
    counted += vq_layers * 2 * C * cfg.moe.codebook_size
    assert flops_per_token(cfg, batch_size=B) == pytest.approx(counted, rel=1e-9), (flops_per_token(cfg, B), counted)


def test_bad_model_settings_raise_one_line():
    for kw, word in [(dict(n_head=5), "divisible"), (dict(moe_layers="0,9"), "outside"),
                     (dict(mem_len=4), "txl")]:
        with pytest.raises(ConfigError) as e:
            named_config("tiny", **kw)
        assert word in str(e.value) and "\n" not in str(e.value)


def test_olmoe_1b_7b_matches_the_published_counts_on_the_meta_device():
    """OLMoE-1B-7B: 6.9B parameters in all, 1.3B active per token (its paper and model card).  The formula here
    is written out from OLMoE's modules: untied embedding and LM head, per layer q/k/v/o (no biases), q_norm and
    k_norm over the hidden size, two RMSNorms, a router E x D and 64 SwiGLU experts (gate, up, down)."""
    V, D, L, F, E, k = 50304, 2048, 16, 1024, 64, 8
    per_layer = 4 * D * D + 2 * D + 2 * D + E * D
    total = 2 * V * D + L * per_layer + D + L * E * 3 * D * F
    active = 2 * V * D + L * per_layer + D + L * k * 3 * D * F
    cfg = named_config("olmoe-1b-7b")
    c = count_params(cfg)
    assert (c["total"], c["active"]) == (total, active)
    assert round(c["total"] / 1e9, 1) == 6.9 and round(c["active"] / 1e9, 1) == 1.3
    model = build_model(cfg, "meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == total
    block = model.blocks[0]
    assert type(block.ln1).__name__ == "RMSNorm" and block.attn.c_attn.bias is None
    assert tuple(block.ffn.experts[0].fc1.weight.shape) == (2 * F, D) and not hasattr(model, "wpe")


@pytest.mark.parametrize("kw", [
    dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", qk_norm="hidden", add_bias_linear=False,
         tie_embeddings=False, moe={"router": "topk", "num_experts": 4, "top_k": 2}),
    dict(qk_norm="head", add_bias_linear=False, moe_layers="1", moe={"router": "xmoe", "num_experts": 4, "top_k": 1}),
    dict(swiglu=True, normalization="RMSNorm", moe={"router": "vqmoe", "num_experts": 4, "top_k": 2,
                                                    "shared_expert_size": 16, "shared_expert_mode": "gate"}),
], ids=["olmoe-block", "head-qk-norm-no-bias", "swiglu-vqmoe-shared"])
def test_new_block_counts_match_the_built_model(kw):
    cfg = named_config("tiny", **kw)
    model = build_model(cfg, "meta")
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)["total"]


def test_bad_block_settings_raise_one_line():
    for kw, word in [(dict(normalization="BatchNorm"), "normalization"), (dict(qk_norm="all"), "qk_norm"),
                     (dict(model="txl", mem_len=4, swiglu=True), "--model gpt only"),
                     (dict(swiglu=True, moe={"activation": "relu"}), "disagree"),
                     (dict(position_embedding_type="rope", n_head=64), "even head dimension"),
                     (dict(rotary_base=1.0), "rotary_base")]:
        with pytest.raises(ConfigError) as e:
            named_config("tiny", **kw)
        assert word in str(e.value) and "\n" not in str(e.value)
