"""Text classification on a pretrained (VQ)MoE language model as a task of the training loop, and the command
line of ``finetune_vqmoe.py``.

Modes (``--mode``):
  * ``discrete`` -- eq. 7: every VQMoE layer runs its discrete path only (``vqmoe_mode="discrete_only"``) with
    the codebook frozen (``freeze_vq``); the continuous router and mixing gate W_g are not built, and their
    checkpoint keys are dropped by name (anything else missing is an error);
  * ``full`` -- the pretrained layers as they are (both paths), everything trained;
  * ``frozen_router`` -- the SMoE-Dropout fine-tuning protocol for the baselines: every routing parameter
    (router, codebook and its projections, W_g) frozen, experts and the rest trained.

The pretrained weights are loaded into the engine before the first step; a resumed fine-tuning run (``--resume``)
loads its own checkpoint instead.  The test split reports accuracy and the expert FLOPs per token measured on
its forward passes.
"""
from __future__ import annotations

import itertools
import os
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F

from ..fields import setting
from .. import checkpoint as ckpt
from ..analysis.expert_flops import ExpertFlopsCounter
from ..cli import CommandLine, Section
from ..data import DataError
from ..models import build_model
from ..moe.config import ConfigError, MoEConfig
from ..training.config import OptimConfig, ParallelConfig, RunConfig
from ..parallel import all_reduce_sum
from ..training.loop import Task, run
from . import data as ftdata
from .discrete import absent_path_keys, discrete_only_config, freeze_routing
from .model import POOLINGS, Pooling, SequenceClassifier

Mode = Literal["discrete", "full", "frozen_router"]
MODES = typing.get_args(Mode)


@dataclass
class FinetuneConfig:
    load: Optional[str] = setting(None, "the pretraining run: its --out-dir, its checkpoints folder or one tag folder "
                                        "(required)")
    tag: Optional[str] = setting(None, "checkpoint tag of --load (default: the folder's latest; e.g. best)")
    run_config: Optional[str] = setting(None, "the run's config.json when it does not lie beside the checkpoints "
                                              "folder")
    tokenizer_meta: Optional[str] = setting(None, "PREFIX.tokenizer.json of the pretraining data (default: the "
                                                  "checkpoint's)")
    mode: Mode = setting("discrete", "discrete: eq. 7, discrete path only, codebook frozen; full: both paths, all "
                                    "trained; frozen_router: routing frozen, experts trained")
    task: Optional[ftdata.TaskName] = setting(None, "the task's format (required)")
    train: Optional[str] = setting(None, "train split (IMDB: aclImdb/train) (required)")
    valid: Optional[str] = setting(None, "validation split: picks the best checkpoint (optional)")
    test: Optional[str] = setting(None, "test split: the accuracy reported (required)")
    text_column: str = setting("text", "tsv/csv: header name of the text column")
    label_column: str = setting("label", "tsv/csv: header name of the label column")
    max_length: Optional[int] = setting(None, "tokens per text (default: the model's context); longer texts are cut")
    pooling: Pooling = setting("mean", "hidden states pooled over the real tokens (mean) or the last real token (last)")
    classifier_hidden: Optional[int] = setting(None, "width of the classifier's hidden layer (default: d_model)")
    classifier_dropout: float = setting(0.1, "dropout of the classifier")
    aux_loss_coef: float = setting(1.0, "weight of the MoE layers' auxiliary losses")

    FLAGS: ClassVar[Dict[str, Tuple[str, ...]]] = {"load": ("--load", "--pretrained-checkpoint")}

    def __post_init__(self):
        for name, what in (("load", "the pretraining run's folder"), ("task", f"one of {', '.join(ftdata.TASKS)}"),
                           ("train", "the train split"), ("test", "the test split")):
            if getattr(self, name) is None:
                raise ConfigError(f"--{name} is required: give {what}")
        for name in ("train", "valid", "test"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"{name}={path} does not exist: give the {name} split of the task")
        for name in ("max_length", "classifier_hidden"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}={v} must be >= 1")
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ConfigError(f"classifier_dropout={self.classifier_dropout} must be in [0, 1)")
        if not self.aux_loss_coef >= 0:
            raise ConfigError(f"aux_loss_coef={self.aux_loss_coef} must be >= 0")


# the pretrained layers' settings a fine-tuning run may change (everything else comes from the checkpoint)
MOE_OVERRIDABLE = ("ep_size", "capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens", "expert_impl")
RESUME_MUST_MATCH = ("load", "tag", "mode", "task", "train", "pooling", "classifier_hidden")


