"""Bad flags and configs are refused with one line, before any training step."""
import json
import os
import subprocess
import sys

import pytest

from vqmoe_ds.cli import ConfigError
from vqmoe_ds.training.config import resolve_ds_config
from vqmoe_ds.training.launch import DRIVER, env_for_ranks, free_port
from vqmoe_ds.training.lm import command_line, make_task


def parse_args(argv):
    return make_task(command_line().parse(argv))

ROOT = os.path.dirname(DRIVER)


def one_line_error(argv, word):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    msg = str(e.value)
    assert "\n" not in msg and word in msg, msg
    return msg


def test_bad_flags_one_line():
    one_line_error(["--router", "nope"], "invalid choice")
    one_line_error(["--hidden-size", "100", "--num-attention-heads", "3"], "not divisible")
    one_line_error(["--num-experts", "6", "--moe-expert-parallel-size", "4"], "not divisible")
    one_line_error(["--top-k", "9", "--num-experts", "4"], "top_k")
    one_line_error(["--model", "gpt", "--mem-len", "8"], "txl")
    one_line_error(["--lr-warmup-iters", "50", "--train-iters", "10"], "warmup")
    one_line_error(["--deepspeed_config", "/nonexistent.json"], "does not exist")
    one_line_error(["--config", "huge"], "invalid choice")
    one_line_error(["--micro-batch-size", "0"], ">= 1")


def ds(tmp_path, cfg, **flags):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    argv = ["--deepspeed_config", str(path)]
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    task = parse_args(argv)
    return resolve_ds_config(task.optim, task.parallel, world_size=2, on_cpu=True)


def test_config_wins_flags_fill_conflicts_refused(tmp_path):
    out = ds(tmp_path, {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, micro_batch_size=4,
             gradient_accumulation_steps=3, train_iters=50, lr_warmup_iters=5, min_lr=1e-4)
    assert out["train_batch_size"] == 4 * 3 * 2 and out["optimizer"]["params"]["lr"] == 1e-3
    assert out["optimizer"]["params"]["torch_adam"] is True
    assert "scheduler" not in out  # the flags' schedule goes to deepspeed.initialize (config.flag_lr_schedule)
    for cfg, flags, word in [
        ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, dict(lr=2e-3), "contradicts"),
        ({"train_batch_size": 10}, dict(micro_batch_size=4), "train_batch_size"),
        ({"scheduler": {"type": "WarmupLR", "params": {}}}, dict(lr_warmup_iters=3), "scheduler"),
        ({"gradient_clipping": 1.0}, dict(clip_grad=0.5), "contradicts"),
        ({"zero_optimization": {"stage": 3}}, {}, "ZeRO stage 3"),
        ({"fp16": {"enabled": True}}, {}, "fp16"),
    ]:
        with pytest.raises(ConfigError) as e:
            ds(tmp_path, cfg, **flags)
        assert word in str(e.value) and "\n" not in str(e.value)


def run_driver(tmp_path, *argv):
    env = env_for_ranks(str(tmp_path))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, DRIVER, "--out-dir", str(tmp_path / "run"), "--no-progress", *argv],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_driver_refuses_zero3_and_bad_ep_before_training(tmp_path):
    cfg = tmp_path / "zero3.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    r = run_driver(tmp_path, "--deepspeed_config", str(cfg), "--corpus-bytes", "100000")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert "ZeRO stage 3" in errors[0] and "use stage 0, 1 or 2" in errors[0]
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")  # no step was taken
    r = run_driver(tmp_path, "--moe-expert-parallel-size", "2", "--corpus-bytes", "100000")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "world size 1" in errors[0], r.stderr[-2000:]
    r = run_driver(tmp_path, "--data-file", str(tmp_path / "missing.txt"))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "does not exist" in errors[0], r.stderr[-2000:]


def test_moe_flags_mean_the_same_in_every_driver():
    """The language and vision drivers generate their MoE flags from the same MoEConfig fields: the same flags
    give the same fields, and the named config's values stand where a flag is not given."""
    from vqmoe_ds.training.lm import model_config
    from vqmoe_ds.vision import task as vision

    flags = ["--router", "vqmoe", "--num-experts", "4", "--top-k", "1", "--codebook-size", "12", "--codebook-dim", "6",
             "--vq-distance", "l2", "--vq-ema", "--vq-dead-code-threshold", "0.5", "--vq-alpha", "0.1",
             "--capacity-factor", "2.0", "--no-drop-tokens", "--stablemoe-stage1-steps", "7"]
    lm, vit = command_line().parse(["--config", "tiny", *flags]), vision.command_line().parse(["--config", "tiny", *flags])
    expected = {"router": "vqmoe", "num_experts": 4, "top_k": 1, "codebook_size": 12, "codebook_dim": 6,
                "vq_distance": "l2", "vq_ema": True, "vq_dead_code_threshold": 0.5, "vq_alpha": 0.1,
                "capacity_factor": 2.0, "drop_tokens": False, "stablemoe_stage1_steps": 7}
    assert lm.given("moe") == vit.given("moe") == expected
    lm_moe, vit_moe = model_config(lm, 256).moe, vision.model_config(vit, 10).moe
    for k, v in expected.items():
        assert getattr(lm_moe, k) == v and vit_moe[k] == v, k
    assert command_line().parse(["--config", "tiny"]).given("moe") == {}  # nothing given: the config's values
    assert model_config(command_line().parse(["--config", "tiny"]), 256).moe.settings() == {
        "router": "vqmoe", "num_experts": 4, "top_k": 2, "codebook_size": 8}
