"""The flags' learning-rate schedule (training/lr_schedule.py): a torch LambdaLR that DeepSpeed builds and steps.
References are the documented values worked out by hand for a 4-step warmup, 10 steps and min_lr = 0.1 x peak
(steps 1-4 at 1/4 ... 4/4 of the peak, step 7 half-way down the cosine: 0.1 + 0.9 x 0.5, step 10 at 0.1)."""
import types

import deepspeed
import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupCosineLR

from vqmoe_ds.training.config import flag_lr_schedule, resolve_ds_config
from vqmoe_ds.training.lm import command_line, make_task
from vqmoe_ds.training.lr_schedule import WarmupCosineSchedule, flag_schedule, start_lr_schedule, warmup_cosine

PEAK = 1e-2
BY_HAND = {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0, 7: 0.55, 10: 0.1}  # step -> lr / peak (W 4, T 10, min 0.1)


def _opt(lr=PEAK):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _used(opt, sched, steps):
    """The lr each of ``steps`` optimizer steps trains at, stepping the schedule after each as DeepSpeed does."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_the_documented_values():
    f = warmup_cosine(4, 10, 0.1)
    for step, ratio in BY_HAND.items():
        assert f(step - 1) == pytest.approx(ratio, abs=1e-12), step
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)  # past the horizon: the minimum
    no_warmup = warmup_cosine(0, 10, 0.1)
    assert no_warmup(0) == 1.0  # step 1 at the peak
    assert no_warmup(1) == pytest.approx(0.1 + 0.9 * (1 + 0.9396926207859084) / 2)  # step 2: cos(pi/9)
    assert no_warmup(9) == pytest.approx(0.1)


def test_the_flags_resolve_to_the_schedule(tmp_path):
    task = make_task(command_line().parse(["--train-iters", "10", "--lr-warmup-iters", "4", "--lr", "2e-3"]))
    ds = resolve_ds_config(task.optim, task.parallel, world_size=1, on_cpu=True)
    assert "scheduler" not in ds and flag_lr_schedule(task.optim, ds) == (4, 10, pytest.approx(0.1))
    (tmp_path / "ds.json").write_text('{"scheduler": {"type": "WarmupLR", "params": {}}}')
    task = make_task(command_line().parse(["--deepspeed_config", str(tmp_path / "ds.json")]))
    ds = resolve_ds_config(task.optim, task.parallel, world_size=1, on_cpu=True)
    assert flag_lr_schedule(task.optim, ds) is None and ds["scheduler"]["type"] == "WarmupLR"


def test_deepspeed_builds_and_steps_it():
    model = torch.nn.Linear(3, 1)
    ds = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam", "params": {"lr": PEAK, "torch_adam": True}},
          "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds,
                                      lr_scheduler=flag_schedule(4, 10, 0.1))
    assert isinstance(engine.lr_scheduler, WarmupCosineSchedule)
    used = []
    for _ in range(10):
        used.append(engine.get_lr()[0])
        engine.backward(engine(torch.ones(1, 3)).sum())
        engine.step()
    assert [used[s - 1] / PEAK for s in BY_HAND] == pytest.approx(list(BY_HAND.values()))


def test_state_holds_numbers_only_and_a_resume_takes_the_new_horizon():
    opt = _opt()
    sched = WarmupCosineSchedule(opt, 4, 10, 0.1)
    _used(opt, sched, 6)
    state = sched.state_dict()
    assert state["last_epoch"] == 6 and state["lr_lambdas"] == [None]
    opt2 = _opt()
    longer = WarmupCosineSchedule(opt2, 4, 16, 0.1)  # resumed with --train-iters 16
    longer.load_state_dict(state)
    # step 7 of 16 at once (no step at the old horizon's lr): 0.1 + 0.9 x (1 + cos(pi x 3/12)) / 2
    assert opt2.param_groups[0]["lr"] == pytest.approx(PEAK * (0.1 + 0.9 * (1 + 0.7071067811865476) / 2))
    assert _used(opt2, longer, 10)[-1] == pytest.approx(PEAK * 0.1)  # step 16 at the minimum


def test_a_checkpoint_of_deepspeeds_warmup_cosine_lr_resumes_at_its_step():
    """A checkpoint holding the state of DeepSpeed's WarmupCosineLR started at iteration 1: after 6 steps its state
    is {"last_batch_iteration": 7}; read here as 6 applied steps, step 7 trains at 0.55 of the peak."""
    opt = _opt()
    sched = WarmupCosineSchedule(opt, 4, 10, 0.1)
    sched.load_state_dict({"last_batch_iteration": 7})
    assert sched.last_epoch == 6 and opt.param_groups[0]["lr"] == pytest.approx(0.55 * PEAK)


def test_a_config_warmup_cosine_lr_starts_at_its_first_step_not_zero():
    def engine_with(warmup_steps, warmup_min_ratio):
        opt = _opt()
        sched = WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=warmup_steps,
                               warmup_min_ratio=warmup_min_ratio, cos_min_ratio=0.1, warmup_type="linear")
        return types.SimpleNamespace(lr_scheduler=sched, optimizer=opt)

    e = engine_with(4, 0.0)
    assert _used(e.optimizer, e.lr_scheduler, 2) == [0.0, 0.0]  # DeepSpeed alone: what start_lr_schedule fixes
    e = engine_with(4, 0.0)
    start_lr_schedule(e)
    assert _used(e.optimizer, e.lr_scheduler, 3) == pytest.approx([PEAK / 4, 2 * PEAK / 4, 3 * PEAK / 4])
    e = engine_with(1, 1.0)
    start_lr_schedule(e)
    assert _used(e.optimizer, e.lr_scheduler, 1) == [pytest.approx(PEAK)]
    e = engine_with(4, 0.0)
    e.lr_scheduler.step(7)  # e.g. loaded from a checkpoint: left alone
    start_lr_schedule(e)
    assert e.lr_scheduler.last_batch_iteration == 7
    start_lr_schedule(types.SimpleNamespace(lr_scheduler=WarmupCosineSchedule(_opt(), 4, 10, 0.1)))  # not its kind
