"""The pretraining driver behind ``pretrain_vqmoe.py``: flags -> checks -> DeepSpeed engine -> train loop
with validation, best-checkpoint tracking, final test, logs and plots.

One optimizer step = ``gradient_accumulation_steps`` micro-batches through ``engine.backward``/``engine.step``
(the engine steps the optimizer and the scheduler at the accumulation boundary); scheduled routers get
``set_step(model, step)`` once per optimizer step.  The loss that is back-propagated is the task NLL plus the
MoE layers' auxiliary losses (balance, VQ, distillation); the logged ``loss`` is the task NLL alone.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..data import DataError
from ..models import build_model, count_params, flops_per_token, param_report
from ..moe.config import ConfigError
from ..routers import set_step
from . import checkpoint as ckpt
from .arguments import ArgError, check_world, model_config, parse_args, resolve_ds_config
from .data import TrainBatches, eval_batches, eval_sizes_ok, load_corpus
from .metrics import NLLMeter
from .run_log import RunLog, gather_moe_stats


class Trainer:
    def __init__(self, args):
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        self.args = args
        deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=args.distributed_port)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(get_accelerator().device_name(args.local_rank))
        on_cpu = get_accelerator().device_name() == "cpu"
        # ---- checks, all before the model exists -------------------------------------------------------
        self.corpus = load_corpus(args.data_path, args.data_file, args.corpus_bytes, args.seed, args.vocab_size)
        self.cfg = cfg = model_config(args, args.vocab_size or self.corpus.vocab_size)
        check_world(args, cfg, self.world)
        self.ds_config = resolve_ds_config(args, self.world, on_cpu)
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accum = self.ds_config["gradient_accumulation_steps"]
        self.eval_bs = args.eval_batch_size or self.micro
        self.eval_len = args.eval_seq_length or cfg.seq_len
        if cfg.model == "gpt" and self.eval_len > cfg.seq_len:
            raise ArgError(f"--eval-seq-length {self.eval_len} exceeds the GPT context {cfg.seq_len}: lower it")
        self.train_batches = TrainBatches(self.corpus.streams["train"], cfg.model, self.micro, cfg.seq_len,
                                          self.rank, self.world, args.seed)
        for split in ("valid", "test"):
            eval_sizes_ok(self.corpus.streams[split], cfg.model, self.eval_bs, self.eval_len, self.world)
        # ---- model and engine ---------------------------------------------------------------------------
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)  # the same on every rank: identical dense weights, experts by global id
        model = build_model(cfg)
        scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
        if scalars:  # DeepSpeedEngine._broadcast_model does p.data.view(torch.uint8), at any world size
            raise ArgError(f"parameter {scalars[0]} is 0-dimensional, which DeepSpeed's initial broadcast cannot "
                           f"send (engine._broadcast_model views it as bytes): give it shape [1] in its module")
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"})
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.ds_config)
        self.model = model
        torch.manual_seed(args.seed + 1 + self.rank)  # dropout, jitter: different per rank
        self.flops_per_token = flops_per_token(cfg)
        self.save_dir = args.save or os.path.join(args.out_dir, "checkpoints")
        self.step, self.best_valid, self.mems = 0, math.inf, None
        if args.load:
            self._resume(args.load)
        self.log = RunLog(args.out_dir, self.rank, args.train_iters, self.step, progress=not args.no_progress)
        self.log.info(f"model {cfg.model} ({args.config}), {param_report(model, cfg)}; data: {self.corpus.source}; "
                      f"{self.world} rank(s), ep {args.moe_expert_parallel_size}, "
                      f"ZeRO {self.ds_config.get('zero_optimization', {}).get('stage', 0)}, "
                      f"batch {self.micro} x {self.accum} x {self.world} x {cfg.seq_len} tokens")
        if self.rank == 0:
            os.makedirs(args.out_dir, exist_ok=True)
            with open(os.path.join(args.out_dir, "config.json"), "w") as f:
                json.dump({"args": vars(args), "model": cfg.to_dict(), "params": count_params(cfg),
                           "world_size": self.world}, f, indent=1, default=str)
            with open(os.path.join(args.out_dir, "ds_config.json"), "w") as f:
                json.dump(self.ds_config, f, indent=1)

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _client_state(self):
        return {"step": self.step, "data": self.train_batches.state_dict(), "best_valid": self.best_valid,
                "world_size": self.world, "model_config": self.cfg.to_dict()}

    def _resume(self, load_dir):
        client, mems = ckpt.load(self.engine, load_dir, resume=True)
        if client.get("world_size", self.world) != self.world:
            raise ArgError(f"the checkpoint in {load_dir} was made with {client['world_size']} ranks, this run has "
                           f"{self.world}: resume with the same number of ranks")
        self.step = int(client["step"])
        self.best_valid = float(client.get("best_valid", math.inf))
        self.train_batches.load_state_dict(client["data"])
        self.mems = [m.to(self.device) for m in mems] if mems else None

    def save(self, tag, latest=True):
        return ckpt.save(self.engine, self.save_dir, tag, self._client_state(), self.mems, latest=latest)

    # ---- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str, max_batches: int) -> dict:
        self.engine.eval()
        meter, mems = NLLMeter(), None
        for x, y in eval_batches(self.corpus.streams[split], self.cfg.model, self.eval_bs, self.eval_len,
                                 self.rank, self.world, max_batches):
            logits, _, _, mems = self.engine(x.to(self.device), None, mems)
            meter.add(logits, y.to(self.device))
        self.engine.train()
        return meter.all_reduce().summary()

    def validate(self):
        res = self.evaluate("valid", self.args.eval_iters)
        self.log.write({"kind": "valid", "step": self.step, **res})
        self.log.info(f"step {self.step}: valid loss {res['loss']:.4f}, bpc {res['bpc']:.4f}, ppl {res['ppl']:.3f}")
        if res["loss"] < self.best_valid:
            self.best_valid = res["loss"]
            self.save(ckpt.BEST, latest=False)
        return res

    # ---- training ---------------------------------------------------------------------------------------
    def train_step(self):
        set_step(self.model, self.step)
        losses, auxes = [], []
        for _ in range(self.accum):
            x, y = next(self.train_batches)
            if self.train_batches.new_epoch:
                self.mems = None
            _, loss, aux, self.mems = self.engine(x.to(self.device), y.to(self.device), self.mems)
            self.engine.backward(loss + aux)
            self.engine.step()
            losses.append(loss.item())
            auxes.append(aux.item())
            tokens = x.numel()
        self.step += 1
        return sum(losses) / len(losses), sum(auxes) / len(auxes), tokens * self.accum * self.world

    def _mean(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t.tolist()

    def train(self):
        args = self.args
        window_loss, window_aux, window_tokens, window_time = [], [], 0, 0.0
        while self.step < args.train_iters:
            t0 = time.perf_counter()
            loss, aux, tokens = self.train_step()
            dt = time.perf_counter() - t0
            window_loss.append(loss)
            window_aux.append(aux)
            window_tokens += tokens
            window_time += dt
            self.log.progress(1, loss=loss, tok_s=f"{tokens / dt:.0f}")
            last = self.step == args.train_iters
            if self.step % args.log_interval == 0 or last:
                mean_loss, mean_aux = self._mean([sum(window_loss) / len(window_loss),
                                                  sum(window_aux) / len(window_aux)])
                tok_s = window_tokens / window_time
                gn = self.engine.get_global_grad_norm()
                self.log.write({"kind": "train", "step": self.step, "loss": mean_loss, "aux_loss": mean_aux,
                                "lr": float(self.engine.get_lr()[0]),
                                "grad_norm": float(gn) if gn is not None else float("nan"),
                                "tokens_per_s": tok_s, "flops_per_s": tok_s * self.flops_per_token,
                                "moe": gather_moe_stats(self.model)})
                window_loss, window_aux, window_tokens, window_time = [], [], 0, 0.0
            if (args.eval_interval and self.step % args.eval_interval == 0) or last:
                self.validate()
            if args.save_interval and self.step % args.save_interval == 0 and not last:
                self.save(f"step{self.step}")
        self.save(f"step{self.step}")

    def test(self) -> dict:
        if os.path.isdir(os.path.join(self.save_dir, ckpt.BEST)):
            ckpt.load(self.engine, self.save_dir, tag=ckpt.BEST, resume=False)
        res = self.evaluate("test", self.args.test_iters)
        res["best_valid_loss"] = self.best_valid
        self.log.write({"kind": "test", "step": self.step, **res})
        self.log.info(f"test (best-validation checkpoint): loss {res['loss']:.4f}, bpc {res['bpc']:.4f}, "
                      f"ppl {res['ppl']:.3f} over {res['tokens']} tokens")
        if self.rank == 0:
            with open(os.path.join(self.args.out_dir, "results.json"), "w") as f:
                json.dump({"test": res, "best_valid_loss": self.best_valid, "steps": self.step}, f, indent=1)
        return res

    def finish(self):
        self.log.close()
        if self.rank == 0 and not self.args.no_plots:
            from .plots import make_plots

            for p in make_plots(self.args.out_dir):
                print(f"plot: {p}", flush=True)
        if self.rank == 0:
            print(f"logs: {os.path.join(self.args.out_dir, 'log.jsonl')}, TensorBoard: "
                  f"{os.path.join(self.args.out_dir, 'tensorboard')}, checkpoints: {self.save_dir}", flush=True)


def _shutdown(clean: bool) -> None:
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()  # all ranks done before the group goes (avoids a SIGABRT at exit, see FACTS.md)
        dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = parse_args(argv)
        trainer = Trainer(args)
    except (ArgError, ConfigError, DataError, FileNotFoundError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        _shutdown(clean=False)
        return 2
    trainer.train()
    trainer.test()
    trainer.finish()
    _shutdown(clean=True)
    return 0
