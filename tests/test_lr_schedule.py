"""start_lr_schedule (training/lr_schedule.py): the first optimizer step trains at the schedule's first lr
(peak/W with a linear warmup of W steps, the peak without warmup), never at DeepSpeed's initial 0; a resumed
schedule is left where the checkpoint put it."""
import types

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupCosineLR

from vqmoe_ds.training.lr_schedule import start_lr_schedule


def engine_with(warmup_steps, warmup_min_ratio, total=10, peak=1e-2, cos_min_ratio=0.1):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = WarmupCosineLR(opt, total_num_steps=total, warmup_num_steps=warmup_steps,
                           warmup_min_ratio=warmup_min_ratio, cos_min_ratio=cos_min_ratio, warmup_type="linear")
    return types.SimpleNamespace(lr_scheduler=sched, optimizer=opt)


def lrs_used(engine, steps):
    """The lr each of ``steps`` optimizer steps trains at, stepping the schedule after each as DeepSpeed does."""
    used = []
    for _ in range(steps):
        used.append(engine.optimizer.param_groups[0]["lr"])
        engine.lr_scheduler.step()
    return used


def test_deepspeed_alone_trains_the_first_steps_at_zero():
    assert lrs_used(engine_with(4, 0.0), 2) == [0.0, 0.0]  # what start_lr_schedule fixes


def test_warmup_starts_at_peak_over_w_and_ends_at_the_minimum():
    e = engine_with(4, 0.0)
    start_lr_schedule(e)
    used = lrs_used(e, 10)
    assert used[:3] == pytest.approx([1e-2 / 4, 2e-2 / 4, 3e-2 / 4])  # Megatron's s/W x peak
    assert min(used) > 0 and max(used) <= 1e-2
    assert used[-1] == pytest.approx(1e-3)  # cos_min_ratio x peak


def test_no_warmup_starts_at_the_peak():
    e = engine_with(1, 1.0)
    start_lr_schedule(e)
    assert lrs_used(e, 1) == [pytest.approx(1e-2)]


def test_a_started_or_resumed_schedule_is_left_alone():
    e = engine_with(4, 0.0)
    e.lr_scheduler.step(7)  # e.g. loaded from a checkpoint
    start_lr_schedule(e)
    assert e.lr_scheduler.last_batch_iteration == 7
    start_lr_schedule(types.SimpleNamespace(lr_scheduler=None))  # no scheduler: nothing to do
