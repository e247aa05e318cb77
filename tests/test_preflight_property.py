"""The pre-flight of the pretraining driver under random input (hypothesis), checked against the precedence rule of
docs/training.md ("the ds_config wins where it sets a value and the flags fill what it leaves out; a flag that
contradicts the config is an error"), worked out here from the input alone:

  * accepted => every value the input ds_config holds is in the resolved config unchanged, the values it leaves out
    come from the flags or the documented defaults (micro-batch 8, accumulation 1, Adam, lr 3.5e-4, clipping 1.0,
    ZeRO 0, the flags' warmup + cosine over --train-iters unless it has a scheduler block), and DeepSpeed's own ``DeepSpeedConfig`` parses the resolved config to
    exactly those values;
  * refused => one ``ConfigError`` line that names a setting the input gave (a flag, its config field, or a ds_config
    key present in the file); one bad value put into a well-formed config is refused naming its key;
  * a well-formed config with flags that do not contradict it is always accepted.
No other exception ever escapes."""
import json
import math
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vqmoe_ds.cli import ConfigError
from vqmoe_ds.training.config import flag_lr_schedule, resolve_ds_config
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

# the ds_config keys the pre-flight reads (a refusal names one of them, or a flag)
DS_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping",
           "zero_optimization", "stage", "offload_optimizer", "reduce_bucket_size", "optimizer", "type", "params", "lr",
           "betas", "eps", "weight_decay", "scheduler", "bf16", "fp16", "enabled")

# well-formed configs and flags that never contradict them
good_config = st.fixed_dictionaries({}, optional={
    "train_micro_batch_size_per_gpu": st.integers(1, 9), "gradient_accumulation_steps": st.integers(1, 4),
    "gradient_clipping": st.floats(0, 5), "zero_optimization": st.fixed_dictionaries({"stage": st.integers(0, 2)}),
    "optimizer": st.fixed_dictionaries({"type": st.sampled_from(["Adam", "AdamW"])}, optional={
        "params": st.fixed_dictionaries({}, optional={"lr": st.floats(1e-6, 1.0), "weight_decay": st.floats(0, 0.5),
                                                     "betas": st.just([0.9, 0.95])})}),
    "bf16": st.fixed_dictionaries({"enabled": st.just(False)}), "steps_per_print": st.integers(1, 100)})
good_flags = st.fixed_dictionaries({}, optional={
    "--micro-batch-size": st.integers(1, 9).map(str), "--gradient-accumulation-steps": st.integers(1, 4).map(str),
    "--train-iters": st.integers(5, 200).map(str), "--clip-grad": st.floats(0, 5).map(repr),
    "--weight-decay": st.floats(0, 0.5).map(repr), "--lr": st.floats(1e-4, 1.0).map(repr), "--seed": st.just("3")})


def _same(a, b):
    """Equal JSON values, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _holds(resolved, given):
    """Every value of ``given`` is in ``resolved`` unchanged (objects may gain keys, nothing else changes)."""
    if isinstance(given, dict):
        return isinstance(resolved, dict) and all(k in resolved and _holds(resolved[k], v) for k, v in given.items())
    return _same(resolved, given)


def _preflight(tmp_path, cfg, flags):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    argv = ["--deepspeed_config", str(path)] + [f"{flag}={value}" for flag, value in flags.items()]
    task = make_task(command_line().parse(argv))
    ds = resolve_ds_config(task.optim, task.parallel, world_size=1, on_cpu=True)
    return ds, flag_lr_schedule(task.optim, ds)


def check_accepted(cfg, flags, ds, schedule):
    """The resolved config ``ds`` and the flags' lr ``schedule`` against the precedence rule, and DeepSpeed's
    parse of it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    assert _holds(ds, cfg), (cfg, ds)  # the file wins: everything it holds comes through unchanged
    flag = {k: float(v) for k, v in flags.items()}  # accepted: every flag value was a number
    opt_params = cfg.get("optimizer", {}).get("params", {})
    micro = cfg.get("train_micro_batch_size_per_gpu", flag.get("--micro-batch-size", 8))
    accum = cfg.get("gradient_accumulation_steps", flag.get("--gradient-accumulation-steps", 1))
    lr = opt_params.get("lr", flag.get("--lr", 3.5e-4))
    clip = cfg.get("gradient_clipping", flag.get("--clip-grad", 1.0))
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    kind = cfg.get("optimizer", {}).get("type", "Adam")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (micro, accum)
    assert ds["train_batch_size"] == micro * accum
    assert ds["optimizer"]["type"] == kind and ds["optimizer"]["params"]["lr"] == lr
    assert ds["optimizer"]["params"]["weight_decay"] == opt_params.get("weight_decay", flag.get("--weight-decay", 0.0))
    assert ds["gradient_clipping"] == clip
    if "scheduler" not in cfg:  # built from the flags: linear warmup, cosine to --min-lr (0.1 x lr) at --train-iters
        warmup, total, min_ratio = schedule
        assert "scheduler" not in ds  # the flags' schedule is handed to deepspeed.initialize, not written here
        assert total == flag.get("--train-iters", 100) and warmup == flag.get("--lr-warmup-iters", 0)
        assert min_ratio == pytest.approx(flag.get("--min-lr", 0.1 * lr) / lr)
    else:
        assert schedule is None and ds["scheduler"] == cfg["scheduler"]
    parsed = DeepSpeedConfig(ds)  # DeepSpeed reads the same numbers
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps,
            parsed.train_batch_size) == (micro, accum, micro * accum)
    assert parsed.gradient_clipping == clip and parsed.zero_optimization_stage == stage
    assert parsed.optimizer_name == kind.lower() and parsed.optimizer_params["lr"] == lr


