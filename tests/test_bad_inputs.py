"""The bad-input catalogue of docs/checkpoints.md: every entry fails before the first training step with one
line naming the problem and the fix.  Most are checked by calling the check functions the driver calls
(they run before the model is built); the last one runs the driver in one process end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vqmoe_ds import checkpoint as ckpt
from vqmoe_ds.cli import ConfigError
from vqmoe_ds.data import ArrayTokenStream, DataError
from vqmoe_ds.training.config import check_save_dir, check_world, resolve_ds_config
from vqmoe_ds.training.data import eval_sizes_ok, load_corpus, split_in_order
from vqmoe_ds.training.launch import DRIVER, ROOT, env_for_ranks
from vqmoe_ds.training.lm import command_line, make_task, model_config


def lm_config(argv, vocab_size):
    return model_config(command_line().parse(argv), vocab_size)


def parse_args(argv):
    """The pretraining driver's configs from ``argv``, checked as the driver checks them before any rank exists."""
    return make_task(command_line().parse(argv))

# (flags, words the one-line message must contain)
FLAGS = [
    (["--config", "huge"], "invalid choice: 'huge'"),
    (["--num-layers", "0"], "--num-layers 0: n_layer=0 must be >= 1"),
    (["--top-k", "0"], "--top-k 0: top_k=0 must be between 1"),
    (["--topk", "0"], "--topk 0: top_k=0 must be between 1"),
    (["--train-iters", "0"], "--train-iters 0: train_iters=0 must be >= 1"),
    (["--eval-interval", "-1"], "--eval-interval -1: eval_interval=-1 must be >= 0"),
    (["--keep-last", "-2"], "--keep-last -2: keep_last=-2 must be >= 0"),
    (["--max-skipped-steps", "0"], "--max-skipped-steps 0: max_skipped_steps=0 must be >= 1"),
    (["--dist-timeout-minutes", "0"], "--dist-timeout-minutes 0.0: dist_timeout_minutes=0.0 must be > 0"),
    (["--lr", "-1"], "--lr -1.0: lr=-1.0 must be > 0"),
    (["--lr", "nan"], "lr=nan is not a finite number"),
    (["--dropout", "1.5"], "--dropout 1.5: dropout=1.5 must lie in [0, 1)"),
    (["--seed", "-1"], "--seed -1: seed=-1 must be >= 0"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr 0.01: min_lr=0.01 exceeds lr=0.001"),
    (["--train-iters", "5", "--lr-warmup-iters", "10"], "lr_warmup_iters=10 must lie in [0, train_iters=5]"),
    (["--data-path", "x", "--data-file", "y"], "both given"),
    (["--mem-len", "16"], "applies to --model txl only"),
    (["--load", "/nonexistent/run"], "--load /nonexistent/run: load=/nonexistent/run is not a folder"),
    (["--deepspeed_config", "/nonexistent.json"], "does not exist"),
    (["--router", "bogus"], "invalid choice"),
    (["--num-layers", "two"], "--num-layers 'two' is not an int"),
    (["--router", "topk", "--num-experts", "4", "--top-k", "8"], "top_k"),
    (["--top-k", "1", "--topk", "2"], "--top-k 1 and --topk 2 both set moe.top_k to different values"),
    (["--no-drop-tokens", "--disable-moe-token-dropping", "--drop-tokens"], "both set moe.drop_tokens"),
    (["--moe-router-bias-update-rate", "-1"], "--moe-router-bias-update-rate -1.0: bias_update_rate=-1.0 must be >= 0"),
    (["--moe-z-loss-coeff", "-0.1"], "--moe-z-loss-coeff -0.1: z_loss_coef=-0.1 must be >= 0"),
    (["--moe-shared-expert-intermediate-size", "-4"], "shared_expert_size=-4 must be >= 0"),
    (["--router", "hash", "--moe-router-score-function", "sigmoid"], "router 'hash' has no such scores"),
    (["--router", "vq", "--moe-router-enable-expert-bias"], "needs a learned top-k router"),
]


@pytest.mark.parametrize("argv,words", FLAGS, ids=[" ".join(a) for a, _ in FLAGS])
def test_flag(argv, words):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg


def _ds(tmp_path, cfg):
    path = tmp_path / "ds.json"
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(path)


DS = [
    ('{"zero_optimization": {"stage": 1', "not valid JSON"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
    ({"zero_optimization": {"stage": 5}}, "use 0, 1 or 2"),
    ({"train_micro_batch_size_per_gpu": 4}, "contradicts train_micro_batch_size_per_gpu=4"),  # with --micro-batch-size 8
    ({"train_batch_size": 7}, "train_batch_size=7"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}, "contradicts optimizer.params.lr"),  # with --lr 3e-3
    ({"scheduler": {"type": "WarmupLR", "params": {}}}, "has its own scheduler block"),  # with --lr-warmup-iters
    ({"gradient_clipping": 5.0}, "contradicts gradient_clipping"),  # with --clip-grad 1
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     "offloads the optimizer"),
]


