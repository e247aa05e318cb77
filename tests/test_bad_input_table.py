"""Bad inputs through the real entry points (the drivers' and tools' ``main``, in this process): every one exits with
its documented status (2 bad input, before any training step; 3 training could not go on) and exactly one
``error:`` line naming the problem, without a traceback; every flag the line names is a flag of the entry point
it came from (or of the tool the line names).  The classes: flags, numbers that are not numbers, config files,
ds_configs, data against the model and its tokenizer, checkpoints (missing, incomplete, truncated, changed
content, code in a file, another architecture, world, ep size, ZeRO layout or horizon), a run folder that already
holds a run or is in use, output paths of the wrong kind, and the tools' own arguments.  The last test checks
that every case of the table ran and was classified."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from tool_loader import load_tool

from vqmoe_ds.training.launch import DRIVER, ROOT, env_for_ranks, free_port, remove_new_shm, shm_files

CPU_CFG = os.path.join(ROOT, "ds_configs", "cpu_fp32.json")
BASE = ["--corpus-bytes", "100000", "--train-iters", "2", "--eval-iters", "1", "--test-iters", "1", "--no-progress",
        "--no-plots"]


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
    elif how == "no_files":  # a marker without its list of files
        del marker["files"]
        (step / "vqmoe_complete.json").write_text(json.dumps(marker))
    elif how == "poisoned":  # a pickled payload in the model file, the marker's sums recomputed by the sender
        model = step / "mp_rank_00_model_states.pt"
        state = torch.load(model, map_location="cpu", weights_only=False)  # our own file: trusted here
        state["extra"] = _Payload(str(tmp_path / "payload_ran"))
        torch.save(state, model)
        marker["files"][model.name] = model.stat().st_size
        marker["sha256"][model.name] = hashlib.sha256(model.read_bytes()).hexdigest()
        (step / "vqmoe_complete.json").write_text(json.dumps(marker))
    else:  # a change of the saved run's configuration
        key, value = how
        section = marker if key == "world_size" else marker["model_config"]
        if key.startswith("moe."):
            section, key = section["moe"], key[4:]
        section[key] = value
        (step / "vqmoe_complete.json").write_text(json.dumps(marker))
    return ck


class _Payload:
    def __init__(self, trace):
        self.trace = trace

    def __reduce__(self):
        return (os.mkdir, (self.trace,))


TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, again and again.\n" for i in range(400))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small text preprocessed at byte and char level, and prefixes that pair one's .bin with the other's
    tokenizer.json (the counts of the other run removed, so that only the content can tell)."""
    from vqmoe_ds.data.preprocess import PreprocessConfig, preprocess_corpus

    tmp = tmp_path_factory.mktemp("table_data")
    (tmp / "train.txt").write_text(TEXT)
    (tmp / "valid.txt").write_text(TEXT[:4000])
    (tmp / "test.txt").write_text(TEXT[:4000])
    splits = {s: str(tmp / f"{s}.txt") for s in ("train", "valid", "test")}
    for kind in ("byte", "char"):
        preprocess_corpus(splits, str(tmp / kind), PreprocessConfig(tokenizer=kind, progress=False))
    for data, tok in (("char", "byte"), ("byte", "char")):
        for split in ("train", "valid", "test"):
            for ext in ("bin", "idx"):
                shutil.copy(tmp / f"{data}.{split}.{ext}", tmp / f"{data}_with_{tok}.{split}.{ext}")
        meta = json.loads((tmp / f"{tok}.tokenizer.json").read_text())
        meta["splits"] = None
        (tmp / f"{data}_with_{tok}.tokenizer.json").write_text(json.dumps(meta))
    for split in ("train", "valid", "test"):  # the right kind, but another preprocessing run's counts
        for ext in ("bin", "idx"):
            shutil.copy(tmp / f"char.{split}.{ext}", tmp / f"recount.{split}.{ext}")
    meta = json.loads((tmp / "char.tokenizer.json").read_text())
    meta["splits"]["train"]["tokens"] += 7
    (tmp / "recount.tokenizer.json").write_text(json.dumps(meta))
    return tmp


def _held(tmp_path, *argv):
    """The pretraining driver into an --out-dir whose lock another run holds."""
    from vqmoe_ds.training.run_lock import RunLock

    lock = RunLock(str(tmp_path / "out")).acquire()
    try:
        return _lm(tmp_path, *argv)
    finally:
        lock.release()


