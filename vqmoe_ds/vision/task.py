"""Image classification as a task of the training loop, and the command line of ``train_vision.py``.

What is vision-specific lives here: image batches sharded over ranks, augmentation, accuracy, and the MoE
statistics of SoftMoE layers as well as `MoELayer`s.  The data is read before the process group starts, so its
errors need no ranks.

Evaluation shards the split over the ranks padded to equal length (padding images weigh 0): with expert
parallelism every rank must run the same number of equally sized forwards, because the all-to-all of an MoE
layer is collective.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..fields import setting
from ..cli import CommandLine, Parsed, Section, Shorthand
from ..data.errors import DataError
from ..moe.config import ROUTERS, ConfigError, MoEConfig
from ..training.config import OptimConfig, ParallelConfig, RunConfig
from ..parallel import all_reduce_sum
from ..training.loop import Task, run
from .augment import AUGMENTS, Augment, channel_stats, normalize, random_crop_flip, to_tensor
from .datasets import DATASETS, Dataset, ImageSet, load_dataset
from .soft_moe import SoftMoEConfig
from .vit import NAMED, ViTConfig, build_vit, count_params, moe_ffn_layers, vit_config

VISION_ROUTERS = ROUTERS + ("soft",)
SYNTHETIC_CLASSES = (4, 8, 12)


@dataclass
class VisionDataConfig:
    dataset: Dataset = setting("synthetic", "synthetic (generated, no download), a downloaded set, or an image folder "
                                        "tree")
    data_path: Optional[str] = setting(None, "folder written by tools/get_vision_data.py (or an image folder tree)")
    num_classes: int = setting(8, "synthetic: 4, 8 or 12 classes")
    synthetic_train_size: int = setting(8192, "synthetic: training images")
    synthetic_test_size: int = setting(2048, "synthetic: test images")
    valid_size: Optional[int] = setting(None, "validation images (real sets: held out of train, default min(5000, "
                                              "10%); synthetic: generated, default 1024); 0: none")
    augment: Optional[Augment] = setting(None, "standard: crop (pad 4) + flip; crop: no flip; none; default: standard, "
                                           "but crop for synthetic (a flip changes its labels)")
    crop_padding: int = setting(4, "padding of the random crop, in pixels")


    def __post_init__(self):
        for name in ("synthetic_train_size", "synthetic_test_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.dataset == "synthetic" and self.num_classes not in SYNTHETIC_CLASSES:
            raise ConfigError(f"num_classes={self.num_classes}: the synthetic task has 4, 8 or 12 classes")
        for name in ("valid_size", "crop_padding"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"{name}={v} must be >= 0")
        if self.dataset != "synthetic" and not self.data_path:
            raise ConfigError(f"dataset={self.dataset} needs --data-path (the folder tools/get_vision_data.py "
                              f"{self.dataset} wrote)")
        if self.augment is None:
            self.augment = "crop" if self.dataset == "synthetic" else "standard"


MOE_DERIVED = MoEConfig.model_set_fields()  # MoEConfig fields the model config sets


def command_line() -> CommandLine:
    return CommandLine(
        "train_vision.py", "Train a ViT with MoE / VQMoE / SoftMoE layers on image classification with DeepSpeed.",
        [Section("model", ViTConfig, "model", exclude=("moe", "in_chans", "num_classes"),
                 default_note="the --config shape's"),
         Section("moe", MoEConfig, "mixture of experts (router soft: SoftMoE)", exclude=MOE_DERIVED,
                 default_note="the --config shape's", choices={"router": VISION_ROUTERS}),
         Section("soft", SoftMoEConfig, "SoftMoE", fields=("slots_per_expert", "normalize"),
                 default_note="SoftMoE's"),
         Section("optim", OptimConfig, "optimisation"),
         Section("data", VisionDataConfig, "data"),
         Section("run", RunConfig, "evaluation, logging, checkpoints", defaults={"out_dir": "runs/vision"}),
         Section("parallel", ParallelConfig, "distributed")],
        presets=NAMED, default_preset="tiny",
        shorthands=[Shorthand("--dropout", float, ("model.dropout", "model.attn_dropout", "moe.dropout"),
                              "sets --hidden-dropout, --attention-dropout and --ffn-dropout")])


def model_config(parsed: Parsed, num_classes: int) -> ViTConfig:
    """The ViTConfig of the preset with the given model, MoE and SoftMoE settings on top."""
    moe = {**parsed.given("moe"), **parsed.given("soft")}
    return parsed.checked("model", lambda: vit_config(parsed.preset, num_classes=num_classes, moe=moe,
                                                      **parsed.given("model")))


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


# ---- the task -------------------------------------------------------------------------------------------
class ImageClassification(Task):
    metric, higher_is_better, unit = "acc", True, "images"
    default_micro_batch = 64
    section = ("data", VisionDataConfig)

    def __init__(self, *args):
        super().__init__(*args)
        self.model_config = model_config(self.parsed, self.data.num_classes)  # checked before any data is read

    def load(self) -> None:
        a, seed = self.data, self.optim.seed
        size = self.model_config.image_size
        if a.dataset == "synthetic":
            kw = dict(image_size=size, num_classes=a.num_classes, seed=seed)
            valid_size = 1024 if a.valid_size is None else a.valid_size
            self.splits = {
                "train": load_dataset("synthetic", split="train", num_images=a.synthetic_train_size, **kw),
                "valid": load_dataset("synthetic", split="valid", num_images=valid_size, **kw) if valid_size else None,
                "test": load_dataset("synthetic", split="test", num_images=a.synthetic_test_size, **kw)}
        else:
            full = load_dataset(a.dataset, a.data_path, "train", image_size=size)
            test = load_dataset(a.dataset, a.data_path, "test", image_size=size, class_names=full.class_names)
            valid_size = min(5000, len(full) // 10) if a.valid_size is None else a.valid_size
            train, valid = split_valid(full, valid_size, seed)
            self.splits = {"train": train, "valid": valid, "test": test}
        train = self.splits["train"]
        self.model_config = model_config(self.parsed, train.num_classes)
        self.mean, self.std = channel_stats(train.images, seed=seed)

    def shard(self, micro_batch: int, eval_batch: int) -> None:
        self.eval_bs = eval_batch
        self.batches = TrainImages(self.splits["train"], micro_batch, self.rank, self.world, self.optim.seed)

    def build_model(self) -> torch.nn.Module:
        self.model = build_vit(self.model_config)
        return self.model

    def _inputs(self, images_BHWC: np.ndarray, train: bool) -> torch.Tensor:
        x = to_tensor(images_BHWC)
        if train and self.data.augment != "none":
            x = random_crop_flip(x, self.data.crop_padding, flip=self.data.augment == "standard")
        return normalize(x, self.mean, self.std).to(self.device)

    # ---- training ----------------------------------------------------------------------------------------
    def micro_step(self, engine):
        images, labels = next(self.batches)
        y = torch.from_numpy(labels).to(self.device)
        logits, loss, aux = engine(self._inputs(images, train=True), y)
        return loss, aux, {"images": len(labels), "correct": (logits.argmax(1) == y).sum().item()}

    def train_record(self, sums: Dict[str, float]) -> Dict[str, Any]:
        return {"acc": sums["correct"] / sums["images"]}

    def stats_layers(self, model) -> Optional[List[Any]]:
        return moe_ffn_layers(model)

    # ---- evaluation --------------------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        return self.splits.get(split) is not None

    def evaluate(self, engine, split: str, max_batches: int) -> Dict[str, Any]:
        """Loss, top-1 and (K > 10) top-5 accuracy over the split (or its first ``max_batches`` batches per rank),
        summed over ranks."""
        data = self.splits[split]
        idx, w = eval_shard(len(data), self.rank, self.world)
        starts = list(range(0, len(idx), self.eval_bs))
        sums = torch.zeros(4, dtype=torch.float64)  # nll, correct, top5 correct, images
        for s in starts[:max_batches] if max_batches else starts:
            bi, bw = idx[s:s + self.eval_bs], torch.from_numpy(w[s:s + self.eval_bs])
            logits, _, _ = engine(self._inputs(data.images[bi], train=False), None)
            y = torch.from_numpy(data.labels[bi]).to(logits.device)
            nll = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none").cpu().double()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
            y = y.cpu()
            sums += torch.stack([(nll * bw).sum(), ((top[:, 0] == y).double() * bw).sum(),
                                 ((top == y[:, None]).any(1).double() * bw).sum(), bw.sum()])
        sums = all_reduce_sum(sums)
        n = sums[3].item()
        res = {"loss": sums[0].item() / n, "acc": sums[1].item() / n, "images": int(round(n))}
        if data.num_classes > 10:
            res["top5"] = sums[2].item() / n
        return res

    def describe_eval(self, split: str, res: Dict[str, Any]) -> str:
        return (f"loss {res['loss']:.4f}, accuracy {100 * res['acc']:.2f}%"
                + (f" over {res['images']} images" if split == "test" else ""))

    # ---- reports -------------------------------------------------------------------------------------------
    def config_objects(self) -> Dict[str, Any]:
        cfg = self.model_config
        soft = {k: cfg.moe[k] for k in ("slots_per_expert", "normalize") if k in cfg.moe}
        moe = {k: v for k, v in cfg.moe.items() if k not in soft}
        return {"model": cfg, "moe": moe, "soft": soft, "optim": self.optim, "data": self.data, "run": self.run,
                "parallel": self.parallel}

    def describe(self) -> str:
        cfg, s = self.model_config, self.splits
        c = count_params(cfg)
        return (f"ViT ({self.parsed.preset}, router {cfg.router}): total {c['total'] / 1e6:.2f}M parameters, active "
                f"per token {c['active'] / 1e6:.2f}M; data: {self.data.dataset} ({len(s['train'])} train, "
                f"{len(s['valid']) if s['valid'] else 0} valid, {len(s['test'])} test, {s['train'].num_classes} "
                f"classes), augment {self.data.augment}")

    def run_info(self) -> Dict[str, Any]:
        return {"params": count_params(self.model_config), "normalization": {"mean": self.mean, "std": self.std},
                "class_names": self.splits["train"].class_names}

    def plots(self, out_dir: str) -> List[str]:
        return make_vision_plots(out_dir)


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


make_task = ImageClassification.from_parsed


def main(argv: Optional[List[str]] = None) -> int:
    return run(command_line(), make_task, argv)


def cli() -> None:
    """The console script ``vqmoe-train-vision`` (setup.py); the same as the driver script."""
    from ..parallel import exit_process

    exit_process(main())