def check_refused(cfg, flags, error):
    msg = str(error)
    assert msg and "\n" not in msg, repr(msg)
    names = set(flags) | {f[2:].replace("-", "_") for f in flags}
    if isinstance(cfg, dict):
        names |= {k for k in DS_KEYS if k in json.dumps(cfg)}
    else:
        names.add("not a JSON object")
    assert any(n in msg for n in names), (msg, cfg, flags)


def run_case(tmp_path, cfg, flags):
    try:
        ds, schedule = _preflight(tmp_path, cfg, flags)
    except ConfigError as e:
        check_refused(cfg, flags, e)
        return False
    check_accepted(cfg, flags, ds, schedule)
    return True


PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY
@given(cfg=ds_config, flags=flag_values)
def test_preflight_resolves_by_the_precedence_rule_or_names_the_setting(tmp_path, cfg, flags):
    event("accepted" if run_case(tmp_path, cfg, flags) else "refused")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(cfg=good_config, flags=good_flags)
def test_well_formed_config_is_accepted_as_given(tmp_path, cfg, flags):
    flags = {k: v for k, v in flags.items()  # a flag for a value the file holds would contradict it
             if not (k == "--micro-batch-size" and "train_micro_batch_size_per_gpu" in cfg)
             and not (k == "--gradient-accumulation-steps" and "gradient_accumulation_steps" in cfg)
             and not (k == "--clip-grad" and "gradient_clipping" in cfg)
             and not (k == "--lr" and "lr" in cfg.get("optimizer", {}).get("params", {}))}
    assert run_case(tmp_path, cfg, flags), (cfg, flags)


# one bad value at a known key of a well-formed config: (path, values the pre-flight must refuse)
not_positive_int = st.integers(-3, 0) | st.floats(0.5, 3.5) | st.text(max_size=3) | st.booleans()
BAD_VALUES = {
    ("train_micro_batch_size_per_gpu",): not_positive_int,
    ("gradient_accumulation_steps",): not_positive_int,
    ("train_batch_size",): st.integers(50, 99),  # never micro (<= 9) x accumulation (<= 4) x 1 rank
    ("gradient_clipping",): st.floats(-5, -0.01) | st.just(float("nan")) | st.text(max_size=3),
    ("zero_optimization", "stage"): st.sampled_from([3, 4, -1, "1", 1.5, None]),
    ("optimizer", "type"): st.sampled_from(["Nope", "", "Lamb", "OneBitAdam", 3]),
    ("optimizer", "params", "lr"): st.floats(-1, 0) | st.just(float("inf")) | st.text(max_size=3),
    ("optimizer", "params", "eps"): st.floats(-1, 0) | st.text(max_size=3),
    ("optimizer", "params", "weight_decay"): st.floats(-1, -0.01) | st.just(float("nan")),
    ("optimizer", "params", "betas"): st.sampled_from([[0.9], [0.9, 1.0], [1.5, 0.9], "0.9", [0.9, "x"]]),
    ("scheduler", "type"): st.sampled_from(["Nope", "", 7]),
    ("fp16", "enabled"): st.just(True),
}


@pytest.mark.parametrize("path", sorted(BAD_VALUES), ids=".".join)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(cfg=good_config, data=st.data())
def test_a_bad_value_is_refused_in_one_line_naming_its_key(tmp_path, path, cfg, data):
    value = data.draw(BAD_VALUES[path])
    node = cfg
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {"type": "Adam"} if key == "optimizer" else {}
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as e:
        _preflight(tmp_path, cfg, {})
    msg = str(e.value)
    assert msg and "\n" not in msg and any(k in msg for k in path), (path, value, msg)


@pytest.mark.skipif(os.environ.get("VQMOE_LONG_PROPERTY") is None, reason="the long run: VQMOE_LONG_PROPERTY=1")
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(cfg=ds_config, flags=flag_values)
def test_preflight_long(tmp_path, cfg, flags):
    run_case(tmp_path, cfg, flags)