def _latin1_csv(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\u00e9,a\nna\u00efve,b\n".encode("latin-1") * 8)
    return str(path)


ENTRY = []  # the entry point the running case called (its flags are the ones its message may name)


def _lm(tmp_path, *argv):
    from vqmoe_ds.training.lm import main

    ENTRY.append("pretrain")
    return main([*BASE, "--out-dir", str(tmp_path / "out"), *argv])


def _vision(tmp_path, *argv):
    from vqmoe_ds.vision.task import main

    ENTRY.append("vision")
    return main(["--train-iters", "2", "--no-progress", "--out-dir", str(tmp_path / "vout"), *argv])


def _finetune(tmp_path, *argv):
    from vqmoe_ds.finetune.task import main

    ENTRY.append("finetune")
    return main(["--train-iters", "2", "--no-progress", "--out-dir", str(tmp_path / "fout"), *argv])


def _tool(name):
    ENTRY.append(name)
    return load_tool(name)


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
    ("char data, byte tokenizer", lambda t, r, d: _lm(t, "--data-path", str(d / "char_with_byte")),
     "is not bytes of text"),
    ("byte data, char tokenizer", lambda t, r, d: _lm(t, "--data-path", str(d / "byte_with_char")),
     f"holds token id {max(TEXT.encode())}, beyond the {len(set(TEXT))}-token char vocabulary"),
    ("data of another preprocessing", lambda t, r, d: _lm(t, "--data-path", str(d / "recount")),
     f"recount.tokenizer.json recorded {len(TEXT) + 7} for the train split"),
    # checkpoints and run folders
    ("load not a folder", lambda t, r: _lm(t, "--load", str(t / "none")), "is not a folder"),
    ("load no checkpoint", lambda t, r: _lm(t, "--load", str(_damaged(r, t, "empty"))), "no 'latest' file"),
    ("load truncated", lambda t, r: _lm(t, "--load", str(_damaged(r, t, "truncated"))), "bytes, "),
    ("load changed content", lambda t, r: _lm(t, "--load", str(_damaged(r, t, "zeroed"))),
     "does not match the checksum"),
    ("load no marker", lambda t, r: _lm(t, "--load", str(_damaged(r, t, "no_marker"))), "is incomplete"),
    ("load other layers", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("n_layer", 3)))), "--num-layers 3 (n_layer)"),
    ("load other context", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("seq_len", 32)))), "--seq-length 32 (seq_len)"),
    ("load other codebook", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("moe.codebook_dim", 4)))),
     "--codebook-dim 4 (moe.codebook_dim)"),
    ("load other vq kind", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("moe.vq_kind", "lfq")))),
     "--vq-kind 'lfq' (moe.vq_kind)"),
    ("load other world", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("world_size", 2)))),
     "was made with 2 ranks"),
    ("load other ep", lambda t, r: _lm(t, "--load", str(_damaged(r, t, ("moe.ep_size", 2)))),
     "tools/reshard_checkpoint.py --ep-size 1"),
    ("run folder taken", lambda t, r: _lm(t, "--out-dir", str(r)), "belongs to an earlier run"),
    ("run folder in use", lambda t, r: _held(t), "is in use by another run (pid"),
    ("load poisoned", lambda t, r: _lm(t, "--load", str(_damaged(r, t, "poisoned"))),
     "holds the Python object posix.mkdir"),
    ("load marker without files", lambda t, r: _lm(t, "--load", str(_damaged(r, t, "no_files"))), "lists no files"),
    ("load beyond train-iters", lambda t, r: _lm(t, "--load", str(r / "checkpoints"), "--train-iters", "1"),
     "is at step 2, beyond --train-iters 1"),
    ("load into another ZeRO layout", lambda t, r: _lm(t, "--load", str(r / "checkpoints"), "--train-iters", "3",
                                                       *_ds(t, {"zero_optimization": {"stage": 1}})),
     "holds the optimizer state of a ZeRO 0 fp32 run"),
    ("cluster warm-up beyond the run", lambda t, r: _lm(t, "--router", "cluster", "--cluster-warmup-steps", "5"),
     "--cluster-warmup-steps 5 is not below --train-iters 2"),
    ("every step non-finite", lambda t, r: _lm(t, "--router", "topk", "--moe-router-topk-scaling-factor", "1e30"),
     "every one of the 2 step(s) of this run had a non-finite loss", 3),
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
    ("finetune not UTF-8", lambda t, r: _finetune(t, "--load", str(r), "--task", "csv", "--train", _latin1_csv(t),
                                                  "--test", _csv(t)), "is not UTF-8 text (bad byte at offset"),
    # tools
    ("generate temperature", lambda t, r: _tool("generate").main(["--load", str(r), "--temperature", "-1"]),
     "--temperature -1.0 must be > 0"),
    ("generate tokens", lambda t, r: _tool("generate").main(["--load", str(r), "--tokens", "0"]),
     "--tokens 0 must be >= 1"),
    ("generate damaged", lambda t, r: _tool("generate").main(["--load", str(_damaged(r, t, "zeroed")), "--tag",
                                                              "step2"]), "does not match the checksum"),
    ("generate other tokenizer", lambda t, r, d: _tool("generate").main(
        ["--load", str(r), "--tokenizer-meta", str(d / "char.tokenizer.json")]), "was trained on byte tokens"),
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
    ("memory: no GPUs", lambda t, r: _tool("estimate_memory").main(["--gpus", "0"]), "--gpus 0 must be >= 1"),
    ("memory: negative micro-batch", lambda t, r: _tool("estimate_memory").main(["--micro-batch", "-2"]),
     "--micro-batch -2 must be >= 1"),
    ("memory: NaN GPU memory", lambda t, r: _tool("estimate_memory").main(["--gpu-memory-gib", "nan"]),
     "--gpu-memory-gib nan must be a finite number > 0"),
    ("memory: zero GPU memory", lambda t, r: _tool("estimate_memory").main(["--gpu-memory-gib", "0"]),
     "--gpu-memory-gib 0.0 must be a finite number > 0"),
    ("memory: NaN framework", lambda t, r: _tool("estimate_memory").main(["--framework-gib", "nan"]),
     "--framework-gib nan must be a finite number >= 0"),
    ("memory: zero context", lambda t, r: _tool("estimate_memory").main(["--seq-length", "0"]),
     "--seq-length 0 must be >= 1"),
]