def command_line() -> CommandLine:
    return CommandLine(
        "finetune_vqmoe.py", "Fine-tune a pretrained (VQ)MoE language model as a sequence classifier on DeepSpeed.",
        [Section("finetune", FinetuneConfig, "pretrained model, task, classifier"),
         Section("moe", MoEConfig, "mixture of experts (overrides of the pretrained layers)", fields=MOE_OVERRIDABLE,
                 default_note="the pretrained model's"),
         Section("optim", OptimConfig, "optimisation (same meaning as in pretrain_vqmoe.py)",
                 defaults={"train_iters": 200}),
         Section("run", RunConfig, "evaluation, logging, checkpoints", defaults={"out_dir": "runs/finetune"},
                 flags={"load": ("--resume",)}),
         Section("parallel", ParallelConfig, "distributed")])


class TextClassification(Task):
    metric, higher_is_better, unit = "accuracy", True, "examples"
    default_micro_batch = 8
    section = ("finetune", FinetuneConfig)

    @property
    def ft(self) -> FinetuneConfig:
        return self.data

    def load(self) -> None:
        a = self.ft
        self.pretrained = ckpt.read_run(a.load, a.tag, a.run_config)
        self.tokenizer = ckpt.tokenizer_for(self.pretrained, a.tokenizer_meta)
        src = self.pretrained.model_config
        cfg = self.parsed.checked("moe", lambda: src.replace_moe(**self.parsed.given("moe")))
        if cfg.moe.ep_size > 1 and not src.is_moe:
            raise ConfigError(f"--moe-expert-parallel-size {cfg.moe.ep_size} needs MoE layers, but the pretrained "
                              f"model is dense: drop the flag")
        if a.mode == "discrete":
            cfg = discrete_only_config(cfg)
        self.model_config = cfg
        self.max_len = a.max_length or cfg.seq_len
        if cfg.model == "gpt" and self.max_len > cfg.seq_len:
            raise ConfigError(f"--max-length {self.max_len} exceeds the model's context {cfg.seq_len}: lower it")
        self.train_set = self._read("train", None)
        self.label_names = self.train_set.label_names
        self.valid_set = self._read("valid", self.label_names) if a.valid else None
        self.test_set = self._read("test", self.label_names)
        self.load_report: Dict[str, List[str]] = {"dropped": [], "new": []}

    def _read(self, split, label_names):
        a = self.ft
        path = getattr(a, split)
        d = ftdata.read_task(a.task, path, label_names, a.text_column, a.label_column)
        enc = ftdata.encode(d, self.tokenizer, self.max_len, path)
        if label_names is not None and len(enc.label_names) != len(label_names):
            raise DataError(f"{path} has {len(enc.label_names)} labels, the train split {len(label_names)}: give "
                            f"splits of the same task")
        return enc

    def shard(self, micro_batch: int, eval_batch: int) -> None:
        self.eval_bs = eval_batch
        self.batches = ftdata.TrainBatches(self.train_set, micro_batch, self.rank, self.world, self.optim.seed)

    def build_model(self) -> torch.nn.Module:
        a = self.ft
        torch.manual_seed(self.optim.seed)  # the same classifier on every rank
        self.model = SequenceClassifier(build_model(self.model_config), len(self.label_names), a.pooling,
                                        a.classifier_hidden, a.classifier_dropout)
        self.frozen_routing = freeze_routing(self.model) if a.mode == "frozen_router" else 0
        self.counts = {"trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                       "frozen": sum(p.numel() for p in self.model.parameters() if not p.requires_grad)}
        return self.model

    def after_engine(self, engine, model, resuming: bool) -> None:
        if resuming:  # the fine-tuning checkpoint holds the weights (and says what was dropped)
            return
        src = self.pretrained
        remap = ckpt.StrictRemap(prefix="backbone.", may_drop=["backbone.lm_head.*"] + absent_path_keys(
            src.model_config, self.model_config, "backbone."), may_be_new=["classifier.*"], where=src.path)
        self.load_report = ckpt.load_into(engine, src, remap)

    # ---- training ----------------------------------------------------------------------------------------
    def router_step(self, step: int) -> int:
        """Routing schedules continue from the pretraining run's step (StableMoE stays in its stage 2)."""
        return int(self.pretrained.client_state.get("step") or 0) + step

    def micro_step(self, engine):
        idx, mask, labels = next(self.batches)
        _, loss, aux = engine(idx.to(self.device), mask.to(self.device), labels.to(self.device))
        return loss, self.ft.aux_loss_coef * aux, {"examples": len(labels)}

    # ---- evaluation --------------------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        return split != "valid" or self.valid_set is not None

    def evaluate(self, engine, split: str, max_batches: int) -> Dict[str, Any]:
        dataset = self.valid_set if split == "valid" else self.test_set
        sums = torch.zeros(3, dtype=torch.float64)  # correct, nll, examples
        counter = ExpertFlopsCounter(self.model)
        batches = ftdata.eval_batches(dataset, self.eval_bs, self.rank, self.world)
        if max_batches:
            batches = itertools.islice(batches, max_batches)
        if split == "test":
            counter.__enter__()
        try:
            for idx, mask, labels, weight in batches:
                logits, _, _ = engine(idx.to(self.device), mask.to(self.device))
                logits = logits.float().cpu()
                hit = (logits.argmax(-1) == labels).double()
                nll = F.cross_entropy(logits, labels, reduction="none").double()
                w = weight.double()
                sums += torch.stack([(hit * w).sum(), (nll * w).sum(), w.sum()])
        finally:
            if split == "test":
                counter.__exit__(None, None, None)
        sums = all_reduce_sum(sums)
        res = {"accuracy": float(sums[0] / sums[2]), "loss": float(sums[1] / sums[2]), "examples": int(sums[2])}
        if split == "test":
            res["expert_flops"] = counter.summary()
            self.expert_flops_per_token = res["expert_flops"]["expert_flops_per_token"]
        return res

    def describe_eval(self, split: str, res: Dict[str, Any]) -> str:
        text = f"accuracy {res['accuracy']:.4f}, loss {res['loss']:.4f}"
        if split == "test":
            text += (f" over {res['examples']} examples; expert FLOPs/token "
                     f"{res['expert_flops']['expert_flops_per_token']:.0f} (measured on the test forward)")
        return text

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"batches": self.batches.state_dict(), "load_report": self.load_report, "labels": self.label_names}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.batches.load_state_dict(state["batches"])
        self.load_report = state.get("load_report", self.load_report)

    def client_state(self) -> Dict[str, Any]:
        return {"finetune": {"mode": self.ft.mode, "task": self.ft.task, "labels": self.label_names,
                             "pretrained": self.pretrained.path}}

    def check_checkpoint(self, marker: Dict[str, Any], where: str) -> None:
        saved = (marker.get("config") or {}).get("finetune") or {}
        for key in RESUME_MUST_MATCH:
            if key in saved and saved[key] != getattr(self.ft, key):
                raise ckpt.CheckpointError(f"{where} fine-tuned with {key}={saved[key]!r}, this run has "
                                           f"{getattr(self.ft, key)!r}: resume with the settings of the run that "
                                           f"saved it")

    # ---- reports -------------------------------------------------------------------------------------------
    def config_objects(self) -> Dict[str, Any]:
        return {"finetune": self.ft,
                "moe": {k: v for k, v in self.model_config.moe.settings().items() if k in MOE_OVERRIDABLE},
                "optim": self.optim, "run": self.run, "parallel": self.parallel}

    def describe(self) -> str:
        cfg = self.model_config
        return (f"fine-tuning {self.pretrained.path} ({cfg.model}, router {cfg.moe.router}) in mode "
                f"{self.ft.mode}: {len(self.train_set)} train / {len(self.test_set)} test examples, "
                f"{len(self.label_names)} labels, {self.counts['trainable'] / 1e6:.3f}M trainable, "
                f"{self.counts['frozen'] / 1e6:.3f}M frozen parameters; dropped from the checkpoint: "
                f"{', '.join(self.load_report['dropped']) or 'nothing'}")

    def run_info(self) -> Dict[str, Any]:
        return {"pretrained": self.pretrained.path, "labels": self.label_names, "parameters": self.counts}

    def results(self) -> Dict[str, Any]:
        a = self.ft
        return {"mode": a.mode, "task": a.task, "pretrained": self.pretrained.path,
                "router": self.model_config.moe.router, "labels": self.label_names, "parameters": self.counts,
                "frozen_routing_parameters": self.frozen_routing, "dropped_keys": self.load_report["dropped"],
                "truncated_texts": {"train": self.train_set.truncated, "test": self.test_set.truncated},
                "expert_flops_per_token": getattr(self, "expert_flops_per_token", None)}


make_task = TextClassification.from_parsed


def main(argv: Optional[List[str]] = None) -> int:
    return run(command_line(), make_task, argv)


def cli() -> None:
    """The console script ``vqmoe-finetune`` (setup.py); the same as the driver script."""
    from ..parallel import exit_process

    exit_process(main())
