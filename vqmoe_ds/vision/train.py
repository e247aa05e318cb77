"""The image-classification driver behind ``train_vision.py``: flags -> checks -> DeepSpeed engine -> train
loop with validation accuracy, best-checkpoint tracking, final test accuracy, logs and plots.

It is the pretraining driver's recipe with images instead of tokens, and reuses its pieces: the ds_config
resolution and world checks (`training.arguments`), checkpoints with per-rank RNG state (`training.checkpoint`),
the JSONL/TensorBoard/tqdm log (`training.run_log.RunLog`), the plots (`training.plots`) and the launch
helpers.  What is vision-specific lives here: image batches sharded over ranks, augmentation, accuracy, and
the MoE statistics of SoftMoE layers as well as `MoELayer`s.

Evaluation shards the split over the ranks padded to equal length (padding images weigh 0): with expert
parallelism every rank must run the same number of equally sized forwards, because the all-to-all of an
MoE layer is collective.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..data.errors import DataError
from ..moe.config import ROUTERS, ConfigError
from ..parallel import init_distributed, shutdown
from ..routers import set_step
from ..training import checkpoint as ckpt
from ..training.arguments import ArgError, add_moe_args, check_world, moe_overrides, resolve_ds_config
from ..training.lr_schedule import start_lr_schedule
from ..training.preemption import StopRequest
from ..training.run_log import RunLog, gather_moe_stats
from .augment import AUGMENTS, channel_stats, normalize, random_crop_flip, to_tensor
from .datasets import DATASETS, ImageSet, load_dataset
from .vit import NAMED, ViTConfig, build_vit, count_params, moe_ffn_layers, vit_config

VISION_ROUTERS = ROUTERS + ("soft",)
DEFAULT_MICRO_BATCH = 64


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like the pretraining driver
        raise ArgError(f"{message} (see train_vision.py --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Train a ViT with MoE / VQMoE / SoftMoE layers on image classification with DeepSpeed.")
    g = p.add_argument_group("model")
    g.add_argument("--config", default="tiny", help=f"named shape: {', '.join(NAMED)}; the flags below override it")
    g.add_argument("--image-size", type=int, help="input side in pixels (default: the config's)")
    g.add_argument("--patch-size", type=int)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--expert-ffn-hidden-size", type=int)
    g.add_argument("--pool", choices=("cls", "mean"))
    g.add_argument("--dropout", type=float)
    g = add_moe_args(p, VISION_ROUTERS, "dense, a routed MoE, vqmoe, or soft (SoftMoE)")
    g.add_argument("--soft-slots", type=int, help="SoftMoE: slots per expert (default 1)")
    g.add_argument("--soft-normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="SoftMoE: l2-normalised logits with a learned scale (the paper's large-model recipe)")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, help=f"images per rank; default: the ds_config's or {DEFAULT_MICRO_BATCH}")
    g.add_argument("--gradient-accumulation-steps", type=int)
    g.add_argument("--train-iters", type=int, default=100, help="optimizer steps")
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float)
    g.add_argument("--lr-warmup-iters", type=int)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--augment", choices=AUGMENTS, help="standard: crop (pad 4) + flip; crop: no flip; "
                   "default: standard, but crop for synthetic (a flip changes its labels)")
    g.add_argument("--crop-padding", type=int, default=4)
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-interval", type=int, default=0, help="validate every N steps (0: only at the end)")
    g.add_argument("--eval-batch-size", type=int, help="default: --micro-batch-size")
    g.add_argument("--valid-size", type=int, help="validation images (real sets: held out of train; "
                   "default min(5000, 10%%); synthetic: generated, default 1024); 0: no validation")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--out-dir", default="runs/vision")
    g.add_argument("--save", help="checkpoint folder (default: OUT_DIR/checkpoints)")
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--load", help="resume from the latest checkpoint in this folder")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-plots", action="store_true")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="synthetic")
    g.add_argument("--data-path", help="folder written by tools/get_vision_data.py (or an image folder tree)")
    g.add_argument("--num-classes", type=int, default=8, help="synthetic: 4, 8 or 12")
    g.add_argument("--synthetic-train-size", type=int, default=8192)
    g.add_argument("--synthetic-test-size", type=int, default=2048)
    g = p.add_argument_group("distributed")
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    g.add_argument("--distributed-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    import deepspeed

    return deepspeed.add_config_arguments(p)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    bad = lambda msg: (_ for _ in ()).throw(ArgError(msg))  # noqa: E731
    if args.config not in NAMED:
        bad(f"unknown --config {args.config!r}: choose one of {', '.join(NAMED)}")
    for name in ("image_size", "patch_size", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                 "expert_ffn_hidden_size", "num_experts", "top_k", "micro_batch_size", "gradient_accumulation_steps",
                 "eval_batch_size", "codebook_size", "codebook_dim", "soft_slots", "num_classes",
                 "synthetic_train_size", "synthetic_test_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            bad(f"--{name.replace('_', '-')} {v} must be >= 1")
    for name in ("train_iters", "log_interval", "moe_expert_parallel_size"):
        if getattr(args, name) < 1:
            bad(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("eval_interval", "save_interval", "valid_size", "crop_padding", "lr_warmup_iters"):
        v = getattr(args, name)
        if v is not None and v < 0:
            bad(f"--{name.replace('_', '-')} {v} must be >= 0")
    if args.lr is not None and args.lr <= 0:
        bad(f"--lr {args.lr} must be > 0")
    if args.lr_warmup_iters is not None and args.lr_warmup_iters > args.train_iters:
        bad(f"--lr-warmup-iters {args.lr_warmup_iters} exceeds --train-iters {args.train_iters}: shorten the warmup")
    if args.load and not os.path.isdir(args.load):
        bad(f"--load {args.load} is not a folder: give the --save folder of an earlier run")
    if args.deepspeed_config and not os.path.isfile(args.deepspeed_config):
        bad(f"--deepspeed_config {args.deepspeed_config} does not exist: see ds_configs/")
    if args.dataset != "synthetic" and not args.data_path:
        bad(f"--dataset {args.dataset} needs --data-path (the folder tools/get_vision_data.py {args.dataset} wrote)")
    if args.augment is None:
        args.augment = "crop" if args.dataset == "synthetic" else "standard"
    try:
        model_config(args, num_classes=args.num_classes)
    except ConfigError as e:
        raise ArgError(str(e)) from None
    return args


def model_config(args: argparse.Namespace, num_classes: int) -> ViTConfig:
    """The ViTConfig of --config with the given flags on top."""
    moe = moe_overrides(args, slots_per_expert=args.soft_slots, normalize=args.soft_normalize, dropout=args.dropout)
    if moe.get("router", NAMED[args.config]["moe"]["router"]) == "dense":
        moe = {"router": "dense", **({"dropout": args.dropout} if args.dropout is not None else {})}
    elif moe.get("router") == "soft":
        moe.pop("dropout", None)  # SoftMoEConfig has its own dropout field; set it below
        if args.dropout is not None:
            moe["dropout"] = args.dropout
    return vit_config(args.config, image_size=args.image_size, patch_size=args.patch_size, n_layer=args.num_layers,
                      d_model=args.hidden_size, n_head=args.num_attention_heads, d_inner=args.ffn_hidden_size,
                      expert_ffn=args.expert_ffn_hidden_size, pool=args.pool, dropout=args.dropout,
                      attn_dropout=args.dropout, moe_layers=args.moe_layers, num_classes=num_classes, moe=moe)


# ---- data ---------------------------------------------------------------------------------------------
class TrainImages:
    """Endless micro-batches of one rank: epoch e is a permutation drawn from (seed, e); rank r takes every
    world-th image of it, so ranks see disjoint shares.  ``state_dict`` = (epoch, position)."""

    def __init__(self, data: ImageSet, batch: int, rank: int, world: int, seed: int):
        self.data, self.batch, self.rank, self.world, self.seed = data, batch, rank, world, seed
        self.per_rank = len(data) // world
        if self.per_rank < batch:
            raise DataError(f"the training split has {len(data)} images, {self.per_rank} per rank: fewer than one "
                            f"micro-batch of {batch}; lower --micro-batch-size or use more data")
        self.epoch, self.pos = 0, 0
        self._order = None

    def _shard(self) -> np.ndarray:
        if self._order is None:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data))
            self._order = perm[self.rank::self.world][:self.per_rank]
        return self._order

    def __next__(self):
        if self.pos + self.batch > self.per_rank:
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        idx = np.sort(self._shard()[self.pos:self.pos + self.batch])
        self.pos += self.batch
        return self.data.images[idx], self.data.labels[idx]

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: Dict[str, int]) -> None:
        self.epoch, self.pos, self._order = int(s["epoch"]), int(s["pos"]), None


def eval_shard(n: int, rank: int, world: int):
    """(indices, weights) of this rank: every world-th image, padded to ceil(n / world) with weight-0 repeats."""
    per = math.ceil(n / world)
    idx = np.arange(rank, n, world)
    w = np.ones(per, dtype=np.float64)
    w[len(idx):] = 0.0
    return np.concatenate([idx, np.zeros(per - len(idx), dtype=np.int64)]), w


def split_valid(train: ImageSet, valid_size: int, seed: int):
    """(train, valid): ``valid_size`` images held out of train by a seeded permutation (same on every rank)."""
    if valid_size == 0:
        return train, None
    if valid_size >= len(train):
        raise DataError(f"--valid-size {valid_size} leaves no training images of {len(train)}: lower it")
    perm = np.random.default_rng([seed, 99]).permutation(len(train))
    return train.subset(np.sort(perm[valid_size:])), train.subset(np.sort(perm[:valid_size]))


# ---- the driver -------------------------------------------------------------------------------------------
class VisionTrainer:
    def __init__(self, args):
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        self.args = args
        # ---- checks and data, all before the model exists (the data first: its errors need no ranks) -----
        self.splits = self._load_data()
        train = self.splits["train"]
        init_distributed(auto_mpi_discovery=True, distributed_port=args.distributed_port)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.stop = StopRequest()
        self.device = torch.device(get_accelerator().device_name(args.local_rank))
        on_cpu = get_accelerator().device_name() == "cpu"
        self.cfg = cfg = model_config(args, train.num_classes)
        check_world(args, cfg, self.world)
        ds_args = argparse.Namespace(**vars(args))
        if args.micro_batch_size is None:
            ds_args.micro_batch_size = (json.load(open(args.deepspeed_config)).get("train_micro_batch_size_per_gpu")
                                        if args.deepspeed_config else None) or DEFAULT_MICRO_BATCH
        self.ds_config = resolve_ds_config(ds_args, self.world, on_cpu)
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accum = self.ds_config["gradient_accumulation_steps"]
        self.eval_bs = args.eval_batch_size or self.micro
        self.batches = TrainImages(train, self.micro, self.rank, self.world, args.seed)
        self.mean, self.std = channel_stats(train.images, seed=args.seed)
        # ---- model and engine ---------------------------------------------------------------------------
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)  # the same on every rank: identical dense weights, experts by global id
        model = build_vit(cfg)
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"})
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.ds_config)
        self.model = model
        torch.manual_seed(args.seed + 1 + self.rank)  # augmentation, dropout, jitter: different per rank
        start_lr_schedule(self.engine)  # step 1 at the schedule's first lr, not 0 (see lr_schedule.py)
        self.save_dir = args.save or os.path.join(args.out_dir, "checkpoints")
        self.step, self.best_valid = 0, -math.inf
        if args.load:
            self._resume(args.load)
        self.log = RunLog(args.out_dir, self.rank, args.train_iters, self.step, progress=not args.no_progress)
        c = count_params(cfg)
        self.log.info(f"ViT ({args.config}, router {cfg.router}): total {c['total'] / 1e6:.2f}M parameters, active "
                      f"per token {c['active'] / 1e6:.2f}M; data: {args.dataset} ({len(train)} train, "
                      f"{len(self.splits['valid']) if self.splits['valid'] else 0} valid, {len(self.splits['test'])} "
                      f"test, {train.num_classes} classes); {self.world} rank(s), ep {args.moe_expert_parallel_size}, "
                      f"ZeRO {self.ds_config.get('zero_optimization', {}).get('stage', 0)}, batch {self.micro} x "
                      f"{self.accum} x {self.world} images, augment {args.augment}")
        if self.rank == 0:
            os.makedirs(args.out_dir, exist_ok=True)
            with open(os.path.join(args.out_dir, "config.json"), "w") as f:
                json.dump({"args": vars(args), "model": cfg.to_dict(), "params": c, "world_size": self.world,
                           "normalization": {"mean": self.mean, "std": self.std},
                           "class_names": train.class_names}, f, indent=1, default=str)
            with open(os.path.join(args.out_dir, "ds_config.json"), "w") as f:
                json.dump(self.ds_config, f, indent=1)

    def _load_data(self) -> Dict[str, Optional[ImageSet]]:
        a = self.args
        size = a.image_size or NAMED[a.config]["image_size"]
        if a.dataset == "synthetic":
            kw = dict(image_size=size, num_classes=a.num_classes, seed=a.seed)
            valid_size = 1024 if a.valid_size is None else a.valid_size
            return {"train": load_dataset("synthetic", split="train", num_images=a.synthetic_train_size, **kw),
                    "valid": load_dataset("synthetic", split="valid", num_images=valid_size, **kw) if valid_size else None,
                    "test": load_dataset("synthetic", split="test", num_images=a.synthetic_test_size, **kw)}
        full = load_dataset(a.dataset, a.data_path, "train", image_size=size)
        test = load_dataset(a.dataset, a.data_path, "test", image_size=size, class_names=full.class_names)
        valid_size = min(5000, len(full) // 10) if a.valid_size is None else a.valid_size
        train, valid = split_valid(full, valid_size, a.seed)
        return {"train": train, "valid": valid, "test": test}

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _client_state(self):
        return {"step": self.step, "data": self.batches.state_dict(), "best_valid_acc": self.best_valid,
                "world_size": self.world, "model_config": self.cfg.to_dict()}

    def _resume(self, load_dir):
        client, _ = ckpt.load(self.engine, load_dir, resume=True, model=self.model, model_config=self.cfg.to_dict())
        if client.get("world_size", self.world) != self.world:
            raise ArgError(f"the checkpoint in {load_dir} was made with {client['world_size']} ranks, this run has "
                           f"{self.world}: resume with the same number of ranks")
        self.step = int(client["step"])
        self.best_valid = float(client.get("best_valid_acc", -math.inf))
        self.batches.load_state_dict(client["data"])

    def save(self, tag, latest=True):
        return ckpt.save(self.engine, self.save_dir, tag, self._client_state(), None, latest=latest, model=self.model,
                         step=self.step)

    # ---- batches ----------------------------------------------------------------------------------------
    def _inputs(self, images_BHWC: np.ndarray, train: bool) -> torch.Tensor:
        x = to_tensor(images_BHWC)
        if train and self.args.augment != "none":
            x = random_crop_flip(x, self.args.crop_padding, flip=self.args.augment == "standard")
        return normalize(x, self.mean, self.std).to(self.device)

    # ---- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str) -> Dict[str, float]:
        """Loss, top-1 and (K > 10) top-5 accuracy over the whole split, summed over ranks."""
        data = self.splits[split]
        idx, w = eval_shard(len(data), self.rank, self.world)
        self.engine.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # nll, correct, top5 correct, images
        for s in range(0, len(idx), self.eval_bs):
            bi, bw = idx[s:s + self.eval_bs], torch.from_numpy(w[s:s + self.eval_bs])
            logits, _, _ = self.engine(self._inputs(data.images[bi], train=False), None)
            y = torch.from_numpy(data.labels[bi]).to(logits.device)
            nll = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none").cpu().double()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
            y = y.cpu()
            sums += torch.stack([(nll * bw).sum(), ((top[:, 0] == y).double() * bw).sum(),
                                 ((top == y[:, None]).any(1).double() * bw).sum(), bw.sum()])
        self.engine.train()
        if self.world > 1:
            dist.all_reduce(sums)
        n = sums[3].item()
        res = {"loss": sums[0].item() / n, "acc": sums[1].item() / n, "images": int(round(n))}
        if data.num_classes > 10:
            res["top5"] = sums[2].item() / n
        return res

    def validate(self):
        if self.splits["valid"] is None:
            return None
        res = self.evaluate("valid")
        self.log.write({"kind": "valid", "step": self.step, **res})
        self.log.info(f"step {self.step}: valid loss {res['loss']:.4f}, accuracy {100 * res['acc']:.2f}%")
        if res["acc"] > self.best_valid:
            self.best_valid = res["acc"]
            self.save(ckpt.BEST, latest=False)
        return res

    # ---- training ---------------------------------------------------------------------------------------
    def train_step(self):
        set_step(self.model, self.step)
        losses, auxes, correct, seen = [], [], 0, 0
        for _ in range(self.accum):
            images, labels = next(self.batches)
            y = torch.from_numpy(labels).to(self.device)
            logits, loss, aux = self.engine(self._inputs(images, train=True), y)
            self.engine.backward(loss + aux)
            self.engine.step()
            losses.append(loss.item())
            auxes.append(aux.item())
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(labels)
        self.step += 1
        return sum(losses) / len(losses), sum(auxes) / len(auxes), correct / seen, seen * self.world

    def _mean(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t.tolist()

    def train(self) -> bool:
        """Train to --train-iters (True), or until a stop signal on any rank (False: that step is saved)."""
        args = self.args
        win = {"loss": [], "aux": [], "acc": []}
        win_images, win_time = 0, 0.0
        while self.step < args.train_iters:
            t0 = time.perf_counter()
            loss, aux, acc, images = self.train_step()
            dt = time.perf_counter() - t0
            for k, v in zip(("loss", "aux", "acc"), (loss, aux, acc)):
                win[k].append(v)
            win_images += images
            win_time += dt
            self.log.progress(1, loss=loss, img_s=f"{images / dt:.0f}")
            last = self.step == args.train_iters
            if self.step % args.log_interval == 0 or last:
                mean_loss, mean_aux, mean_acc = self._mean([sum(v) / len(v) for v in win.values()])
                gn = self.engine.get_global_grad_norm()
                self.log.write({"kind": "train", "step": self.step, "loss": mean_loss, "aux_loss": mean_aux,
                                "acc": mean_acc, "lr": float(self.engine.get_lr()[0]),
                                "grad_norm": float(gn) if gn is not None else float("nan"),
                                "images_per_s": win_images / win_time,
                                "moe": gather_moe_stats(self.model, moe_ffn_layers(self.model))})
                win = {k: [] for k in win}
                win_images, win_time = 0, 0.0
            if (args.eval_interval and self.step % args.eval_interval == 0) or last:
                self.validate()
            if args.save_interval and self.step % args.save_interval == 0 and not last:
                self.save(f"step{self.step}")
            if not last and self.stop.agreed(self.world):  # pre-empted: save this step, skip the test
                path = self.save(f"step{self.step}")
                self.log.info(f"stopped by {self.stop.describe()} after step {self.step}; saved {path}: resume "
                              f"with --load {self.save_dir}")
                return False
        self.save(f"step{self.step}")
        return True

    def test(self) -> Dict[str, Any]:
        on_best = os.path.isdir(os.path.join(self.save_dir, ckpt.BEST))
        if on_best:
            ckpt.load(self.engine, self.save_dir, tag=ckpt.BEST, resume=False)
        res = self.evaluate("test")
        res["checkpoint"] = "best validation accuracy" if on_best else "final"
        self.log.write({"kind": "test", "step": self.step, **res})
        self.log.info(f"test ({res['checkpoint']} checkpoint): loss {res['loss']:.4f}, accuracy "
                      f"{100 * res['acc']:.2f}% over {res['images']} images")
        if self.rank == 0:
            with open(os.path.join(self.args.out_dir, "results.json"), "w") as f:
                json.dump({"test": res, "best_valid_acc": self.best_valid, "steps": self.step}, f, indent=1)
        return res

    def finish(self):
        self.log.finish(self.save_dir, None if self.args.no_plots else make_vision_plots)


def make_vision_plots(out_dir: str) -> List[str]:
    """The pretraining plots (loss, expert load, code usage) plus accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..training.plots import make_plots, read_log

    written = make_plots(out_dir)
    records = read_log(os.path.join(out_dir, "log.jsonl"))
    train = [r for r in records if r.get("kind") == "train"]
    valid = [r for r in records if r.get("kind") == "valid"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [100 * r["acc"] for r in train], label="train batches (augmented)")
    if valid:
        ax.plot([r["step"] for r in valid], [100 * r["acc"] for r in valid], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "accuracy.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written



def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = parse_args(argv)
        trainer = VisionTrainer(args)
    except (ArgError, ConfigError, DataError, FileNotFoundError) as e:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", os.environ.get(
            "OMPI_COMM_WORLD_RANK", 0)))
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        shutdown(clean=False)
        return 2
    trainer.stop.install()
    if trainer.train():
        trainer.test()
    trainer.finish()
    shutdown(clean=True)
    return 0