RAN = {}  # case name -> (exit status, its error line, the entry point's name)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_its_exit_status(run_dir, data_dir, tmp_path, capsys, case):
    name, call, words, status = (*case, 2) if len(case) == 3 else case
    ENTRY.clear()
    try:
        rc = call(tmp_path, run_dir, data_dir) if call.__code__.co_argcount == 3 else call(tmp_path, run_dir)
    except SystemExit as e:  # argparse-style tools exit themselves
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == status, err[-3000:]
    assert len(lines) == 1 and words in lines[0], err[-3000:]
    assert "Traceback" not in err
    if status == 2:
        assert not (tmp_path / "out" / "log.jsonl").exists()  # no training step ran
    assert not (tmp_path / "payload_ran").exists()
    RAN[name] = (rc, lines[0], ENTRY[0])


def _flags_of(entry: str) -> set:
    """Every option string of an entry point's command line (a driver's parser, or a tool's ``--help``)."""
    if entry in ("pretrain", "vision", "finetune"):
        from vqmoe_ds.finetune.task import command_line as finetune
        from vqmoe_ds.training.lm import command_line as pretrain
        from vqmoe_ds.vision.task import command_line as vision

        parser = {"pretrain": pretrain, "vision": vision, "finetune": finetune}[entry]().parser()
        return set(parser._option_string_actions)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        load_tool(entry).main(["--help"])
    return set(re.findall(r"(--[a-z][a-z0-9_-]*)", out.getvalue()))


def test_every_case_ran_and_names_real_flags():
    """Every case of the table ran above and was classified (its exit status and one line recorded), and every
    ``--flag`` a message names is a flag of its entry point, or of the tool the message names just before it."""
    names = [c[0] for c in CASES]
    if not RAN:
        pytest.skip("the table's cases were not selected in this pytest run")
    assert sorted(RAN) == sorted(names), sorted(set(names) - set(RAN))
    assert {rc for rc, _, _ in RAN.values()} == {2, 3}
    flags, bad = {}, []
    for name, (_, line, entry) in RAN.items():
        for m in re.finditer(r"(?:(tools/(\w+)\.py|pretrain_vqmoe\.py)\s+)?(--[a-z][a-z0-9_-]*)", line):
            owner = m.group(2) or ("pretrain" if m.group(1) else entry)
            if owner not in flags:
                flags[owner] = _flags_of(owner)
            if m.group(3) not in flags[owner]:
                bad.append(f"{name}: {m.group(3)} is not a flag of {owner}")
    assert not bad, bad
