"""``ModelConfig.moe`` is a typed ``MoEConfig`` of the model's MoE settings: a dict is refused, records of the
dict-shaped form (a checkpoint's ``model_config``) read into it with the same values and every other setting at its
default, the record written back is the one read, and the model fills in the layer fields (sizes, init, vocabulary,
MLP form) of each MoE layer.  The expected values below are written out, not taken from the classes."""
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest

from vqmoe_ds import checkpoint as ckpt
from vqmoe_ds.models import ModelConfig, named_config
from vqmoe_ds.moe import ConfigError, MoEConfig

# a checkpoint's model_config as the drivers write it: the MoE settings that were given, plus a retired key
RECORD = {"model": "gpt", "vocab_size": 256, "n_layer": 2, "n_head": 4, "d_model": 64, "d_inner": 128, "seq_len": 64,
          "mem_len": 0, "dropout": 0.0, "attn_dropout": 0.0, "tie_embeddings": True, "moe_layers": "all",
          "expert_ffn": None,
          "moe": {"router": "vqmoe", "num_experts": 4, "top_k": 2, "codebook_size": 8, "dispatcher": "sorted"},
          "init_std": 0.02, "normalization": "LayerNorm", "norm_epsilon": 1e-05, "swiglu": False,
          "position_embedding_type": "learned_absolute", "rotary_base": 10000.0, "qk_norm": "none",
          "add_bias_linear": True}
SET_BY_MODEL = {"hidden_size", "ffn_hidden_size", "init_std", "output_init_std", "vocab_size", "linear_bias"}


def test_a_dict_is_refused_with_the_fix_named():
    with pytest.raises(TypeError, match="MoEConfig.from_settings"):
        ModelConfig(moe={"router": "topk", "num_experts": 4})
    cfg = named_config("tiny")
    with pytest.raises(TypeError, match="from_settings"):
        cfg.replace(moe=dict(router="topk"))
    with pytest.raises(TypeError, match="layer's MoEConfig"):  # a layer's config (sizes filled in) is no setting
        ModelConfig(moe=cfg.moe_config(0))


def test_an_old_record_loads_into_moe_config_with_its_values_and_the_defaults():
    cfg = ModelConfig.from_dict(json.loads(json.dumps(RECORD)))
    m = cfg.moe
    assert type(m) is MoEConfig
    assert (m.router, m.num_experts, m.top_k, m.codebook_size) == ("vqmoe", 4, 2, 8)  # the record's
    assert (m.ep_size, m.vq_beta, m.capacity_factor, m.activation, m.cluster_warmup_steps, m.vq_distance) == \
        (1, 0.25, 1.25, "gelu", 100, "cosine")  # the defaults
    assert not hasattr(m, "dispatcher")
    # the layer fields are the model's, unset in the settings
    assert all(getattr(m, name) is None for name in ("hidden_size", "ffn_hidden_size", "output_init_std", "vocab_size"))
    # and written back, the record is the one read (without the retired key), key for key and in order
    back = cfg.to_dict()
    assert json.dumps(back) == json.dumps({**RECORD, "moe": {k: v for k, v in RECORD["moe"].items()
                                                            if k != "dispatcher"}})
    assert ModelConfig.from_dict({k: v for k, v in RECORD.items() if k != "moe"}).moe.settings() == \
        {"router": "topk", "num_experts": 8, "top_k": 2}  # no moe record: the default settings


def test_settings_round_trip_and_mean_what_was_given():
    m = MoEConfig.from_settings({"router": "vq", "num_experts": 4, "ep_size": 1, "activation": "gelu"})
    assert m.settings() == {"router": "vq", "num_experts": 4, "ep_size": 1, "activation": "gelu"}
    assert m.router == "vq"  # a model's settings are kept as given: the layer's config is discrete-only VQMoE
    again = MoEConfig.from_settings(json.loads(json.dumps(m.settings())))
    assert again == m and again.settings() == m.settings()
    assert set(m.all_settings()) == {f.name for f in dataclasses.fields(MoEConfig)} - SET_BY_MODEL
    assert set(MoEConfig.model_set_fields()) == SET_BY_MODEL
    changed = m.replace(top_k=1, ep_size=2)
    assert changed.settings() == {"router": "vq", "num_experts": 4, "ep_size": 2, "activation": "gelu", "top_k": 1}
    assert m.top_k == 2 and m.ep_size == 1  # the original is unchanged
    with pytest.raises(TypeError, match="'bogus' is no MoE setting"):
        MoEConfig.from_settings({"bogus": 1})
    with pytest.raises(TypeError, match="'hidden_size' is filled in by the model"):
        MoEConfig.from_settings({"hidden_size": 64})
    with pytest.raises(TypeError, match="moe_config"):
        MoEConfig.from_settings({"router": "topk"}).build()


