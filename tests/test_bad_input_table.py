"""Bad inputs through the real entry points (the drivers' and tools' ``main``, in this process): every one exits with
status 2 and exactly one ``error:`` line naming the problem, before any training step and without a traceback.
The classes: flags, numbers that are not numbers, config files, ds_configs, data against the model, checkpoints
(missing, incomplete, truncated, changed content, another architecture, world or ep size), a run folder that
already holds a run, output paths of the wrong kind, and the tools' own arguments."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from tool_loader import load_tool

from vqmoe_ds.training.launch import DRIVER, ROOT, env_for_ranks, free_port, remove_new_shm, shm_files

CPU_CFG = os.path.join(ROOT, "ds_configs", "cpu_fp32.json")
BASE = ["--corpus-bytes", "100000", "--train-iters", "2", "--eval-iters", "1", "--test-iters", "1", "--no-progress",
        "--no-plots"]


_tool = load_tool


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run (the default VQMoE GPT) with checkpoints step1, step2 and best."""
    tmp = tmp_path_factory.mktemp("table_run")
    env = env_for_ranks(str(tmp))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    before = shm_files()
    try:
        r = subprocess.run([sys.executable, DRIVER, *BASE, "--save-interval", "1", "--out-dir", str(tmp / "run")],
                           env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    finally:
        remove_new_shm(before)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run"


def _damaged(run_dir, tmp_path, how):
    """A copy of the run's checkpoint folder, damaged; returns the folder."""
    ck = tmp_path / "ck"
    shutil.copytree(run_dir / "checkpoints", ck)
    step = ck / "step2"
    files = sorted(f for f in os.listdir(step) if f.startswith("layer_0_expert_1"))
    victim = step / files[0]
    marker = json.loads((step / "vqmoe_complete.json").read_text())
    if how == "truncated":
        victim.write_bytes(victim.read_bytes()[:100])
    elif how == "zeroed":  # the same size, other content: only the checksum can tell
        victim.write_bytes(b"\0" * victim.stat().st_size)
    elif how == "no_marker":
        os.remove(step / "vqmoe_complete.json")
    elif how == "empty":
        shutil.rmtree(ck)
        ck.mkdir()
    else:  # a change of the saved run's configuration
        key, value = how
        section = marker if key == "world_size" else marker["model_config"]
        if key.startswith("moe."):
            section, key = section["moe"], key[4:]
        section[key] = value
        (step / "vqmoe_complete.json").write_text(json.dumps(marker))
    return ck


def _lm(tmp_path, *argv):
    from vqmoe_ds.training.lm import main

    return main([*BASE, "--out-dir", str(tmp_path / "out"), *argv])


def _vision(tmp_path, *argv):
    from vqmoe_ds.vision.task import main

    return main(["--train-iters", "2", "--no-progress", "--out-dir", str(tmp_path / "vout"), *argv])


def _finetune(tmp_path, *argv):
    from vqmoe_ds.finetune.task import main

    return main(["--train-iters", "2", "--no-progress", "--out-dir", str(tmp_path / "fout"), *argv])


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _ds(tmp_path, cfg):
    return ["--deepspeed_config", _write(tmp_path, "ds.json", cfg if isinstance(cfg, str) else json.dumps(cfg))]


def _csv(tmp_path):
    return _write(tmp_path, "t.csv", "text,label\nhello,a\nworld,b\n" * 8)


CASES = [
    # flags and numbers
    ("router unknown", lambda t, r: _lm(t, "--router", "nope"), "invalid choice"),
    ("layers zero", lambda t, r: _lm(t, "--num-layers", "0"), "n_layer=0 must be >= 1"),
    ("layers not a number", lambda t, r: _lm(t, "--num-layers", "two"), "is not an int"),
    ("lr nan", lambda t, r: _lm(t, "--lr", "nan"), "lr=nan is not a finite number"),
    ("lr inf", lambda t, r: _lm(t, "--lr", "inf"), "lr=inf is not a finite number"),
    ("lr negative", lambda t, r: _lm(t, "--lr", "-1"), "lr=-1.0 must be > 0"),
    ("vq alpha nan", lambda t, r: _lm(t, "--vq-alpha", "nan"), "vq_alpha=nan is not a finite number"),
    ("seed negative", lambda t, r: _lm(t, "--seed", "-1"), "seed=-1 must be >= 0"),
    ("dropout 1.5", lambda t, r: _lm(t, "--dropout", "1.5"), "dropout=1.5 must lie in [0, 1)"),
    ("top-k > experts", lambda t, r: _lm(t, "--top-k", "9", "--num-experts", "4"), "top_k=9"),
    ("alias conflict", lambda t, r: _lm(t, "--top-k", "1", "--topk", "2"), "both set moe.top_k"),
    ("mem-len on gpt", lambda t, r: _lm(t, "--mem-len", "8"), "applies to --model txl only"),
    ("warmup too long", lambda t, r: _lm(t, "--lr-warmup-iters", "50"), "lr_warmup_iters=50 must lie in"),
    ("min-lr > lr", lambda t, r: _lm(t, "--lr", "0.1", "--min-lr", "1"), "min_lr=1.0 exceeds lr=0.1"),
    ("z-loss negative", lambda t, r: _lm(t, "--moe-z-loss-coeff", "-1"), "z_loss_coef=-1.0 must be >= 0"),
    ("bias rate negative", lambda t, r: _lm(t, "--moe-router-bias-update-rate", "-1"), "bias_update_rate=-1.0"),
    ("shared size negative", lambda t, r: _lm(t, "--moe-shared-expert-intermediate-size", "-2"),
     "shared_expert_size=-2 must be >= 0"),
    ("sigmoid for hash", lambda t, r: _lm(t, "--router", "hash", "--moe-router-score-function", "sigmoid"),
     "router 'hash' has no such scores"),
    ("codes < experts", lambda t, r: _lm(t, "--router", "vq", "--codebook-size", "2", "--num-experts", "4"),
     "could never be chosen"),
    ("ep > world", lambda t, r: _lm(t, "--moe-expert-parallel-size", "2"), "does not divide the world size 1"),
    ("eval window > context", lambda t, r: _lm(t, "--eval-seq-length", "999"), "exceeds the GPT context"),
    # config files
    ("config file missing", lambda t, r: _lm(t, "--config-file", str(t / "none.yaml")), "does not exist"),
    ("config unknown key", lambda t, r: _lm(t, "--config-file", _write(t, "c.yaml", "moe: {topk: 2}\n")),
     "unknown key moe.topk"),
    ("config wrong type", lambda t, r: _lm(t, "--config-file", _write(t, "c.yaml", "model: {n_layer: '3'}\n")),
     "has type str, not int"),
    ("config out of range", lambda t, r: _lm(t, "--config-file", _write(t, "c.yaml", "moe: {vq_alpha: -1}\n")),
     "moe.vq_alpha: vq_alpha=-1.0 must be >= 0"),
    ("config not a mapping", lambda t, r: _lm(t, "--config-file", _write(t, "c.yaml", "- 1\n")),
     "not a mapping of sections"),
    ("config bad yaml", lambda t, r: _lm(t, "--config-file", _write(t, "c.yaml", "model: [1\n")), "not valid YAML"),
    # ds_configs
    ("ds missing", lambda t, r: _lm(t, "--deepspeed_config", str(t / "none.json")), "does not exist"),
    ("ds not json", lambda t, r: _lm(t, *_ds(t, '{"zero_optimization": {')), "not valid JSON"),
    ("ds a list", lambda t, r: _lm(t, *_ds(t, [1, 2])), "holds a list, not a JSON object"),
    ("ds stage word", lambda t, r: _lm(t, *_ds(t, {"zero_optimization": {"stage": "one"}})), "not a stage number"),
    ("ds stage 3", lambda t, r: _lm(t, *_ds(t, {"zero_optimization": {"stage": 3}})), "ZeRO stage 3"),
    ("ds batch string", lambda t, r: _lm(t, *_ds(t, {"train_micro_batch_size_per_gpu": "8"})), "is not an integer"),
    ("ds batch zero", lambda t, r: _lm(t, *_ds(t, {"train_micro_batch_size_per_gpu": 0})), "must be >= 1"),
    ("ds optimizer no type", lambda t, r: _lm(t, *_ds(t, {"optimizer": {"params": {}}})), 'has no "type"'),
    ("ds betas", lambda t, r: _lm(t, *_ds(t, {"optimizer": {"type": "Adam", "params": {"betas": [0.9]}}})),
     "must be two numbers in [0, 1)"),
    ("ds unknown optimizer", lambda t, r: _lm(t, *_ds(t, {"optimizer": {"type": "Nadamx"}})),
     "neither DeepSpeed's"),
    ("ds gpu-only optimizer", lambda t, r: _lm(t, *_ds(t, {"optimizer": {"type": "Lamb"}})), "needs a GPU"),
    ("ds unknown scheduler", lambda t, r: _lm(t, *_ds(t, {"scheduler": {"type": "Cosine"}})),
     "is not one of DeepSpeed's"),
    ("ds clipping negative", lambda t, r: _lm(t, *_ds(t, {"gradient_clipping": -1})), "must be >= 0"),
    ("ds unknown zero key", lambda t, r: _lm(t, *_ds(t, {"zero_optimization": {"stage": 1, "bogus": 2}})),
     "zero_optimization.bogus"),
    ("ds fp16", lambda t, r: _lm(t, *_ds(t, {"fp16": {"enabled": True}})), "fp16"),
    ("ds contradicts flag", lambda t, r: _lm(t, *_ds(t, {"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}),
                                             "--lr", "0.01"), "contradicts optimizer.params.lr"),
    # data against the model
    ("data-file missing", lambda t, r: _lm(t, "--data-file", str(t / "none.txt")), "does not exist"),
    ("data-path missing", lambda t, r: _lm(t, "--data-path", str(t / "none")), "tokenizer.json"),
    ("both data sources", lambda t, r: _lm(t, "--data-path", "x", "--data-file", "y"), "both given"),
    ("vocab < bytes", lambda t, r: _lm(t, "--vocab-size", "100"), "smaller than the 256 byte values"),
    # checkpoints and run folders
    ("load not a folder", lambda t, r: _lm(t, "--load", str(t / "none")), "is not a folder"),
    ("load no checkpoint", lambda t, r: _lm(t, "--load", str(_damaged(r, t, "empty"))), "no 'latest' file"),
    ("load truncated", lambda t, r: _lm(t, "--load", str(_damaged(r, t, "truncated"))), "bytes, "),
    ("load changed content", lambda t, r: _lm(t, "--load", str(_damaged(r, t, "zeroed"))),
     "does not match the checksum"),
    ("load no marker", lambda t, r: _lm(t, "--load", str(_damaged(r, t, "no_marker"))), "is incomplete"),
    ("load other layers", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("n_layer", 3)))), "n_layer=3"),
    ("load other context", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("seq_len", 32)))), "seq_len=32"),
    ("load other codebook", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("moe.codebook_dim", 4)))),
     "moe.codebook_dim=4"),
    ("load other vq kind", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("moe.vq_kind", "lfq")))),
     "moe.vq_kind='lfq'"),
    ("load other world", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("world_size", 2)))),
     "was made with 2 ranks"),
    ("load other ep", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("moe.ep_size", 2)))),
     "tools/reshard_checkpoint.py --ep-size 1"),
    ("run folder taken", lambda t, r: _lm(t, "--out-dir", str(r)), "belongs to an earlier run"),
    ("save is a file", lambda t, r: _lm(t, "--save", _write(t, "f", "x")), "is not writable"),
    # vision
    ("vision dataset without path", lambda t, r: _vision(t, "--dataset", "cifar10"), "needs --data-path"),
    ("vision patch", lambda t, r: _vision(t, "--image-size", "30"), "not a multiple of the patch size"),
    ("vision hash", lambda t, r: _vision(t, "--router", "hash"), "image patches have no ids"),
    ("vision classes", lambda t, r: _vision(t, "--num-classes", "5"), "4, 8 or 12 classes"),
    ("vision soft flag", lambda t, r: _vision(t, "--router", "topk", "--soft-slots", "2"), "router soft only"),
    ("vision load missing", lambda t, r: _vision(t, "--load", str(t / "none")), "is not a folder"),
    # fine-tuning
    ("finetune no task", lambda t, r: _finetune(t, "--load", str(r), "--train", _csv(t), "--test", _csv(t)),
     "--task is required"),
    ("finetune train missing", lambda t, r: _finetune(t, "--load", str(r), "--task", "csv", "--train",
                                                      str(t / "none.csv"), "--test", _csv(t)), "does not exist"),
    ("finetune load damaged", lambda t, r: _finetune(t, "--load", str(_damaged(r, t, "zeroed")), "--task", "csv",
                                                     "--train", _csv(t), "--test", _csv(t)),
     "does not match the checksum"),
    ("finetune length", lambda t, r: _finetune(t, "--load", str(r), "--task", "csv", "--train", _csv(t), "--test",
                                               _csv(t), "--max-length", "999"), "exceeds the model's context"),
    # tools
    ("generate temperature", lambda t, r: _tool("generate").main(["--load", str(r), "--temperature", "-1"]),
     "--temperature -1.0 must be > 0"),
    ("generate tokens", lambda t, r: _tool("generate").main(["--load", str(r), "--tokens", "0"]),
     "--tokens 0 must be >= 1"),
    ("generate damaged", lambda t, r: _tool("generate").main(["--load", str(_damaged(r, t, "zeroed")), "--tag",
                                                              "step2"]), "does not match the checksum"),
    ("export out not safetensors", lambda t, r: _tool("export_checkpoint").main(
        ["--load", str(r / "checkpoints"), "--out", str(t / "m.txt")]), "must end in .safetensors"),
    ("export out is a folder", lambda t, r: _tool("export_checkpoint").main(
        ["--load", str(r / "checkpoints"), "--out", str(t)]), "is a folder"),
    ("reshard out is a file", lambda t, r: _tool("reshard_checkpoint").main(
        ["--load", str(r / "checkpoints"), "--out", _write(t, "f", "x"), "--world-size", "1", "--ep-size", "1"]),
     "is a file"),
    ("convert out is a file", lambda t, r: _tool("convert_to_vqmoe").main(
        ["--load", str(r), "--out-dir", _write(t, "f", "x")]), "is a file"),
    ("analyze out is a file", lambda t, r: _tool("analyze_routing").main(
        ["--load", str(r), "--out-dir", _write(t, "f", "x")]), "is a file"),
]


@pytest.mark.parametrize("name,call,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_step(run_dir, tmp_path, capsys, name, call, words):
    try:
        rc = call(tmp_path, run_dir)
    except SystemExit as e:  # argparse-style tools exit themselves
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and words in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "log.jsonl").exists()  # no training step ran


def test_the_table_is_long_enough():
    assert len(CASES) >= 60
