"""What a run writes about itself: OUT_DIR/config.json holds every resolved value and repeats the run bit for bit,
a resume leaves it as it was (appending a ``resumes`` record, and one line saying what changed), YAML exponent
numbers are floats, a run without a validation split writes strict JSON and the tools fall back from ``best`` to
``latest`` with a notice, and routing health warnings name collapsed layers."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from test_finetune_support import CPU_CFG, run_cmd
from vqmoe_ds.training.launch import ROOT, env_for_ranks, free_port, torchrun_cmd

TINY = ["--config", "tiny", "--corpus-bytes", "60000", "--micro-batch-size", "4", "--log-interval", "1",
        "--eval-iters", "2", "--test-iters", "2", "--no-progress", "--no-plots"]


def _strict(path):
    """The file parsed as strict JSON: NaN and Infinity are refused."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def _train(out, *more, nproc=1):
    return run_cmd(torchrun_cmd(nproc, [*TINY, "--deepspeed_config", CPU_CFG, "--out-dir", str(out), *more],
                                free_port()))


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if r["kind"] == "train"]


def test_config_json_is_complete_repeats_the_run_and_survives_a_resume(tmp_path):
    a = tmp_path / "a"
    _train(a, "--train-iters", "6", "--save-interval", "3", "--lr", "2e-3", "--gradient-accumulation-steps", "2")
    cfg = _strict(a / "config.json")
    from vqmoe_ds.moe.config import MoEConfig
    from dataclasses import fields

    set_by_model = {"hidden_size", "ffn_hidden_size", "init_std", "output_init_std", "vocab_size", "linear_bias"}
    assert set(cfg["moe"]) == {f.name for f in fields(MoEConfig)} - set_by_model  # every MoE setting
    assert cfg["moe"]["codebook_size"] == 8 and cfg["moe"]["vq_beta"] == 0.25  # the shape's value, a default
    ds = _strict(a / "ds_config.json")
    o = cfg["optim"]
    assert (o["micro_batch_size"], o["gradient_accumulation_steps"], o["lr"], o["clip_grad"], o["lr_warmup_iters"]) == \
        (4, 2, 2e-3, ds["gradient_clipping"], 0)
    assert o["min_lr"] == pytest.approx(0.1 * 2e-3, rel=1e-12)  # --min-lr's default

    # the file repeats the run: the same losses bit for bit
    b = tmp_path / "b"
    _train(b, "--config-file", str(a / "config.json"))
    assert _losses(b) == _losses(a)

    # a resume with a longer run: config.json keeps the original values and records the change; one line says it
    before = _strict(a / "config.json")
    (a / "checkpoints" / "latest").write_text("step3")
    r = _train(a, "--config-file", str(a / "config.json"), "--load", str(a / "checkpoints"), "--train-iters", "8")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("resumed from step 3")]
    assert len(lines) == 1 and "optim.train_iters 6 -> 8" in lines[0] and "re-stretched" in lines[0], r.stdout[-3000:]
    after = _strict(a / "config.json")
    resumes = after.pop("resumes")
    assert after == before
    assert len(resumes) == 1 and resumes[0]["step"] == 3 and resumes[0]["changed"] == {"optim.train_iters": [6, 8]}
    # and that file still reads back (its resumes record is not a setting)
    from vqmoe_ds.training import lm

    task = lm.make_task(lm.command_line().parse(["--config-file", str(a / "config.json")]))
    assert task.optim.train_iters == 6 and task.optim.lr == 2e-3


def test_yaml_exponent_numbers_are_floats(tmp_path):
    from vqmoe_ds.training import lm

    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 2e-3, min_lr: 1E-4, weight_decay: 0.1}\nmoe: {vq_alpha: 5e-2}\n")
    task = lm.make_task(lm.command_line().parse(["--config-file", str(path)]))
    assert (task.optim.lr, task.optim.min_lr, task.model_config.moe.vq_alpha) == (0.002, 0.0001, 0.05)


