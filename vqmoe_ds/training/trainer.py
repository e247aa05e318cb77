"""The pretraining driver behind ``pretrain_vqmoe.py``: flags -> checks -> DeepSpeed engine -> train loop
with validation, best-checkpoint tracking, final test, logs and plots.

One optimizer step = ``gradient_accumulation_steps`` micro-batches through ``engine.backward``/``engine.step``
(the engine steps the optimizer and the scheduler at the accumulation boundary); scheduled routers get
``set_step(model, step)`` once per optimizer step.  The loss that is back-propagated is the task NLL plus the
MoE layers' auxiliary losses (balance, VQ, distillation); the logged ``loss`` is the task NLL alone.
"""
from __future__ import annotations

import datetime
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
from ..parallel import init_distributed, shutdown
from ..routers import set_step
from . import checkpoint as ckpt
from .arguments import ArgError, check_save_dir, check_world, model_config, parse_args, resolve_ds_config
from .data import TrainBatches, eval_batches, eval_sizes_ok, load_corpus
from .lr_schedule import start_lr_schedule
from .metrics import NLLMeter
from .preemption import StopRequest, any_rank
from .run_log import RunLog, gather_moe_stats


class Trainer:
    def __init__(self, args):
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        self.args = args
        init_distributed(auto_mpi_discovery=True, distributed_port=args.distributed_port,
                                   timeout=datetime.timedelta(minutes=args.dist_timeout_minutes))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        _announce(self.rank)
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
        self.save_dir = args.save or os.path.join(args.out_dir, "checkpoints")
        check_save_dir(self.save_dir, self.rank)
        self.resume_tag = None
        if args.load:  # the checkpoint is complete and fits this run, checked before the model exists
            self.resume_tag = ckpt.resolve_tag(args.load)
            marker = ckpt.verify(args.load, self.resume_tag)
            where = f"checkpoint {os.path.join(args.load, self.resume_tag)}"
            if marker.get("world_size", self.world) != self.world:
                raise ArgError(f"{where} was made with {marker['world_size']} ranks, this run has {self.world}: "
                               f"resume with the same number of ranks (or tools/reshard_checkpoint.py)")
            ckpt.check_architecture(marker.get("model_config"), cfg.to_dict(), where)
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
        start_lr_schedule(self.engine)  # step 1 at the schedule's first lr, not 0 (see lr_schedule.py)
        self.flops_per_token = flops_per_token(cfg)
        self.step, self.best_valid, self.mems = 0, math.inf, None
        self.skipped_total, self.skipped_in_row, self.stop = 0, 0, StopRequest()
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
                "world_size": self.world, "model_config": self.cfg.to_dict(), "skipped_total": self.skipped_total,
                "tokenizer": self.corpus.tokenizer_state()}

    def _resume(self, load_dir):
        client, mems = ckpt.load(self.engine, load_dir, tag=self.resume_tag, resume=True, model=self.model,
                                 model_config=self.cfg.to_dict())
        if client.get("world_size", self.world) != self.world:
            raise ArgError(f"the checkpoint in {load_dir} was made with {client['world_size']} ranks, this run has "
                           f"{self.world}: resume with the same number of ranks")
        self.step = int(client["step"])
        self.best_valid = float(client.get("best_valid", math.inf))
        self.skipped_total = int(client.get("skipped_total", 0))
        self.train_batches.load_state_dict(client["data"])
        self.mems = [m.to(self.device) for m in mems] if mems else None

    def save(self, tag, latest=True):
        return ckpt.save(self.engine, self.save_dir, tag, self._client_state(), self.mems, latest=latest,
                         keep_last=self.args.keep_last, model=self.model, step=self.step)

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
        if math.isfinite(res["loss"]) and res["loss"] < self.best_valid:  # never a NaN model as best
            self.best_valid = res["loss"]
            self.save(ckpt.BEST, latest=False)
        return res

    # ---- training ---------------------------------------------------------------------------------------
    def train_step(self):
        """One optimizer step.  A non-finite loss on any rank (all ranks agree through an all-reduce) skips
        it: the step's gradients are made NaN everywhere, which ZeRO 1/2 treat as an overflow (no optimizer
        or scheduler step, gradients cleared); at ZeRO 0 ``_skip_step_zero0`` does the same by hand.
        Buffers the forward passes changed (router step, VQ EMA) are put back.  Returns
        (loss, aux, tokens, skipped)."""
        if ckpt.fault("exit", self.step + 1):  # the tests' dying rank
            os._exit(1)
        set_step(self.model, self.step)
        buffers = ckpt.module_buffers(self.model)
        mems_before = self.mems
        losses, auxes, bad = [], [], False
        for i in range(self.accum):
            x, y = next(self.train_batches)
            if self.train_batches.new_epoch:
                self.mems = None
            _, loss, aux, self.mems = self.engine(x.to(self.device), y.to(self.device), self.mems)
            if ckpt.fault("nan", self.step + 1):  # the tests' non-finite loss
                loss = loss * float("nan")
            total = loss + aux
            bad = any_rank(bad or not bool(torch.isfinite(total.detach()).all()), self.world)
            if bad:
                total = total * float("nan")  # NaN gradients on every rank: the whole step is dropped
            self.engine.backward(total)
            if bad and i == self.accum - 1 and not self.engine.zero_optimization():
                self._skip_step_zero0()
            else:
                self.engine.step()
            losses.append(loss.item())
            auxes.append(aux.item())
            tokens = x.numel()
        if bad:
            if self.engine.zero_optimization() and getattr(self.engine, "_step_applied", False):
                raise TrainingStopped("DeepSpeed applied an optimizer step with non-finite gradients (bf16 without "
                                      "overflow checks): set bf16.check_grad_overflow true in the ds_config")
            with torch.no_grad():
                for name, b in self.model.named_buffers():
                    b.copy_(buffers[name].to(b.device))
            self.mems = mems_before
        self.step += 1
        return sum(losses) / len(losses), sum(auxes) / len(auxes), tokens * self.accum * self.world, bad

    def _skip_step_zero0(self) -> None:
        """ZeRO 0 has no overflow check, so skip the boundary step the way ZeRO 1/2 skip an overflow: the engine
        closes the step (clipping, zeroing, counters) around an optimizer step that does nothing, then the LR
        schedule is put back and the step counted as skipped.  The gradients are zeroed, not dropped:
        DeepSpeed's clipping fails on a model without any gradient."""
        opt, sched = self.engine.optimizer, self.engine.lr_scheduler
        opt.zero_grad(set_to_none=False)
        lrs = [g["lr"] for g in opt.param_groups]
        sched_state = sched.state_dict() if sched is not None else None
        own_step = opt.__dict__.get("step")
        opt.step = lambda *a, **k: None  # Adam's moments and step count stay as they were
        try:
            self.engine.step()
        finally:
            if own_step is None:
                del opt.step
            else:
                opt.step = own_step
        if sched is not None:
            sched.load_state_dict(sched_state)
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        self.engine.skipped_steps += 1

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
            loss, aux, tokens, skipped = self.train_step()
            dt = time.perf_counter() - t0
            if skipped:
                self.skipped_total += 1
                self.skipped_in_row += 1
                self.log.write({"kind": "skip", "step": self.step, "skipped_total": self.skipped_total,
                                "skipped_in_row": self.skipped_in_row})
                self.log.info(f"step {self.step}: non-finite loss, step skipped "
                              f"({self.skipped_in_row} in a row, {self.skipped_total} in all)")
                if self.skipped_in_row >= args.max_skipped_steps:
                    raise TrainingStopped(
                        f"{self.skipped_in_row} steps in a row (up to step {self.step}) had a non-finite loss, "
                        f"--max-skipped-steps {args.max_skipped_steps}: lower --lr or check the data, then resume "
                        f"from the last checkpoint in {self.save_dir}")
                if self.stop.agreed(self.world):
                    return self._stop_on_signal()
                continue
            self.skipped_in_row = 0
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
            if self.stop.agreed(self.world):
                return self._stop_on_signal()
        self.save(f"step{self.step}")
        return True

    def _stop_on_signal(self) -> bool:
        """SIGTERM/SIGINT on any rank: the current step is done; save it and stop (exit 0)."""
        path = self.save(f"step{self.step}")
        self.log.info(f"stopped by {self.stop.describe()} after step {self.step}; "
                      f"saved {path}: resume with --load {self.save_dir}")
        return False

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
        from .plots import make_plots

        self.log.finish(self.save_dir, None if self.args.no_plots else make_plots)



