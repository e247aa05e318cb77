"""The fine-tuning driver behind ``finetune_vqmoe.py``: flags -> checks (checkpoint, tokenizer, data, world) ->
DeepSpeed engine with the pretrained weights -> training -> validation/test accuracy and the expert FLOPs per
token measured on the test forward.

Modes (``--mode``):
  * ``discrete`` -- eq. 7: every VQMoE layer runs its discrete path only (``vqmoe_mode="discrete_only"``) with
    the codebook frozen (``freeze_vq``); the continuous router and mixing gate W_g are not built, and their
    checkpoint keys are dropped by name (anything else missing is an error);
  * ``full`` -- the pretrained layers as they are (both paths), everything trained;
  * ``frozen_router`` -- the SMoE-Dropout fine-tuning protocol for the baselines: every routing parameter
    (router, codebook and its projections, W_g) frozen, experts and the rest trained.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from ..analysis.expert_flops import ExpertFlopsCounter
from ..data import DataError
from ..models import build_model, moe_layers
from ..moe.config import ConfigError
from ..parallel import init_distributed, shutdown
from ..training.arguments import ArgError, resolve_ds_config
from ..training.lr_schedule import start_lr_schedule
from . import data as ftdata
from .arguments import parse_args
from .model import SequenceClassifier
from .pretrained import (CheckpointError, StrictRemap, absent_path_keys, discrete_only_config, load_into, read_run,
                         tokenizer_for)


def freeze_routing(model: torch.nn.Module) -> int:
    """Freeze every routing parameter of every MoE layer; returns how many parameters were frozen."""
    n = 0
    for layer in moe_layers(model):
        for part in (layer.router, layer.vq_router, layer.mix):
            if part is None:
                continue
            for p in part.parameters():
                n += p.numel() if p.requires_grad else 0
                p.requires_grad_(False)
        if layer.vq_router is not None and hasattr(layer.vq_router.quantizer, "freeze"):
            layer.vq_router.quantizer.freeze()  # also stops EMA / k-means / dead-code updates
    return n


class FinetuneTrainer:
    def __init__(self, args):
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        self.args = args
        init_distributed(auto_mpi_discovery=True, distributed_port=args.distributed_port)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(get_accelerator().device_name(args.local_rank))
        on_cpu = get_accelerator().device_name() == "cpu"
        # ---- checks, all before the model exists ---------------------------------------------------------
        self.run = run = read_run(args.load, args.tag, args.run_config)
        self.tokenizer = tokenizer_for(run, args.tokenizer_meta)
        src = run.model_config
        ep = args.moe_expert_parallel_size
        if self.world % ep:
            raise ArgError(f"--moe-expert-parallel-size {ep} does not divide the world size {self.world}: launch a "
                           f"multiple of {ep} ranks or lower it")
        if ep > 1 and not src.is_moe:
            raise ArgError(f"--moe-expert-parallel-size {ep} needs MoE layers, but the pretrained model is dense")
        overrides = {k: v for k, v in (("capacity_factor", args.capacity_factor), ("drop_tokens", args.drop_tokens),
                                       ("eval_capacity_factor", args.eval_capacity_factor)) if v is not None}
        cfg = src.replace(moe=dict(src.moe, ep_size=ep, **overrides))
        if args.mode == "discrete":
            cfg = discrete_only_config(cfg)
        self.cfg = cfg
        self.max_len = args.max_length or cfg.seq_len
        if cfg.model == "gpt" and self.max_len > cfg.seq_len:
            raise ArgError(f"--max-length {self.max_len} exceeds the model's context {cfg.seq_len}: lower it")
        self.train_set = self._read("train", None)
        self.label_names = self.train_set.label_names
        self.valid_set = self._read("valid", self.label_names) if args.valid else None
        self.test_set = self._read("test", self.label_names)
        self.ds_config = resolve_ds_config(args, self.world, on_cpu)
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accum = self.ds_config["gradient_accumulation_steps"]
        self.eval_bs = args.eval_batch_size or self.micro
        self.batches = ftdata.TrainBatches(self.train_set, self.micro, self.rank, self.world, args.seed)
        # ---- model, engine, pretrained weights -------------------------------------------------------------
        torch.manual_seed(args.seed)  # same classifier init on every rank
        model = SequenceClassifier(build_model(cfg), len(self.label_names), args.pooling, args.classifier_hidden,
                                   args.classifier_dropout)
        self.frozen_routing = freeze_routing(model) if args.mode == "frozen_router" else 0
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = split_params_into_different_moe_groups_for_optimizer({"params": trainable, "name": "parameters"})
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=self.ds_config)
        start_lr_schedule(self.engine)  # step 1 at the schedule's first lr, not 0 (see lr_schedule.py)
        self.model = model
        remap = StrictRemap(prefix="backbone.", may_drop=["backbone.lm_head.*"] + absent_path_keys(src, cfg, "backbone."),
                            may_be_new=["classifier.*"], where=run.path)
        self.load_report = load_into(self.engine, run, remap)
        torch.manual_seed(args.seed + 1 + self.rank)
        self.step = 0
        self.counts = {"trainable": sum(p.numel() for p in trainable),
                       "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
        if self.rank == 0:
            os.makedirs(args.out_dir, exist_ok=True)
            self.log_file = open(os.path.join(args.out_dir, "log.jsonl"), "w")
        self.info(f"fine-tuning {run.path} ({cfg.model}, router {cfg.moe.get('router')}) in mode {args.mode}: "
                  f"{len(self.train_set)} train / {len(self.test_set)} test examples, {len(self.label_names)} labels, "
                  f"{self.counts['trainable'] / 1e6:.3f}M trainable, {self.counts['frozen'] / 1e6:.3f}M frozen "
                  f"parameters; dropped from the checkpoint: {', '.join(self.load_report['dropped']) or 'nothing'}")

    def _read(self, split, label_names):
        a = self.args
        path = getattr(a, split)
        d = ftdata.read_task(a.task, path, label_names, a.text_column, a.label_column)
        enc = ftdata.encode(d, self.tokenizer, self.max_len, path)
        if label_names is not None and len(enc.label_names) != len(label_names):
            raise DataError(f"{path} has {len(enc.label_names)} labels, the train split {len(label_names)}: give "
                            f"splits of the same task")
        return enc

    # ---- logging ---------------------------------------------------------------------------------------------
    def info(self, msg):
        if self.rank == 0:
            print(msg, flush=True)

    def write(self, record):
        if self.rank == 0:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    # ---- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset, count_flops: bool = False) -> dict:
        self.engine.eval()
        correct = torch.zeros(2, dtype=torch.float64)
        counter = ExpertFlopsCounter(self.model)
        with counter if count_flops else _nullctx():
            for idx, mask, labels, weight in ftdata.eval_batches(dataset, self.eval_bs, self.rank, self.world):
                logits, _, _ = self.engine(idx.to(self.device), mask.to(self.device))
                hit = (logits.argmax(-1).cpu() == labels).double()
                correct += torch.stack([(hit * weight.double()).sum(), weight.double().sum()])
        if self.world > 1:
            dist.all_reduce(correct)
        self.engine.train()
        res = {"accuracy": float(correct[0] / correct[1]), "examples": int(correct[1])}
        if count_flops:
            res["expert_flops"] = counter.summary()
        return res

    # ---- training ----------------------------------------------------------------------------------------------
    def train(self):
        a = self.args
        window, t0 = [], time.perf_counter()
        while self.step < a.train_iters:
            for _ in range(self.accum):
                idx, mask, labels = next(self.batches)
                _, loss, aux = self.engine(idx.to(self.device), mask.to(self.device), labels.to(self.device))
                self.engine.backward(loss + a.aux_loss_coef * aux)
                self.engine.step()
                window.append((loss.item(), aux.item()))
            self.step += 1
            if self.step % a.log_interval == 0 or self.step == a.train_iters:
                t = torch.tensor([sum(x for x, _ in window), sum(y for _, y in window), len(window)], dtype=torch.float64)
                if self.world > 1:
                    dist.all_reduce(t)
                rec = {"kind": "train", "step": self.step, "loss": float(t[0] / t[2]), "aux_loss": float(t[1] / t[2]),
                       "lr": float(self.engine.get_lr()[0]), "seconds": time.perf_counter() - t0}
                self.write(rec)
                self.info(f"step {self.step}: loss {rec['loss']:.4f} aux {rec['aux_loss']:.4f}")
                window = []
            if self.valid_set is not None and a.eval_interval and self.step % a.eval_interval == 0:
                res = self.evaluate(self.valid_set)
                self.write({"kind": "valid", "step": self.step, **res})
                self.info(f"step {self.step}: valid accuracy {res['accuracy']:.4f}")

    def finish(self) -> dict:
        a = self.args
        out = {"mode": a.mode, "task": a.task, "checkpoint": self.run.path, "router": self.cfg.moe.get("router"),
               "steps": self.step, "labels": self.label_names, "parameters": self.counts,
               "frozen_routing_parameters": self.frozen_routing, "dropped_keys": self.load_report["dropped"],
               "truncated_texts": {"train": self.train_set.truncated, "test": self.test_set.truncated}}
        if self.valid_set is not None:
            out["valid"] = self.evaluate(self.valid_set)
        out["test"] = self.evaluate(self.test_set, count_flops=True)
        out["expert_flops_per_token"] = out["test"]["expert_flops"]["expert_flops_per_token"]
        self.write({"kind": "test", "step": self.step, **out["test"]})
        self.info(f"test accuracy {out['test']['accuracy']:.4f} over {out['test']['examples']} examples; expert "
                  f"FLOPs/token {out['expert_flops_per_token']:.0f} (measured on the test forward)")
        if a.save:
            self.engine.save_checkpoint(a.save, tag=f"step{self.step}", client_state={
                "finetune": {k: v for k, v in out.items() if k != "test"}, "model_config": self.cfg.to_dict()})
        if self.rank == 0:
            with open(os.path.join(a.out_dir, "results.json"), "w") as f:
                json.dump(out, f, indent=1)
            self.log_file.close()
        return out


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False



def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = parse_args(argv)
        trainer = FinetuneTrainer(args)
    except (ArgError, ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        shutdown(clean=False)
        return 2
    trainer.train()
    trainer.finish()
    shutdown(clean=True)
    return 0