def test_without_validation_json_is_strict_and_tools_fall_back_to_latest(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "train.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    (text / "test.txt").write_text("a lazy dog sleeps\n" * 60)
    prefix = tmp_path / "data" / "byte"
    run_cmd([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(text), "--tokenizer",
             "byte", "--output-prefix", str(prefix)])
    out = tmp_path / "run"
    _train(out, "--data-path", str(prefix), "--train-iters", "3", "--corpus-bytes", "2000000")
    results = _strict(out / "results.json")
    assert results["best_valid"] is None and results["test"]["checkpoint"] == "final"
    for line in open(out / "log.jsonl"):
        json.loads(line, parse_constant=lambda name: pytest.fail(f"log.jsonl holds {name}"))
    assert not (out / "checkpoints" / "best").exists()
    env = env_for_ranks(str(tmp_path))
    g = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--load", str(out), "--prompt",
                        "the ", "--tokens", "5"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert g.returncode == 0, g.stderr[-2000:]
    assert "has no 'best' checkpoint" in g.stderr and "using the latest, step3" in g.stderr
    e = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_checkpoint.py"), "--load", str(out),
                        "--out", str(tmp_path / "m.safetensors")], env=env, capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert e.returncode == 0 and "using the latest, step3" in e.stdout, e.stdout + e.stderr[-2000:]


def test_routing_health_names_the_layers_that_use_under_half(capsys):
    from vqmoe_ds.training.run_log import RoutingHealth

    h = RoutingHealth()
    for _ in range(3):  # three micro-batches of a window: layer 0 uses experts 0-3 of 4 and codes 0,1 of 8
        h.add([{"expert_load": torch.tensor([3, 1, 2, 5]), "code_counts": torch.tensor([4., 2, 0, 0, 0, 0, 0, 0])},
               {"expert_load": torch.tensor([0, 0, 7, 0])}])
    h.add([{"expert_load": torch.tensor([1, 0, 0, 0]), "code_counts": torch.tensor([0., 0, 1, 0, 0, 0, 0, 0])},
           {"expert_load": torch.tensor([0, 0, 7, 0])}])
    assert h.check(4) == ["layer 0 used 3 of its 8 codes over the last 4 step(s) (codebook collapse)",
                          "layer 1 used 1 of its 4 experts over the last 4 step(s) (router collapse)"]
    assert h.check(4) == []  # a new window
    h.add([{"expert_load": torch.tensor([1, 1, 0, 0])}])  # exactly half: no warning
    assert h.check(1) == []


@pytest.mark.parametrize("argv", [["--config", "tiny", "--swiglu"], ["--config", "tiny", "--swiglu", "--router", "topk"],
                                  ["--config", "tiny"]])
def test_config_json_of_a_swiglu_model_reads_back_as_the_same_model(tmp_path, argv):
    """The MoE section is spelled out with every default; a --swiglu model's experts run SwiGLU, so the file must say
    so, or --config-file refuses it (swiglu against a gelu activation) instead of rebuilding the model."""
    from vqmoe_ds.training import lm
    from vqmoe_ds.training.run_log import complete_config

    cmd = lm.command_line()
    task = lm.make_task(cmd.parse([*argv, "--out-dir", str(tmp_path / "run")]))
    written = complete_config(cmd.resolved(task.parsed.preset, task.config_objects()), cmd, {}, None)
    want = "swiglu" if "--swiglu" in argv else "gelu"
    assert written["moe"]["activation"] == want
    path = tmp_path / "config.json"
    path.write_text(json.dumps(written))
    again, first = lm.make_task(cmd.parse(["--config-file", str(path)])).model_config, task.model_config
    assert {k: v for k, v in again.to_dict().items() if k != "moe"} == \
        {k: v for k, v in first.to_dict().items() if k != "moe"}
    for layer in range(first.n_layer):  # every layer's MoE settings as the model builds them
        assert dataclasses.asdict(again.moe_config(layer)) == dataclasses.asdict(first.moe_config(layer))
    assert again.moe_config(0).activation == want