class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); one line naming problem and fix."""


def _announce(rank: int) -> None:
    """Mark this rank alive in the rendezvous store, so that survivors can name a rank that died."""
    try:
        dist.distributed_c10d._get_default_store().set(f"vqmoe/alive/{rank}", str(os.getpid()))
    except Exception:  # a backend without a store (MPI): dead ranks are then not named
        pass


def dead_ranks(rank: int, world: int, wait_s: float = 5.0) -> Optional[List[int]]:
    """After a failed collective: every survivor writes ``vqmoe/failed/{rank}`` and waits ``wait_s`` for the
    others; the ranks that never write are the dead ones.  None when the store is gone (it lives with rank 0
    or the launcher's agent)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"vqmoe/failed/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world) if not store.check([f"vqmoe/failed/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except Exception:
        return None


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = parse_args(argv)
        trainer = Trainer(args)
    except (ArgError, ConfigError, DataError, FileNotFoundError, ckpt.CheckpointError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        shutdown(clean=False)
        return 2
    trainer.stop.install()
    try:
        finished = trainer.train()
    except TrainingStopped as e:
        if trainer.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        trainer.log.close()
        shutdown(clean=True)
        return 3
    except RuntimeError as e:  # a collective failed: a rank died or hung past --dist-timeout-minutes
        dead = dead_ranks(trainer.rank, trainer.world)
        who = (f"rank(s) {', '.join(map(str, dead))} stopped" if dead else
               "rank 0 or the launcher (it holds the rendezvous store) stopped" if dead is None else
               "a collective failed")
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"error: rank {trainer.rank}: {who} responding during step {trainer.step + 1} ({first}): see that "
              f"rank's log, then resume with --load {trainer.save_dir}", file=sys.stderr, flush=True)
        os._exit(4)  # the process group is broken: destroying it could hang
    if finished:
        trainer.test()
    trainer.finish()
    shutdown(clean=True)
    return 0
