"""Flags of finetune_vqmoe.py and their checks (one-line ``error: <problem>: <fix>``, before any model exists).

The optimisation flags have the pretraining driver's names and meaning, so the same ``--deepspeed_config``
files and the same resolution rules (``vqmoe_ds.training.arguments.resolve_ds_config``: the config wins where
it sets a value, flags fill the rest, contradictions are errors) apply unchanged.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from ..training.arguments import ArgError
from .data import TASKS
from .model import POOLINGS

MODES = ("discrete", "full", "frozen_router")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ArgError(f"{message} (see finetune_vqmoe.py --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Fine-tune a pretrained (VQ)MoE language model as a sequence classifier on DeepSpeed.")
    g = p.add_argument_group("pretrained model")
    g.add_argument("--load", required=True, help="pretraining run: its --out-dir, its checkpoints folder or one tag folder")
    g.add_argument("--tag", help="checkpoint tag (default: the folder's latest; e.g. best)")
    g.add_argument("--run-config", help="the run's config.json when it does not lie beside the checkpoints folder")
    g.add_argument("--tokenizer-meta", help="PREFIX.tokenizer.json of the pretraining data (default: from the run config; bytes)")
    g.add_argument("--mode", choices=MODES, default="discrete",
                   help="discrete: eq. 7, only the discrete path, codebook frozen; full: both paths, all trained; "
                        "frozen_router: the SMoE-Dropout protocol, routing (router, codebook, W_g) frozen, experts trained")
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=TASKS, required=True)
    g.add_argument("--train", required=True, help="train split (IMDB: aclImdb/train)")
    g.add_argument("--valid", help="validation split (optional)")
    g.add_argument("--test", required=True, help="test split: the accuracy reported")
    g.add_argument("--text-column", default="text", help="tsv/csv: header name of the text column")
    g.add_argument("--label-column", default="label", help="tsv/csv: header name of the label column")
    g.add_argument("--max-length", type=int, help="tokens per text (default: the model's context); longer texts are cut")
    g = p.add_argument_group("classifier")
    g.add_argument("--pooling", choices=POOLINGS, default="mean")
    g.add_argument("--classifier-hidden", type=int, help="width of the classifier's hidden layer (default: d_model)")
    g.add_argument("--classifier-dropout", type=float, default=0.1)
    g = p.add_argument_group("training (same meaning as in pretrain_vqmoe.py)")
    g.add_argument("--micro-batch-size", type=int)
    g.add_argument("--gradient-accumulation-steps", type=int)
    g.add_argument("--train-iters", type=int, default=200)
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float)
    g.add_argument("--lr-warmup-iters", type=int)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float)
    g.add_argument("--aux-loss-coef", type=float, default=1.0, help="weight of the MoE layers' auxiliary losses")
    g.add_argument("--moe-expert-parallel-size", type=int, default=1)
    g.add_argument("--capacity-factor", type=float, help="override the pretrained layers' training capacity factor")
    g.add_argument("--eval-capacity-factor", type=float, help="override the pretrained layers' evaluation capacity factor")
    g.add_argument("--drop-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="override capacity dropping (--no-drop-tokens: dropless, every route runs)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--eval-interval", type=int, default=0, help="validate every N steps (0: at the end)")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--out-dir", default="runs/finetune")
    g.add_argument("--save", help="save the fine-tuned model here at the end (DeepSpeed checkpoint)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    g.add_argument("--distributed-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    import deepspeed

    return deepspeed.add_config_arguments(p)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    def bad(msg):
        raise ArgError(msg)

    for name in ("micro_batch_size", "gradient_accumulation_steps", "max_length", "classifier_hidden",
                 "eval_batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            bad(f"--{name.replace('_', '-')} {v} must be >= 1")
    for name in ("train_iters", "log_interval", "moe_expert_parallel_size"):
        if getattr(args, name) < 1:
            bad(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.eval_interval < 0:
        bad(f"--eval-interval {args.eval_interval} must be >= 0")
    if not 0.0 <= args.classifier_dropout < 1.0:
        bad(f"--classifier-dropout {args.classifier_dropout} must be in [0, 1)")
    for name in ("capacity_factor", "eval_capacity_factor"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            bad(f"--{name.replace('_', '-')} {v} must be > 0 (use --no-drop-tokens for a dropless layer)")
    if args.aux_loss_coef < 0:
        bad(f"--aux-loss-coef {args.aux_loss_coef} must be >= 0")
    if args.lr is not None and args.lr <= 0:
        bad(f"--lr {args.lr} must be > 0")
    if args.lr_warmup_iters is not None and not 0 <= args.lr_warmup_iters <= args.train_iters:
        bad(f"--lr-warmup-iters {args.lr_warmup_iters} must lie in [0, --train-iters {args.train_iters}]")
    if args.deepspeed_config and not os.path.isfile(args.deepspeed_config):
        bad(f"--deepspeed_config {args.deepspeed_config} does not exist: see ds_configs/")
    for flag in ("train", "valid", "test"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            bad(f"--{flag} {path} does not exist: give the {flag} split of the task")
