"""Command-line flags of pretrain_vqmoe.py (Megatron-DeepSpeed style) and their checks.

Every bad setting stops the run before the model is built, with one line: ``error: <problem>: <fix>``.
Checks that need the world size (expert-parallel size, global batch) run right after
``deepspeed.init_distributed()`` and still before any training step.

DeepSpeed config vs flags: **the ds_config wins where it sets a value, flags fill what it leaves out**, and a
flag given explicitly that contradicts the config is an error (never a silent choice).  This covers the
optimizer's lr, the scheduler (a ``"scheduler"`` block in the config replaces the flags' warmup + cosine),
``gradient_clipping`` and the batch sizes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Any, Dict, List, Optional

from ..models.configs import NAMED, ModelConfig, named_config
from ..moe.config import ROUTERS, VQ_DISTANCES, VQ_KINDS, VQMOE_MODES, ConfigError


class ArgError(ValueError):
    """A bad flag or config; the message is one line naming the problem and the fix."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error over several lines; we want one line
        raise ArgError(f"{message} (see pretrain_vqmoe.py --help)")


DEFAULT_LR, DEFAULT_CLIP = 3.5e-4, 1.0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Pretrain a GPT or Transformer-XL language model with MoE / VQMoE layers on DeepSpeed.")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=("gpt", "txl"), default="gpt")
    g.add_argument("--config", default="tiny", help=f"named shape: {', '.join(NAMED)}; the flags below override it")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--ffn-hidden-size", type=int, help="dense FFN width (and the experts' unless --expert-ffn-hidden-size)")
    g.add_argument("--expert-ffn-hidden-size", type=int)
    g.add_argument("--vocab-size", type=int, help="default: the data's vocabulary (256 for bytes)")
    g.add_argument("--seq-length", type=int, help="GPT context / TXL tgt_len")
    g.add_argument("--mem-len", type=int, help="TXL memory length (default: --seq-length for txl)")
    g.add_argument("--eval-seq-length", type=int, help="TXL evaluation tgt_len (default: --seq-length)")
    g.add_argument("--dropout", type=float)
    g.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None)
    add_moe_args(p, ROUTERS)
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, help="per rank; default: the ds_config's or 8")
    g.add_argument("--gradient-accumulation-steps", type=int, help="default: the ds_config's or 1")
    g.add_argument("--train-iters", type=int, default=100, help="optimizer steps")
    g.add_argument("--lr", type=float, help=f"peak lr (default: the ds_config's or {DEFAULT_LR})")
    g.add_argument("--min-lr", type=float, help="lr at the end of the cosine (default 0.1 x lr)")
    g.add_argument("--lr-warmup-iters", type=int, help="linear warmup steps (default 0)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, help=f"gradient norm clipping (default: the ds_config's or {DEFAULT_CLIP})")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-interval", type=int, default=0, help="validate every N steps (0: only at the end)")
    g.add_argument("--eval-iters", type=int, default=10, help="validation batches (TXL: segments) per rank")
    g.add_argument("--test-iters", type=int, default=0, help="test batches per rank (0: the whole test split)")
    g.add_argument("--eval-batch-size", type=int, help="default: --micro-batch-size")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--out-dir", default="runs/latest", help="logs, TensorBoard, plots, config")
    g.add_argument("--save", help="checkpoint folder (default: OUT_DIR/checkpoints)")
    g.add_argument("--save-interval", type=int, default=0, help="save every N steps (0: only best and final)")
    g.add_argument("--load", help="resume from the latest checkpoint in this folder")
    g.add_argument("--keep-last", type=int, default=0,
                   help="keep only the newest N regular checkpoints (0: all); best is always kept")
    g.add_argument("--max-skipped-steps", type=int, default=10,
                   help="stop after this many steps in a row with a non-finite loss (each is skipped)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--no-plots", action="store_true")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", help="prefix written by tools/preprocess_data.py (PREFIX.{train,valid,test}.bin/.idx)")
    g.add_argument("--data-file", help="a text file read as bytes (vocab 256), split 90/5/5 in order")
    g.add_argument("--corpus-bytes", type=int, default=2_000_000, help="size of the default synthetic corpus")
    g = p.add_argument_group("distributed")
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    g.add_argument("--distributed-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)),
                   help="rendezvous port when ranks are found through MPI (mpirun)")
    g.add_argument("--dist-timeout-minutes", type=float, default=30.0,
                   help="a collective that waits longer than this (a rank died or hangs) fails the run")
    import deepspeed

    return deepspeed.add_config_arguments(p)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Checks that need no world size."""
    def bad(msg):
        raise ArgError(msg)

    if args.config not in NAMED:
        bad(f"unknown --config {args.config!r}: choose one of {', '.join(NAMED)}")
    positive = ["num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "expert_ffn_hidden_size",
                "vocab_size", "seq_length", "eval_seq_length", "num_experts", "top_k", "micro_batch_size",
                "gradient_accumulation_steps", "eval_batch_size", "codebook_size", "codebook_dim"]
    for name in positive:
        v = getattr(args, name)
        if v is not None and v < 1:
            bad(f"--{name.replace('_', '-')} {v} must be >= 1")
    for name in ("train_iters", "log_interval", "moe_expert_parallel_size"):
        if getattr(args, name) < 1:
            bad(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.max_skipped_steps < 1:
        bad(f"--max-skipped-steps {args.max_skipped_steps} must be >= 1")
    if not args.dist_timeout_minutes > 0:
        bad(f"--dist-timeout-minutes {args.dist_timeout_minutes} must be > 0")
    for name in ("eval_interval", "eval_iters", "test_iters", "save_interval", "lr_warmup_iters", "mem_len",
                 "keep_last"):
        v = getattr(args, name)
        if v is not None and v < 0:
            bad(f"--{name.replace('_', '-')} {v} must be >= 0")
    if args.lr is not None and args.lr <= 0:
        bad(f"--lr {args.lr} must be > 0")
    if args.min_lr is not None and args.lr is not None and not 0 <= args.min_lr <= args.lr:
        bad(f"--min-lr {args.min_lr} must lie in [0, --lr {args.lr}]")
    if args.lr_warmup_iters is not None and args.lr_warmup_iters > args.train_iters:
        bad(f"--lr-warmup-iters {args.lr_warmup_iters} exceeds --train-iters {args.train_iters}: shorten the warmup")
    if args.data_path and args.data_file:
        bad("--data-path and --data-file both given: choose one")
    if args.model == "gpt" and args.mem_len:
        bad(f"--mem-len {args.mem_len} applies to --model txl only: drop it or use --model txl")
    if args.load and not os.path.isdir(args.load):
        bad(f"--load {args.load} is not a folder: give the --save folder of an earlier run")
    if args.deepspeed_config and not os.path.isfile(args.deepspeed_config):
        bad(f"--deepspeed_config {args.deepspeed_config} does not exist: see ds_configs/")
    try:
        model_config(args, vocab_size=args.vocab_size or 256)
    except ConfigError as e:
        raise ArgError(str(e)) from None


def add_moe_args(p: argparse.ArgumentParser, routers, router_help: Optional[str] = None):
    """The mixture-of-experts flags, shared by every driver (language models, vision); returns their group so
    a driver can add its own (e.g. SoftMoE's).  ``moe_overrides`` turns them into MoEConfig fields."""
    g = p.add_argument_group("mixture of experts")
    g.add_argument("--router", choices=routers, help=router_help)
    g.add_argument("--moe-layers", help="all | every_other | none | comma list of layer ids")
    g.add_argument("--num-experts", type=int)
    g.add_argument("--top-k", type=int)
    g.add_argument("--moe-expert-parallel-size", type=int, default=1)
    g.add_argument("--capacity-factor", type=float)
    g.add_argument("--eval-capacity-factor", type=float)
    g.add_argument("--drop-tokens", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--balance-loss-coef", type=float)
    g.add_argument("--vqmoe-mode", choices=VQMOE_MODES)
    g.add_argument("--vq-alpha", type=float)
    g.add_argument("--codebook-size", type=int)
    g.add_argument("--codebook-dim", type=int)
    g.add_argument("--vq-distance", choices=VQ_DISTANCES)
    g.add_argument("--vq-kind", choices=VQ_KINDS)
    g.add_argument("--vq-ema", action=argparse.BooleanOptionalAction, default=None,
                   help="EMA codebook updates instead of gradient updates")
    g.add_argument("--vq-dead-code-threshold", type=float,
                   help=">0: restart codes whose EMA usage falls below this many tokens per step")
    g.add_argument("--smoe-dropout-k-start", type=int)
    g.add_argument("--smoe-dropout-k-end", type=int)
    g.add_argument("--smoe-dropout-k-steps", type=int)
    g.add_argument("--stablemoe-stage1-steps", type=int)
    return g


def moe_overrides(args: argparse.Namespace, **extra) -> Dict[str, Any]:
    """The MoEConfig fields the flags of ``add_moe_args`` (and ``extra``) set; flags not given are left out, so
    the named config's values stand."""
    fields = {
        "router": args.router, "num_experts": args.num_experts, "top_k": args.top_k,
        "ep_size": args.moe_expert_parallel_size, "capacity_factor": args.capacity_factor,
        "eval_capacity_factor": args.eval_capacity_factor, "drop_tokens": args.drop_tokens,
        "balance_loss_coef": args.balance_loss_coef, "vqmoe_mode": args.vqmoe_mode, "vq_alpha": args.vq_alpha,
        "codebook_size": args.codebook_size, "codebook_dim": args.codebook_dim, "vq_distance": args.vq_distance,
        "vq_kind": args.vq_kind, "vq_ema": args.vq_ema, "vq_dead_code_threshold": args.vq_dead_code_threshold,
        "smoe_dropout_k_start": args.smoe_dropout_k_start, "smoe_dropout_k_end": args.smoe_dropout_k_end,
        "smoe_dropout_k_steps": args.smoe_dropout_k_steps, "stablemoe_stage1_steps": args.stablemoe_stage1_steps,
        **extra}
    return {k: v for k, v in fields.items() if v is not None}


def model_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """The ModelConfig of --config with the flags that were given applied on top."""
    moe = moe_overrides(args, dropout=args.dropout)
    seq = args.seq_length or NAMED[args.config]["seq_len"]
    mem_len = args.mem_len if args.mem_len is not None else (seq if args.model == "txl" else 0)
    return named_config(args.config, model=args.model, n_layer=args.num_layers, d_model=args.hidden_size,
                        n_head=args.num_attention_heads, d_inner=args.ffn_hidden_size,
                        expert_ffn=args.expert_ffn_hidden_size, seq_len=seq, mem_len=mem_len,
                        vocab_size=vocab_size, dropout=args.dropout, attn_dropout=args.dropout,
                        tie_embeddings=args.tie_embeddings, moe_layers=args.moe_layers, moe=moe)


def check_world(args: argparse.Namespace, cfg: ModelConfig, world_size: int) -> None:
    ep = args.moe_expert_parallel_size
    if world_size % ep:
        raise ArgError(f"--moe-expert-parallel-size {ep} does not divide the world size {world_size}: "
                       f"launch a multiple of {ep} ranks or lower the expert-parallel size")
    if ep > 1 and not cfg.is_moe:
        raise ArgError(f"--moe-expert-parallel-size {ep} needs MoE layers, but the model is dense: "
                       f"set --router or drop the flag")


def _load_ds_config(args) -> Dict[str, Any]:
    if not args.deepspeed_config:
        return {"zero_optimization": {"stage": 0}}
    try:
        with open(args.deepspeed_config) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ArgError(f"--deepspeed_config {args.deepspeed_config} is not valid JSON (line {e.lineno}: {e.msg}): "
                       f"fix the file") from None


def resolve_ds_config(args: argparse.Namespace, world_size: int, on_cpu: bool) -> Dict[str, Any]:
    """The DeepSpeed config the engine gets: the file's settings, completed from the flags (see module doc)."""
    ds = copy.deepcopy(_load_ds_config(args))
    src = args.deepspeed_config or "the default ds_config"

    def conflict(flag, flag_value, key, cfg_value):
        raise ArgError(f"{flag} {flag_value} contradicts {key}={cfg_value} in {src}: remove one of them")

    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        raise ArgError(f"ZeRO stage 3 in {src} is not supported: DeepSpeed's MoE layers refuse it; use stage 0, 1 or 2")
    if stage not in (0, 1, 2):
        raise ArgError(f"zero_optimization.stage={stage} in {src}: use 0, 1 or 2")
    # batch sizes: train_batch = micro x accumulation x data-parallel world (all ranks; experts are sharded
    # over the ep group but every rank reads its own data)
    micro = args.micro_batch_size or ds.get("train_micro_batch_size_per_gpu") or 8
    accum = args.gradient_accumulation_steps or ds.get("gradient_accumulation_steps") or 1
    for flag, val, key in (("--micro-batch-size", args.micro_batch_size, "train_micro_batch_size_per_gpu"),
                           ("--gradient-accumulation-steps", args.gradient_accumulation_steps,
                            "gradient_accumulation_steps")):
        if val is not None and key in ds and ds[key] != val:
            conflict(flag, val, key, ds[key])
    if "train_batch_size" in ds and ds["train_batch_size"] != micro * accum * world_size:
        raise ArgError(f"train_batch_size={ds['train_batch_size']} in {src} is not micro {micro} x accumulation "
                       f"{accum} x world {world_size} = {micro * accum * world_size}: fix one of them")
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
              train_batch_size=micro * accum * world_size)
    # optimizer
    opt = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    params = opt.setdefault("params", {})
    if "lr" in params and args.lr is not None and params["lr"] != args.lr:
        conflict("--lr", args.lr, "optimizer.params.lr", params["lr"])
    params.setdefault("lr", args.lr or DEFAULT_LR)
    params.setdefault("weight_decay", args.weight_decay)
    if on_cpu and opt["type"].lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)  # no JIT-compiled CPU FusedAdam
    lr = params["lr"]
    # scheduler: the config's block, or linear warmup + cosine from the flags
    if "scheduler" in ds:
        for flag, val in (("--lr-warmup-iters", args.lr_warmup_iters), ("--min-lr", args.min_lr)):
            if val is not None:
                raise ArgError(f"{flag} {val} given but {src} has its own scheduler block, which wins: "
                               f"remove the flag or the block")
    else:
        min_lr = args.min_lr if args.min_lr is not None else 0.1 * lr
        if min_lr > lr:
            raise ArgError(f"--min-lr {min_lr} exceeds the peak lr {lr}: lower --min-lr")
        # DeepSpeed's WarmupCosineLR needs >= 1 warmup step; "no warmup" = one step at ratio 1
        warmup = args.lr_warmup_iters or 0
        ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": args.train_iters, "warmup_num_steps": max(warmup, 1),
            "warmup_min_ratio": 0.0 if warmup else 1.0, "warmup_type": "linear", "cos_min_ratio": min_lr / lr}}
    # clipping
    if "gradient_clipping" in ds and args.clip_grad is not None and ds["gradient_clipping"] != args.clip_grad:
        conflict("--clip-grad", args.clip_grad, "gradient_clipping", ds["gradient_clipping"])
    ds.setdefault("gradient_clipping", args.clip_grad if args.clip_grad is not None else DEFAULT_CLIP)
    if ds.get("fp16", {}).get("enabled"):
        raise ArgError(f"fp16 in {src} is not supported (MoE routers need bf16 or fp32 range): use bf16")
    if on_cpu and ds.get("bf16", {}).get("enabled") and ds.get("zero_optimization", {}).get("offload_optimizer"):
        raise ArgError(f"{src} offloads the optimizer, which needs a GPU: use ds_configs/cpu_fp32.json on CPU")
    ds.setdefault("steps_per_print", 10 ** 9)  # the driver logs; keep DeepSpeed's own step prints quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def check_save_dir(path: str, rank: int = 0) -> None:
    """The checkpoint folder can be created and written (each rank probes it: on several nodes it must be shared)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe_rank{rank}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ArgError(f"checkpoint folder {path} is not writable ({e.strerror}): give --save a folder you can "
                       f"write to") from None

