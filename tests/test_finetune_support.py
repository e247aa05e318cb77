"""Shared by the fine-tuning, conversion and analysis tests (no tests here): tiny pretraining runs made once per
session with the real driver, a reference loader of the driver's checkpoints that bypasses DeepSpeed, and a
runner for the command-line tools."""
import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

from vqmoe_ds.training.launch import DRIVER, env_for_ranks, free_port, remove_new_shm, shm_files, torchrun_cmd

ROOT = os.path.dirname(DRIVER)
CPU_CFG = os.path.join(ROOT, "ds_configs", "cpu_fp32.json")
_TMP = tempfile.mkdtemp(prefix="vqmoe_ft_tests_")
atexit.register(shutil.rmtree, _TMP, True)


def run_cmd(cmd, timeout=240, expect=0):
    """Run a command as the tools' users would; ``expect``: exit status, or "fail" for any non-zero one
    (torchrun reports a rank's status 2 as 1)."""
    before = shm_files()
    try:
        r = subprocess.run(cmd, env=env_for_ranks(_TMP), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    finally:
        remove_new_shm(before)
    ok = r.returncode != 0 if expect == "fail" else r.returncode == expect
    assert ok, (r.stdout + r.stderr)[-4000:]
    return r


def tool(name, *args, expect=0):
    return run_cmd([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)], expect=expect)


@functools.lru_cache(maxsize=None)
def pretrained(router: str) -> str:
    """OUT_DIR of a tiny dropless GPT pretrained for 20 steps with ``router`` (checkpoints step10, step20)."""
    out = os.path.join(_TMP, f"pre_{router}")
    args = ["--config", "tiny", "--router", router, "--deepspeed_config", CPU_CFG, "--train-iters", "20",
            "--log-interval", "10", "--eval-iters", "1", "--test-iters", "1", "--corpus-bytes", "200000",
            "--micro-batch-size", "8", "--lr", "3e-3", "--no-progress", "--no-plots", "--no-drop-tokens",
            "--save-interval", "10", "--out-dir", out]
    run_cmd(torchrun_cmd(1, args, free_port()))
    return out


@functools.lru_cache(maxsize=None)
def source_task() -> dict:
    from vqmoe_ds.finetune.source_task import write_source_task

    return write_source_task(os.path.join(_TMP, "source_task"), n_train=400, n_test=200, snippet_chars=24)


def tmpdir(name: str) -> str:
    return tempfile.mkdtemp(prefix=name, dir=_TMP)


def reference_state(tag_dir: str):
    """(ModelConfig, full state dict) read straight from DeepSpeed's files: 'module' of mp_rank_00 plus every
    layer_{l}_expert_{e} file, expert keys already global -- an independent reading of the checkpoint."""
    from vqmoe_ds.models import ModelConfig

    main = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    sd = dict(main["module"])
    for fn in os.listdir(tag_dir):
        if fn.startswith("layer_") and "_expert_" in fn:
            sd.update(torch.load(os.path.join(tag_dir, fn), map_location="cpu", weights_only=False))
    with open(os.path.join(tag_dir, "vqmoe_complete.json")) as f:
        marker = json.load(f)
    return ModelConfig.from_dict(marker["model_config"]), sd


def reference_model(tag_dir: str):
    from vqmoe_ds.models import build_model

    cfg, sd = reference_state(tag_dir)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()