def test_the_model_fills_in_the_layer_fields():
    cfg = ModelConfig.from_dict({**RECORD, "moe": {"router": "vq", "num_experts": 4, "codebook_size": 8},
                                 "moe_layers": "1", "expert_ffn": 96, "init_std": 0.03, "vocab_size": 300})
    layer = cfg.moe_config(1)
    assert (layer.hidden_size, layer.ffn_hidden_size, layer.init_std, layer.vocab_size, layer.linear_bias) == \
        (64, 96, 0.03, 300, True)
    assert layer.output_init_std == pytest.approx(0.03 / math.sqrt(4))  # init_std / sqrt(2 n_layer)
    assert (layer.router, layer.vqmoe_mode) == ("vqmoe", "discrete_only")  # "vq", the short name
    dense = cfg.moe_config(0)  # not an MoE layer: a dense FFN of width d_inner
    assert (dense.router, dense.hidden_size, dense.ffn_hidden_size) == ("dense", 64, 128)
    glu = ModelConfig.from_dict({**RECORD, "swiglu": True, "add_bias_linear": False}).moe_config(0)
    assert (glu.activation, glu.linear_bias) == ("swiglu", False)
    cfg = cfg.replace_moe(num_experts=8, codebook_size=16)
    assert (cfg.moe_config(1).num_experts, cfg.to_dict()["moe"]["num_experts"]) == (8, 8)


def test_checks_apply_to_what_was_given_and_to_moe_layers():
    # --swiglu with an activation given is refused; with the default one, it is SwiGLU
    with pytest.raises(ConfigError, match="disagree"):
        named_config("tiny", swiglu=True, moe={"activation": "gelu"})
    with pytest.raises(ConfigError, match="disagree"):
        ModelConfig.from_dict({**RECORD, "swiglu": True, "moe": {"router": "topk", "activation": "gelu"}})
    assert named_config("tiny", swiglu=True).moe_config(0).activation == "swiglu"
    # a model without MoE layers does not check the MoE settings; one with them does
    named_config("tiny", moe_layers="none", moe={"num_experts": 6, "ep_size": 4})
    with pytest.raises(ConfigError, match="not divisible by ep_size=4"):
        named_config("tiny", moe={"num_experts": 6, "ep_size": 4})


def test_the_cluster_warm_up_horizon_checks_a_given_warm_up_only():
    from vqmoe_ds.training.loop import Trainer

    def check(cfg, iters):
        task = SimpleNamespace(model_config=cfg, router_step=lambda step: step)
        Trainer._check_horizon(SimpleNamespace(task=task, optim=SimpleNamespace(train_iters=iters)))

    check(named_config("tiny", moe={"router": "cluster"}), 50)  # the default warm-up (100) is not checked
    check(named_config("tiny", moe={"router": "cluster", "cluster_warmup_steps": 49}), 50)
    with pytest.raises(ConfigError, match="--cluster-warmup-steps 50 is not below --train-iters 50"):
        check(named_config("tiny", moe={"router": "cluster", "cluster_warmup_steps": 50}), 50)


def test_an_old_partial_record_fits_the_same_model_spelled_out():
    saved = dict(RECORD)
    spelled = named_config("tiny", moe={**MoEConfig.from_settings(RECORD["moe"]).all_settings()}).to_dict()
    assert len(spelled["moe"]) > 40 and spelled["moe"]["vq_beta"] == 0.25
    ckpt.check_architecture(saved, spelled, "checkpoint X")  # no error: the same settings
    with pytest.raises(ckpt.CheckpointError, match=r"--vq-distance 'l2' \(moe.vq_distance\)"):
        ckpt.check_architecture({**saved, "moe": {**saved["moe"], "vq_distance": "l2"}}, spelled, "checkpoint X")
