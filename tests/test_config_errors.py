"""Bad MoE arguments raise one clear, one-line error each, naming the setting and the fix."""
import pytest

from vqmoe_ds.moe import ConfigError, MoEConfig

BASE = dict(hidden_size=16, ffn_hidden_size=32)


@pytest.mark.parametrize("kw,needle", [
    (dict(num_experts=6, ep_size=4), "not divisible by ep_size=4"),
    (dict(router="vq", codebook_size=0), "codebook_size=0"),
    (dict(router="vqmoe", codebook_size=-3), "codebook_size=-3"),
    (dict(router="switchy"), "unknown router 'switchy'"),
    (dict(router="vqmoe", vq_alpha=-0.1), "vq_alpha=-0.1"),
    (dict(top_k=9, num_experts=8), "top_k=9"),
    (dict(num_experts=0), "num_experts=0"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0"),
    (dict(router="vq", vq_distance="manhattan"), "unknown vq_distance"),
    (dict(router="vq", vq_kind="lfq", codebook_size=12), "power of two"),
    (dict(router="smoe_dropout", num_experts=4, smoe_dropout_k_start=3, smoe_dropout_k_end=2), "k schedule"),
    (dict(router="vqmoe", vqmoe_mode="finetune"), "unknown vqmoe_mode"),
    (dict(expert_impl="tutel"), "unknown expert implementation"),
])
def test_bad_argument_one_line_error(kw, needle):
    with pytest.raises(ConfigError) as e:
        MoEConfig(**BASE, **kw)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        MoEConfig(**BASE, router="nope")


def test_ep_layer_without_expert_parallel_group_names_the_fix():
    import torch

    layer = MoEConfig(**BASE, num_experts=4, ep_size=2).build()
    with pytest.raises(RuntimeError, match="deepspeed.initialize"):
        layer(torch.randn(4, 16))


def test_layers_build_on_the_meta_device():
    """Large configs are sized on the meta device, without memory."""
    import torch

    for router in ("topk", "vqmoe", "xmoe", "stablemoe", "smoe_dropout"):
        with torch.device("meta"):
            layer = MoEConfig(**BASE, router=router, num_experts=4).build()
        assert all(p.is_meta for p in layer.parameters())