@pytest.mark.parametrize("cfg,words", DS, ids=[w for _, w in DS])
def test_ds_config(tmp_path, cfg, words):
    with pytest.raises(ConfigError) as e:
        task = parse_args(["--deepspeed_config", _ds(tmp_path, cfg), "--micro-batch-size", "8", "--lr", "3e-3",
                           "--lr-warmup-iters", "1", "--clip-grad", "1"])
        resolve_ds_config(task.optim, task.parallel, world_size=2, on_cpu=True)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_world_checks():
    task = parse_args(["--router", "topk", "--moe-expert-parallel-size", "4"])
    with pytest.raises(ConfigError, match="does not divide the world size 2"):
        check_world(task.ep_size, task.is_moe, 2)
    task = parse_args(["--router", "dense", "--moe-expert-parallel-size", "2"])
    with pytest.raises(ConfigError, match="the model is dense"):
        check_world(task.ep_size, task.is_moe, 2)


def test_data_checks(tmp_path):
    with pytest.raises(DataError, match="--data-file"):
        load_corpus(data_file=str(tmp_path / "missing.txt"))
    with pytest.raises((DataError, FileNotFoundError), match="tokenizer.json"):
        load_corpus(data_path=str(tmp_path / "nothing"))
    tiny = split_in_order(np.arange(200, dtype=np.int64) % 256, "tiny")
    eval_sizes_ok(tiny["valid"], "gpt", 8, 128, 2)  # 10 tokens: evaluated whole, the batch padded
    with pytest.raises(DataError, match="nothing to predict"):
        eval_sizes_ok(ArrayTokenStream(np.zeros(1, dtype=np.int64), 256), "gpt", 8, 128, 2)


def test_unwritable_save_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should go")
    with pytest.raises(ConfigError, match="is not writable.*give --save a folder"):
        check_save_dir(str(blocker / "checkpoints"))


def _fake_checkpoint(root, tag, cfg, files=("mp_rank_00_model_states.pt", "rank0_state.pt"), latest=True, world=1,
                     config=None):
    path = root / tag
    path.mkdir(parents=True)
    sizes = {}
    for name in files:
        (path / name).write_bytes(b"x" * 10)
        sizes[name] = 10
    (path / ckpt.MARKER).write_text(json.dumps({"tag": tag, "step": 1, "world_size": world, "files": sizes,
                                                "model_config": cfg, "config": config}))
    if latest:
        (root / "latest").write_text(tag)
    return path


def test_checkpoint_checks(tmp_path):
    cfg = lm_config(["--router", "vqmoe", "--num-experts", "4"], 256).to_dict()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .*no 'latest' file"):
        ckpt.resolve(str(empty))
    with pytest.raises(ckpt.CheckpointError, match="nope does not exist"):
        ckpt.resolve(str(tmp_path / "nope"))
    root = tmp_path / "ck"
    path = _fake_checkpoint(root, "step1", cfg)
    assert ckpt.verify(str(root), "step1")["step"] == 1
    with pytest.raises(ckpt.CheckpointError, match="step7 does not exist"):
        ckpt.verify(str(root), "step7")
    (path / "rank0_state.pt").write_bytes(b"xy")  # truncated
    with pytest.raises(ckpt.CheckpointError, match="rank0_state.pt has 2 bytes, 10 were saved"):
        ckpt.verify(str(root), "step1")
    os.remove(path / "rank0_state.pt")
    with pytest.raises(ckpt.CheckpointError, match="missing rank0_state.pt"):
        ckpt.verify(str(root), "step1")
    os.remove(path / ckpt.MARKER)
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.verify(str(root), "step1")
    # another architecture, another router, another vocabulary
    other = lm_config(["--router", "vqmoe", "--num-experts", "4", "--num-layers", "3"], 256).to_dict()
    with pytest.raises(ckpt.CheckpointError, match=r"--num-layers 3 \(n_layer\).*same model flags"):
        ckpt.check_architecture(other, cfg, "checkpoint X")
    other = lm_config(["--router", "topk", "--num-experts", "4"], 256).to_dict()
    with pytest.raises(ckpt.CheckpointError, match=r"--router 'topk' \(moe.router\)"):
        ckpt.check_architecture(other, cfg, "checkpoint X")
    other = lm_config(["--router", "vqmoe", "--num-experts", "4"], 512).to_dict()
    with pytest.raises(ckpt.CheckpointError, match="vocabulary of 512 tokens.*tokenizer"):
        ckpt.check_architecture(other, cfg, "checkpoint X")
    # another expert-parallel size: the way out is resharding
    other = lm_config(["--router", "vqmoe", "--num-experts", "4", "--moe-expert-parallel-size", "2"], 256).to_dict()
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_architecture(other, cfg, "checkpoint X")
    assert str(e.value) == ("checkpoint X was saved at expert-parallel size 2, this run has 1: convert it with "
                            "tools/reshard_checkpoint.py --ep-size 1, or resume with --moe-expert-parallel-size 2")
    # another sequence length, codebook dimension or VQ kind: one line each (the shapes of the weights differ)
    for flags, words in ((["--seq-length", "32"], r"--seq-length 32 \(seq_len\)"),
                         (["--codebook-dim", "4"], r"--codebook-dim 4 \(moe.codebook_dim\)"),
                         (["--vq-kind", "lfq"], r"--vq-kind 'lfq' \(moe.vq_kind\)")):
        other = lm_config(["--router", "vqmoe", "--num-experts", "4", *flags], 256).to_dict()
        with pytest.raises(ckpt.CheckpointError, match=words):
            ckpt.check_architecture(other, cfg, "checkpoint X")
    # what may change at a resume: dropout, capacity, loss weights
    same = lm_config(["--router", "vqmoe", "--num-experts", "4", "--dropout", "0.1", "--capacity-factor", "2",
                      "--vq-alpha", "0.1", "--no-drop-tokens"], 256).to_dict()
    ckpt.check_architecture(same, cfg, "checkpoint X")


