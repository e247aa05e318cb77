"""The learning-rate schedule built from the flags: linear warmup, then cosine to ``--min-lr``.

It is a torch ``LambdaLR`` handed to ``deepspeed.initialize`` (``lr_scheduler=``, a callable DeepSpeed calls with
the optimizer it built), which steps it after every applied optimizer step and saves and loads its state with
the checkpoint.  ``warmup_cosine(W, T, m)(n)`` is the lr multiplier of the step trained after ``n`` applied steps,
i.e. of step ``s = n + 1``:

* ``s <= W``: ``s / W`` (step 1 trains at peak / W, step W at the peak);
* ``s > W``: ``m + (1 - m) * (1 + cos(pi * (s - W) / (T - W))) / 2``, so step ``T`` and any later one train at
  ``m`` (= min_lr / lr);
* without a warmup ``W`` counts as 1: step 1 trains at the peak.

The multiplier is a closure, so the checkpoint holds only numbers (LambdaLR saves ``None`` for a function) and a
resume re-reads ``W``, ``T`` and ``m`` from the run's settings: a resumed run with a new ``--train-iters``
re-stretches its cosine from the step it is at.  A checkpoint of the earlier flag schedule (DeepSpeed's
``WarmupCosineLR``, whose state is ``{"last_batch_iteration": i}``, started at iteration 1: DeepSpeed 0.19.8
keeps at least 2 warmup steps, so "no warmup" was 2 steps at ratio 1) is read as ``i - 1`` applied steps.

A ``"scheduler"`` block in the ds_config replaces all this (DeepSpeed builds it).  DeepSpeed's own
``WarmupCosineLR`` starts at iteration -1, where it answers lr 0: ``start_lr_schedule`` moves such a block's
schedule to the iteration its first step should use (1 with a warmup, 0 without), so that step 1 never trains
at 0 (measured on a 6-step run with 3 warmup steps and no such start: lrs 0, 0, 1e-3, 2e-3, 2.3e-3, 9.8e-4 for a
peak of 3e-3).
"""
from __future__ import annotations

import math
from typing import Callable

from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(warmup_iters: int, train_iters: int, min_ratio: float) -> Callable[[int], float]:
    """The lr multiplier of the step trained after ``applied`` optimizer steps (see the module doc)."""

    top = max(warmup_iters, 1)  # the step at the peak: the warmup's last, or step 1 without one

    def multiplier(applied: int) -> float:
        s = applied + 1
        if s <= top:
            return s / top
        span = train_iters - top
        progress = min(1.0, (s - top) / span) if span > 0 else 1.0
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


class WarmupCosineSchedule(LambdaLR):
    """``LambdaLR`` over `warmup_cosine`, whose loaded state sets the optimizer's lr at once (a checkpoint loaded
    without its optimizer -- a reshard, a skipped step put back -- trains its next step at the right lr) and which
    reads the earlier ``WarmupCosineLR`` state (see the module doc)."""

    def __init__(self, optimizer, warmup_iters: int, train_iters: int, min_ratio: float):
        super().__init__(optimizer, warmup_cosine(warmup_iters, train_iters, min_ratio))

    def load_state_dict(self, state_dict) -> None:
        if "last_batch_iteration" in state_dict:  # DeepSpeed's WarmupCosineLR of earlier versions, started at 1
            state_dict = {"last_epoch": max(0, int(state_dict["last_batch_iteration"]) - 1)}
        state = {k: v for k, v in state_dict.items() if k != "lr_lambdas"}  # the multiplier: this run's settings
        self.__dict__.update(state)
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def flag_schedule(warmup_iters: int, train_iters: int, min_ratio: float) -> Callable[..., WarmupCosineSchedule]:
    """What ``deepspeed.initialize(lr_scheduler=...)`` takes: the optimizer it builds -> the flags' schedule."""
    return lambda optimizer: WarmupCosineSchedule(optimizer, warmup_iters, train_iters, min_ratio)


def start_lr_schedule(engine) -> None:
    """For a ds_config's own ``WarmupCosineLR``: call once after ``deepspeed.initialize`` and before the first step
    (and before loading a checkpoint); any other schedule is left alone."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    sched = getattr(engine, "lr_scheduler", None)
    if not isinstance(sched, WarmupCosineLR) or sched.last_batch_iteration != -1:
        return
    no_warmup = sched.warmup_num_steps <= 1 and sched.warmup_min_ratio >= 1.0
    sched.step(0 if no_warmup else 1)
