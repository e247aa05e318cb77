"""The pre-flight of the pretraining driver under random input (hypothesis): random ds_config JSON trees and random
flag values either pass -- and then DeepSpeed builds its config from the resolved ds_config without an error -- or
are refused with one line (ArgError); no other exception ever escapes."""
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqmoe_ds.cli import ArgError
from vqmoe_ds.training.config import resolve_ds_config
from vqmoe_ds.training.lm import command_line, make_task

leaf = (st.none() | st.booleans() | st.integers(-3, 64) | st.floats(allow_nan=True, allow_infinity=True, width=32)
        | st.text(max_size=4))
tree = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=8)
zero = st.fixed_dictionaries({}, optional={"stage": st.integers(-1, 4) | leaf,
                                           "offload_optimizer": st.just({"device": "cpu"}) | tree,
                                           "reduce_bucket_size": st.integers(-5, 10 ** 7) | leaf})
optimizer = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["Adam", "AdamW", "adam", "SGD", "Lamb", "OneBitAdam", "Nope", ""]) | leaf,
    "params": st.fixed_dictionaries({}, optional={"lr": leaf, "betas": tree, "eps": leaf, "weight_decay": leaf,
                                                  "torch_adam": st.booleans()}) | tree})
scheduler = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["WarmupLR", "WarmupCosineLR", "OneCycle", "Cosine"]) | leaf, "params": tree})
ds_config = st.fixed_dictionaries({}, optional={
    "train_micro_batch_size_per_gpu": st.integers(-1, 9) | leaf, "gradient_accumulation_steps": st.integers(-1, 4) | leaf,
    "train_batch_size": st.integers(-1, 40) | leaf, "gradient_clipping": leaf, "zero_optimization": zero | tree,
    "optimizer": optimizer | tree, "scheduler": scheduler | tree, "bf16": st.fixed_dictionaries(
        {}, optional={"enabled": st.booleans() | leaf}) | tree, "fp16": tree, "steps_per_print": leaf}) | tree

number_text = st.one_of(st.integers(-3, 100).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                        st.sampled_from(["nan", "inf", "-inf", "x", "", "1e-3", "0"]))
FLAGS = ["--lr", "--min-lr", "--micro-batch-size", "--gradient-accumulation-steps", "--train-iters",
         "--lr-warmup-iters", "--clip-grad", "--weight-decay", "--num-layers", "--top-k", "--num-experts", "--dropout",
         "--vq-alpha", "--capacity-factor", "--codebook-size", "--moe-z-loss-coeff", "--seed"]
flag_values = st.dictionaries(st.sampled_from(FLAGS), number_text, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(cfg=ds_config, flags=flag_values)
def test_preflight_passes_or_gives_one_line(tmp_path, cfg, flags):
    from deepspeed.runtime.config import DeepSpeedConfig

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    argv = ["--deepspeed_config", str(path)]
    for flag, value in flags.items():
        argv += [f"{flag}={value}"]
    try:
        task = make_task(command_line().parse(argv))
        ds = resolve_ds_config(task.optim, task.parallel, world_size=1, on_cpu=True)
    except ArgError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return
    DeepSpeedConfig(ds)  # what passed must be a config DeepSpeed accepts


@pytest.mark.skipif(os.environ.get("VQMOE_LONG_PROPERTY") is None, reason="the long run: VQMOE_LONG_PROPERTY=1")
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(cfg=ds_config, flags=flag_values)
def test_preflight_long(tmp_path, cfg, flags):
    test_preflight_passes_or_gives_one_line.hypothesis.inner_test(tmp_path, cfg, flags)