def test_finetune_resume_with_other_settings_is_refused(tmp_path):
    from vqmoe_ds.finetune.task import command_line as ft_command_line
    from vqmoe_ds.finetune.task import make_task as ft_make_task

    csv = tmp_path / "t.csv"
    csv.write_text("text,label\na,x\n")
    argv = ["--load", str(tmp_path), "--task", "csv", "--train", str(csv), "--test", str(csv)]
    task = ft_make_task(ft_command_line().parse([*argv, "--mode", "full"]))
    marker = {"config": {"finetune": {"load": str(tmp_path), "mode": "discrete", "task": "csv", "train": str(csv)}}}
    with pytest.raises(ckpt.CheckpointError) as e:
        task.check_checkpoint(marker, "checkpoint X")
    assert str(e.value) == ("checkpoint X fine-tuned with mode='discrete', this run has 'full': resume with the "
                            "settings of the run that saved it")
    task.check_checkpoint({"config": {"finetune": {"mode": "full", "task": "csv"}}}, "checkpoint X")


def test_checkpoint_with_missing_expert_file(tmp_path):
    from deepspeed.moe.layer import MoE

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = MoE(8, torch.nn.Linear(8, 8), num_experts=2, ep_size=1, k=1)

    root = tmp_path / "ck"
    _fake_checkpoint(root, "step1", None, files=("layer_0_expert_0_mp_rank_00_model_states.pt",))
    with pytest.raises(ckpt.CheckpointError, match="lacks the file of expert 1 of MoE layer 0"):
        ckpt.check_expert_files(str(root), "step1", Two())


def test_driver_refuses_foreign_checkpoint_before_training(tmp_path):
    """End to end, one process: a checkpoint of another architecture stops the driver with exit 2, one line."""
    cfg = lm_config(["--num-layers", "3"], 256).to_dict()
    root = tmp_path / "ck"
    _fake_checkpoint(root, "step1", cfg)
    env = env_for_ranks(str(tmp_path))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    r = subprocess.run([sys.executable, DRIVER, "--load", str(root), "--train-iters", "2", "--corpus-bytes", "100000",
                        "--out-dir", str(tmp_path / "out"), "--no-plots", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--num-layers 3 (n_layer)" in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "out" / "log.jsonl").exists()  # no training step ran


def test_driver_refuses_a_checkpoint_of_another_world_size(tmp_path):
    cfg = lm_config([], 256).to_dict()
    root = tmp_path / "ck"
    _fake_checkpoint(root, "step1", cfg, world=2)
    env = env_for_ranks(str(tmp_path))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    r = subprocess.run([sys.executable, DRIVER, "--load", str(root), "--train-iters", "2", "--corpus-bytes", "100000",
                        "--out-dir", str(tmp_path / "out"), "--no-plots", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was made with 2 ranks, this run has 1" in errors[0], r.stderr[-2000:]
    assert "tools/reshard_checkpoint.py" in errors[0]


def _port():
    from vqmoe_ds.training.launch import free_port

    return free_port()
