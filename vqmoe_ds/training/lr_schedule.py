"""The first optimizer step trains at the schedule's first learning rate, not at 0.

DeepSpeed builds its ``WarmupCosineLR`` at iteration -1, where it answers lr 0 (with the warning "Attempting to
get learning rate from scheduler before it has started"), and steps it after every optimizer step.  Left so,
step 1 trains at lr 0, step 2 at the ratio of iteration 0 (again 0 with a linear warmup from 0), and step s at
iteration s - 2: measured on a 6-step run with 3 warmup steps, the lrs used were 0, 0, 1e-3, 2e-3, 2.3e-3,
9.8e-4 for a peak of 3e-3.  ``start_lr_schedule`` moves a fresh schedule to the iteration its first step
should use before that step: with a warmup, iteration 1, so step s trains at s/W of the peak (Megatron's linear
warmup) and the last step at the minimum; without one (warmup ratio 1), iteration 0, so step 1 trains at the
peak.  A resumed run loads the checkpoint's iteration over this.
"""
from __future__ import annotations


def start_lr_schedule(engine) -> None:
    """Call once after ``deepspeed.initialize`` and before the first step (and before loading a checkpoint)."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    sched = getattr(engine, "lr_scheduler", None)
    if not isinstance(sched, WarmupCosineLR) or sched.last_batch_iteration != -1:
        return
    no_warmup = sched.warmup_num_steps <= 1 and sched.warmup_min_ratio >= 1.0
    sched.step(0 if no_warmup else 1)
