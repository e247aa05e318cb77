"""The one training loop of every driver: language modelling, image classification and text classification
differ only in a small `Task`; everything else is here.

    flags / config file -> checks -> task.load() (data, model config: no process group yet)
        -> process group -> task.shard() -> DeepSpeed engine -> [resume] -> steps -> test -> results, plots

One optimizer step = ``gradient_accumulation_steps`` micro-batches through ``engine.backward``/``engine.step`` (the
engine steps the optimizer and the scheduler at the accumulation boundary); scheduled routers get
``set_step(model, step)`` once per optimizer step.  The loss that is back-propagated is the task loss plus the MoE
layers' auxiliary losses (balance, VQ, distillation); the logged ``loss`` is the task loss alone.

The loop owns: the engine step and gradient accumulation, skipping non-finite steps, the LR schedule's start,
evaluation at intervals and the best checkpoint, pre-emption (SIGTERM/SIGINT: save the step, exit 0), resume,
the progress bar, JSONL/TensorBoard logs, the test on the best checkpoint, ``results.json`` and the plots.
"""
from __future__ import annotations

import abc
import datetime
import errno
import json
import math
import os
import random
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from ..cli import CommandLine, Parsed
from ..data import DataError
from ..errors import ConfigError
from ..moe.config import MoEConfig
from ..parallel import (announce_alive, any_rank, barrier, collective_failure, dead_ranks, init_distributed,
                        max_over_ranks, max_value, reduce_values, shutdown)
from ..quiet import engine_start
from ..routers import set_step, update_expert_biases
from .config import (OptimConfig, ParallelConfig, RunConfig, check_save_dir, check_world, flag_lr_schedule,
                     load_ds_config, resolve_ds_config)
from .lr_schedule import flag_schedule, start_lr_schedule
from .preemption import StopRequest
from .run_lock import RunLock, RunLockError
from .run_log import (RoutingHealth, RunLog, complete_config, finite_json, gather_moe_stats, layer_stats,
                      moe_summary)

# Bad input of any kind: one line, exit status 2, before any training step.
INPUT_ERRORS = (ConfigError, DataError, FileNotFoundError, ckpt.CheckpointError)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); one line naming problem and fix."""


class WriteFailed(TrainingStopped):
    """A file of the run could not be written on some rank (a full disk, no permission); every rank raises it."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


class Task(abc.ABC):
    """What differs between drivers.  The loop calls, in this order: ``load`` (before the process group: read
    data, build and check ``model_config``), ``shard`` (this rank's batches), ``build_model``, ``after_engine``
    (e.g. load pretrained weights), then ``micro_step`` per micro-batch and ``evaluate`` per evaluation."""

    metric: str = "loss"  # the validation metric that picks the best checkpoint
    higher_is_better: bool = False
    unit: str = "samples"  # what ``micro_step``'s extras count for the throughput (``{unit}_per_s``)
    default_micro_batch: int = 8
    section: Tuple[str, type] = ("data", object)  # the task's own command-line section and its config class
    model_config: Any = None  # has ``to_dict()``, ``ep_size`` and ``moe``; set by ``load``
    batches: Any = None  # this rank's training batches (``next``, ``state_dict``); set by ``shard``

    def __init__(self, parsed: Parsed, optim: OptimConfig, run: RunConfig, parallel: ParallelConfig, data: Any):
        self.parsed, self.optim, self.run, self.parallel, self.data = parsed, optim, run, parallel, data
        self.rank, self.world, self.device = 0, 1, torch.device("cpu")

    @classmethod
    def from_parsed(cls, parsed: Parsed) -> "Task":
        """The task with every section of the command line built and checked (no data read yet)."""
        name, config_cls = cls.section
        return cls(parsed, parsed.build("optim", OptimConfig), parsed.build("run", RunConfig),
                   parsed.build("parallel", ParallelConfig), parsed.build(name, config_cls))

    # ---- set-up --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self) -> None:
        """Read the data (or its metadata) and set ``model_config``: errors need no ranks."""

    @property
    def ep_size(self) -> int:
        return int(self.model_config.ep_size)

    @property
    def is_moe(self) -> bool:
        return bool(self.model_config.is_moe)

    @abc.abstractmethod
    def shard(self, micro_batch: int, eval_batch: int) -> None:
        """This rank's training batches (``self.rank``, ``self.world``, ``self.device`` are set)."""

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The model (``deepspeed.initialize`` moves it to the device)."""

    def after_engine(self, engine, model, resuming: bool) -> None:
        """After ``deepspeed.initialize`` and before any step (and before a resume loads its checkpoint)."""

    def check_checkpoint(self, marker: Dict[str, Any], where: str) -> None:
        """Refuse (one-line ``CheckpointError``) a checkpoint to resume whose task settings differ from this run's."""

    # ---- training ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def micro_step(self, engine) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, float]]:
        """One micro-batch forward: (task loss, weighted auxiliary loss, extras summed into the log window; one of
        them counts ``unit``)."""

    def router_step(self, step: int) -> int:
        """The step scheduled routers (SMoE-Dropout's k, StableMoE's stage) see for the loop's ``step``."""
        return step

    def begin_step(self) -> None:
        """Before an optimizer step's first micro-batch (remember what a skipped step must put back)."""

    def undo_step(self) -> None:
        """The step was skipped: put back what its micro-batches changed beyond module buffers."""

    def train_record(self, sums: Dict[str, float]) -> Dict[str, Any]:
        """Extra fields of a training log record from the window's extras summed over ranks."""
        return {}

    # ---- evaluation ----------------------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        return True

    @abc.abstractmethod
    def evaluate(self, engine, split: str, max_batches: int) -> Dict[str, Any]:
        """Collective: every rank calls it; the result is the same everywhere and holds ``self.metric``."""

    def describe_eval(self, split: str, res: Dict[str, Any]) -> str:
        return f"{self.metric} {res[self.metric]:.4f}"

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Saved in the checkpoint's client state (the data position, the same on every rank's copy)."""
        return self.batches.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.batches.load_state_dict(state)

    def rank_state(self) -> Optional[Dict[str, Any]]:
        """This rank's own state (e.g. the Transformer-XL memory), saved per rank."""
        return None

    def load_rank_state(self, state: Optional[Dict[str, Any]]) -> None:
        pass

    def client_state(self) -> Dict[str, Any]:
        """Extra client-state fields every checkpoint of this task records (e.g. its tokenizer)."""
        return {}

    # ---- reports -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def config_objects(self) -> Dict[str, Any]:
        """The resolved object (or dict) of every command-line section, written to ``OUT_DIR/config.json`` and
        into every checkpoint's marker."""

    def describe(self) -> str:
        return ""

    def run_info(self) -> Dict[str, Any]:
        """What ``OUT_DIR/run_info.json`` records beside the world size (parameter counts, data statistics)."""
        return {}

    def results(self) -> Dict[str, Any]:
        """Extra fields of ``results.json``."""
        return {}

    def stats_layers(self, model) -> Optional[List[Any]]:
        """The modules whose ``stats()`` the log gathers (default: the model's MoE layers)."""
        return None

    def plots(self, out_dir: str) -> List[str]:
        from .plots import make_plots

        return make_plots(out_dir)


def agreed_io(fn) -> Any:
    """Run ``fn`` (file writes, on some ranks) on every rank; an ``OSError`` on any rank (a full disk, no
    permission) is raised on every rank -- the rank's own, or one with the same errno naming the other rank -- so
    that no rank goes on into a collective its peers left."""
    code, error, out = 0, None, None
    try:
        out = fn()
    except OSError as e:
        code, error = e.errno or errno.EIO, e
    code = int(max_value(code))
    if code:
        raise WriteFailed(error or OSError(code, f"{os.strerror(code)} (on another rank, which names the file)"))
    return out


def out_of_space(e: BaseException) -> bool:
    """A write failed because the disk (or the user's quota) is full: OSError ENOSPC/EDQUOT, or torch.save's
    RuntimeError around one."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and ("No space left" in str(e) or "file write failed" in str(e))


class Trainer:
    """The loop around one `Task`."""

    def __init__(self, task: Task, cmd: CommandLine):
        from deepspeed.accelerator import get_accelerator

        self.task, self.cmd = task, cmd
        optim, run, par = task.optim, task.run, task.parallel
        self.optim, self.run = optim, run
        run.check_fresh()  # never write over an earlier run by accident
        task.load()  # data and the model config: errors need no ranks
        init_distributed(auto_mpi_discovery=True, distributed_port=par.distributed_port,
                         timeout=datetime.timedelta(minutes=par.dist_timeout_minutes))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        announce_alive(self.rank)
        self.device = torch.device(get_accelerator().current_device_name())  # LOCAL_RANK's (bind_local_device)
        on_cpu = get_accelerator().device_name() == "cpu"
        task.rank, task.world, task.device = self.rank, self.world, self.device
        self.lock = self._take_lock(run.out_dir)  # one run per --out-dir, before anything in it is written
        try:
            self._build(on_cpu)
        except BaseException:
            self.release_lock()
            raise

    def _take_lock(self, out_dir: str) -> Optional[RunLock]:
        """Rank 0 holds ``OUT_DIR/.lock`` for the run's life; every rank learns whether it got it."""
        refused = []

        def take():
            if self.rank == 0:
                try:
                    return RunLock(out_dir).acquire()
                except RunLockError as e:
                    refused.append(e)
            return None

        lock = agreed_io(take)  # a folder that cannot be written: every rank stops
        error = refused[0] if refused else None
        if any_rank(error is not None):
            raise error or RunLockError(f"{out_dir} is in use by another run (rank 0 names it): wait for it to end "
                                        f"or give another --out-dir")
        if lock is not None and lock.taken_over:
            print(f"notice: {lock.path} was left by a run that is no longer running ({lock.taken_over}): this run "
                  f"takes it over", flush=True)
        return lock

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _build(self, on_cpu: bool) -> None:
        """Checks, data shards, model, engine and resume (everything after the lock)."""
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        task, optim, run, par = self.task, self.optim, self.run, self.task.parallel
        # ---- checks, all before the model exists -------------------------------------------------------
        check_world(task.ep_size, task.is_moe, self.world)
        self.ds_config = resolve_ds_config(optim, par, self.world, on_cpu, task.default_micro_batch,
                                           out_dir=run.out_dir)
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accum = self.ds_config["gradient_accumulation_steps"]
        task.shard(self.micro, run.eval_batch_size or self.micro)
        self.save_dir = run.save_dir
        if self.rank == 0:
            run.clear_previous()  # --overwrite
        barrier()
        agreed_io(lambda: check_save_dir(self.save_dir, self.rank))
        self.resume_dir = self.resume_tag = None
        if run.load:  # the checkpoint is complete and fits this run, checked before the model exists
            self.resume_dir, self.resume_tag = ckpt.resolve(run.load)  # OUT_DIR, its save folder or a tag folder
            marker = ckpt.verify(self.resume_dir, self.resume_tag, checksums=False)
            where = f"checkpoint {os.path.join(self.resume_dir, self.resume_tag)}"
            damaged = None
            try:  # each rank reads its share of the files for their checksums
                ckpt.verify_checksums(self.resume_dir, self.resume_tag, marker, (self.rank, self.world))
                ckpt.check_files(self.resume_dir, self.resume_tag, marker, (self.rank, self.world))  # no code in them
            except ckpt.CheckpointError as e:
                damaged = e
            if any_rank(damaged is not None):
                raise damaged or ckpt.CheckpointError(f"{where}: a file failed its checks on another rank (that "
                                                      f"rank names it): load the last good checkpoint")
            if marker.get("world_size", self.world) != self.world:
                raise ConfigError(f"{where} was made with {marker['world_size']} ranks, this run has {self.world}: "
                               f"resume with the same number of ranks (or tools/reshard_checkpoint.py)")
            task.check_checkpoint(marker, where)  # first: the task names its own settings (e.g. --mode)
            ckpt.check_architecture(marker.get("model_config"), task.model_config.to_dict(), where)
            self._check_resume(marker, where)
        self._check_horizon()
        # ---- model and engine ---------------------------------------------------------------------------
        random.seed(optim.seed)
        np.random.seed(optim.seed)
        torch.manual_seed(optim.seed)  # the same on every rank: identical dense weights, experts by global id
        model = task.build_model()
        scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
        if scalars:  # DeepSpeedEngine._broadcast_model does p.data.view(torch.uint8), at any world size
            raise ConfigError(f"parameter {scalars[0]} is 0-dimensional, which DeepSpeed's initial broadcast cannot "
                           f"send (engine._broadcast_model views it as bytes): give it shape [1] in its module")
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"})
        with engine_start():  # DeepSpeed's known set-up messages stay out of the run's output (vqmoe_ds/quiet.py)
            schedule = flag_lr_schedule(optim, self.ds_config)  # None: the ds_config's scheduler block
            self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=self.ds_config,
                                                        lr_scheduler=flag_schedule(*schedule) if schedule else None)
        self.model = model
        task.after_engine(self.engine, model, resuming=bool(run.load))
        torch.manual_seed(optim.seed + 1 + self.rank)  # dropout, jitter, augmentation: different per rank
        start_lr_schedule(self.engine)  # a ds_config's WarmupCosineLR: step 1 at its first lr, not 0 (lr_schedule.py)
        self.step, self.skipped_total, self.skipped_in_row = 0, 0, 0
        self.doing = "starting"  # what the loop is doing, for messages: "training step 7", "saving step 6", ...
        self.best = -math.inf if task.higher_is_better else math.inf
        self.best_valid: Optional[Dict[str, Any]] = None  # the validation results of the best step
        self.stop = StopRequest()
        self.resumed: Optional[Dict[str, Any]] = None  # a resume's record (what it changed), for config.json
        self.health = RoutingHealth()  # experts and codes used over each logging window
        if run.load:
            self._resume(self.resume_dir)

        def open_run_files():  # rank 0 writes them; every rank learns whether that worked (a full disk: exit 3)
            self.log = RunLog(run.out_dir, self.rank, optim.train_iters, self.step, progress=run.progress,
                              monitor=self.engine.monitor, monitor_note=_monitor_note(self.ds_config),
                              per_layer=run.moe_per_layer_logging)
            self.log.info(f"{task.describe()}; {self.world} rank(s), ep {task.ep_size}, "
                          f"ZeRO {self.ds_config.get('zero_optimization', {}).get('stage', 0)}, "
                          f"batch {self.micro} x {self.accum} x {self.world}")
            if self.rank == 0:
                os.makedirs(run.out_dir, exist_ok=True)
                self._write_config()
                with open(os.path.join(run.out_dir, "ds_config.json"), "w") as f:
                    json.dump(self.ds_config, f, indent=1)
                with open(os.path.join(run.out_dir, "run_info.json"), "w") as f:
                    json.dump({"world_size": self.world, **task.run_info()}, f, indent=1, default=str)

        agreed_io(open_run_files)

    def _check_resume(self, marker: Dict[str, Any], where: str) -> None:
        """A checkpoint to resume must lie within --train-iters and match the ZeRO stage of this run's ds_config
        (a partitioned optimizer state loads only into a partitioned optimizer, and back)."""
        saved, total = marker.get("step"), self.optim.train_iters
        if isinstance(saved, int) and not marker.get("imported"):
            if saved > total:
                raise ConfigError(f"{where} is at step {saved}, beyond --train-iters {total}: give --train-iters "
                               f"{saved} or more (it counts from step 0, not from the resumed step)")
            if saved == total and self.rank == 0:
                print(f"notice: {where} is at --train-iters {total} already: no step to train, the test runs on it",
                      flush=True)
        if marker.get("imported") or marker.get("resharded"):
            return  # weights only: the optimizer starts fresh whatever the stage
        # DeepSpeed writes the optimizer in per-rank partition files at ZeRO 1/2 and with bf16 (prefixed bf16_),
        # else inside the model states: the two layouts do not load into each other
        names = [n for n in marker.get("files", {}) if ckpt.ZERO_OPTIM_FILE.match(n)]
        saved_as = ("bf16" if any(n.startswith("bf16_") for n in names) else "ZeRO 1/2" if names else "ZeRO 0 fp32")
        stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        bf16 = bool(self.ds_config.get("bf16", {}).get("enabled", False))
        runs_as = "bf16" if bf16 else "ZeRO 1/2" if stage > 0 else "ZeRO 0 fp32"
        if saved_as != runs_as:
            raise ConfigError(f"{where} holds the optimizer state of a {saved_as} run (its files say so), this run's "
                           f"ds_config is {runs_as} (stage {stage}, bf16 {'on' if bf16 else 'off'}): resume with the "
                           f"ds_config of the run that saved it (its OUT_DIR/ds_config.json)")

    def _check_horizon(self) -> None:
        """Settings that only act after a number of steps must act within --train-iters."""
        moe, total = self.task.model_config.moe, self.optim.train_iters
        given = moe.settings() if isinstance(moe, MoEConfig) else moe or {}  # a ViTConfig's moe is a dict of them
        warmup = int(given.get("cluster_warmup_steps", 0) or 0)  # a warm-up that was given (not the default)
        last = self.task.router_step(total)  # the routers' schedule step at the end of this run (fine-tuning
        if given.get("router") == "cluster" and warmup >= last:  # continues the pretraining run's schedule)
            raise ConfigError(f"--cluster-warmup-steps {warmup} is not below --train-iters {total}: the clustering "
                              f"router would never fit its centroids in this run; give a warm-up below {last}")

    def resolved_config(self) -> Dict[str, Any]:
        """The configuration as the run uses it (`run_log.complete_config`): ``--config-file`` of it repeats the run."""
        return complete_config(self.cmd.resolved(self.task.parsed.preset, self.task.config_objects()), self.cmd,
                               self.ds_config, self.task.parallel.deepspeed_config)

    def _write_config(self) -> None:
        """OUT_DIR/config.json (rank 0): written when a run starts (also from an imported or converted checkpoint);
        a resume leaves it as it is and appends what it changed to its ``resumes`` record, and --eval-only leaves
        an existing one alone."""
        path = os.path.join(self.run.out_dir, "config.json")
        keep = (self.resumed is not None or self.run.eval_only) and os.path.isfile(path)
        if keep:
            with open(path) as f:
                cfg = json.load(f)
            if self.resumed is not None:
                cfg.setdefault("resumes", []).append(self.resumed)
        else:
            cfg = self.resolved_config()
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(finite_json(cfg), f, indent=1, default=str)
        os.replace(tmp, path)

    def _resume_record(self, load_dir: str, marker: Dict[str, Any]) -> Dict[str, Any]:
        """What a resume changed against the run it continues (its config.json, else the checkpoint's copy), as the
        ``resumes`` record and one line on rank 0."""
        from .run_log import config_changes

        path = os.path.join(self.run.out_dir, "config.json")
        before = marker.get("config") or {}
        if os.path.isfile(path):
            with open(path) as f:
                before = json.load(f)
        changed = config_changes(before, self.resolved_config())
        where = os.path.join(load_dir, self.resume_tag)
        words = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) or "nothing"
        horizon = changed.get("optim.train_iters")
        if horizon and "scheduler" not in load_ds_config(self.task.parallel.deepspeed_config):
            words += (f" (the lr schedule is re-stretched: its cosine now ends at step {horizon[1]} instead of "
                      f"{horizon[0]})")
        if self.rank == 0:
            print(f"resumed from step {self.step} of {where}; changed: {words}", flush=True)
        return {"step": self.step, "checkpoint": where, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                "changed": {k: list(v) for k, v in changed.items()}}

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _client_state(self) -> Dict[str, Any]:
        return {"step": self.step, "data": self.task.state_dict(), "best_valid": self.best, "best_valid_results": self.best_valid, "metric": self.task.metric,
                "world_size": self.world, "model_config": self.task.model_config.to_dict(),
                "skipped_total": self.skipped_total, **self.task.client_state()}

    def _resume(self, load_dir: str) -> None:
        client, task_state = ckpt.load(self.engine, load_dir, tag=self.resume_tag, resume=True, model=self.model,
                                       model_config=self.task.model_config.to_dict())
        self.step = int(client["step"])
        self.best = float(client.get("best_valid", self.best))
        self.best_valid = client.get("best_valid_results")
        self.skipped_total = int(client.get("skipped_total", 0))
        if client.get("data") is not None:  # an imported checkpoint has no data position: the data starts fresh
            self.task.load_state_dict(client["data"])
        self.task.load_rank_state(task_state)
        marker = ckpt.verify(load_dir, self.resume_tag, checksums=False)
        if not marker.get("imported"):  # a start from imported or converted weights is no resume
            self.resumed = self._resume_record(load_dir, marker)

    def save(self, tag: str, latest: bool = True) -> str:
        self.doing = f"saving step {self.step}"
        return ckpt.save(self.engine, self.save_dir, tag, self._client_state(), self.task.rank_state(), latest=latest,
                         keep_last=self.run.keep_last, model=self.model, step=self.step, config=self.resolved_config())

    # ---- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, split: str, max_batches: int) -> Dict[str, Any]:
        self.engine.eval()
        try:
            with torch.no_grad():
                return self.task.evaluate(self.engine, split, max_batches)
        finally:
            self.engine.train()

    def validate(self) -> Optional[Dict[str, Any]]:
        if not self.task.has_split("valid"):
            return None
        self.doing = f"validating after step {self.step}"
        res = self.evaluate("valid", self.run.eval_iters)
        self.log.write({"kind": "valid", "step": self.step, **res})
        self.log.info(f"step {self.step}: valid {self.task.describe_eval('valid', res)}")
        value = res[self.task.metric]
        better = value > self.best if self.task.higher_is_better else value < self.best
        if math.isfinite(value) and better:  # never a NaN model as best
            self.best = value
            self.best_valid = {**res, "step": self.step}  # every metric at the best step, for results.json
            self.save(ckpt.BEST, latest=False)
        return res

    def test(self) -> Optional[Dict[str, Any]]:
        self.doing = "testing"
        on_best = os.path.isdir(os.path.join(self.save_dir, ckpt.BEST))
        if on_best:
            ckpt.load(self.engine, self.save_dir, tag=ckpt.BEST, resume=False)
        res = None
        if self.task.has_split("test"):
            res = self.evaluate("test", self.run.test_iters)
            res["checkpoint"] = "best" if on_best else "final"
            self.log.write({"kind": "test", "step": self.step, **res})
            self.log.info(f"test ({'best-validation' if on_best else 'final'} checkpoint): "
                          f"{self.task.describe_eval('test', res)}")
        else:
            self.log.info("no test split: results.json has no test results")
        def write_results():
            if self.rank == 0:
                best = {self.task.metric: self.best, **(self.best_valid or {})} if math.isfinite(self.best) else None
                out = {"test": res, "best_valid": best, "steps": self.step, **self.task.results()}
                with open(os.path.join(self.run.out_dir, "results.json"), "w") as f:  # strict JSON: no NaN, no inf
                    json.dump(finite_json(out), f, indent=1, default=str, allow_nan=False)

        agreed_io(write_results)
        return res

    # ---- training ---------------------------------------------------------------------------------------
    def train_step(self) -> Tuple[float, float, Dict[str, float], bool]:
        """One optimizer step.  A non-finite loss on any rank (all ranks agree through an all-reduce) skips
        it: the step's gradients are made NaN everywhere, which ZeRO 1/2 treat as an overflow (no optimizer
        or scheduler step, gradients cleared); an optimizer without that check (fp32 at ZeRO 0) is skipped by
        ``_skip_step_by_hand``.
        Buffers the forward passes changed (router step, VQ EMA) and the task's own state are put back.
        Returns (mean loss, mean aux, extras summed over the micro-batches, skipped)."""
        self.doing = f"training step {self.step + 1}"
        self.step_lr = float(self.engine.get_lr()[0])  # the lr this step trains at (the schedule moves after it)
        set_step(self.model, self.task.router_step(self.step))
        # device copies: put back if the step is skipped (a host copy would sync the device every step)
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self.task.begin_step()
        losses, auxes, extras, bad = [], [], {}, False
        for i in range(self.accum):
            loss, aux, more = self.task.micro_step(self.engine)
            self.health.add(layer_stats(self.model, self.task.stats_layers(self.model)))
            total = loss + aux
            # one transfer to the host per micro-batch: the loss, the aux loss and the non-finite flag agreed by
            # all ranks (an all-reduce on the device)
            flag = (~torch.isfinite(total.detach())).float().reshape(1)
            flag = max_over_ranks(torch.clamp(flag, min=float(bad)))
            loss_v, aux_v, flag_v = torch.cat([loss.detach().float().reshape(1), aux.detach().float().reshape(1),
                                               flag.to(loss.device)]).tolist()
            bad = flag_v > 0
            if bad:
                total = total * float("nan")  # NaN gradients on every rank: the whole step is dropped
            self.engine.backward(total)
            by_hand = bad and i == self.accum - 1 and not hasattr(self.engine.optimizer, "overflow")
            if by_hand:
                self._skip_step_by_hand()
            else:
                self.engine.step()
            losses.append(loss_v)
            auxes.append(aux_v)
            for k, v in more.items():
                extras[k] = extras.get(k, 0.0) + float(v)
        if bad:
            if not by_hand and self.engine.was_step_applied():
                raise TrainingStopped("DeepSpeed applied an optimizer step with non-finite gradients (bf16 without "
                                      "overflow checks): set bf16.check_grad_overflow true in the ds_config")
            # through load_state_dict, so that modules caching a buffer's value on the host (router step, VQ init
            # flag, fitted centroids) drop their copy (their _load_from_state_dict does)
            self.model.load_state_dict(buffers, strict=False)
            self.task.undo_step()
        else:
            update_expert_biases(self.model)  # aux-loss-free balancing: after the optimizer step (collective)
        self.step += 1
        return sum(losses) / len(losses), sum(auxes) / len(auxes), extras, bad

    def _skip_step_by_hand(self) -> None:
        """An optimizer without DeepSpeed's overflow check (fp32 at ZeRO 0: a plain torch optimizer) is skipped the
        way ZeRO 1/2 and bf16 skip an overflow, with public APIs only: the engine closes the step (clipping,
        zeroing, counters) on zeroed gradients -- DeepSpeed's clipping needs every gradient present -- and then
        the weights, the optimizer state (moments, step counts, lr) and the LR schedule are put back as they were
        before it, and the step is counted as skipped.  The copies live in host memory (a rare path)."""
        opt, sched = self.engine.optimizer, self.engine.lr_scheduler
        opt.zero_grad(set_to_none=False)
        params = [p for p in self.model.parameters()]
        weights = [p.detach().to("cpu", copy=True) for p in params]
        opt_state = _to_host(opt.state_dict())
        sched_state = sched.state_dict() if sched is not None else None
        self.engine.step()
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        opt.load_state_dict(opt_state)  # torch moves the state back to each parameter's device
        if sched is not None:
            sched.load_state_dict(sched_state)
        self.engine.skipped_steps += 1

    def _log_window(self, window: Dict[str, Any]) -> None:
        keys = sorted(window["extras"])
        sums = reduce_values([window["loss"], window["aux"], window["steps"]] + [window["extras"][k] for k in keys])
        n = sums[2]
        extras = dict(zip(keys, sums[3:]))
        gn = self.engine.get_global_grad_norm()
        record = {"kind": "train", "step": self.step, "loss": sums[0] / n, "aux_loss": sums[1] / n,
                  "lr": self.step_lr, "grad_norm": float(gn) if gn is not None else float("nan"),
                  f"{self.task.unit}_per_s": extras.get(self.task.unit, 0.0) / window["time"],
                  **self.task.train_record({**extras, "seconds": window["time"]})}
        record["moe"] = gather_moe_stats(self.model, self.task.stats_layers(self.model))
        record["moe_summary"] = moe_summary(record["moe"])
        warnings = self.health.check(window["steps"])  # collective
        if warnings:
            record["routing_warnings"] = warnings
            for line in warnings:
                self.log.info(f"warning: step {self.step}: {line}")
        self.log.write(record)
        if not self.run.progress:
            self.log.info(f"step {self.step}: loss {record['loss']:.4f}, aux {record['aux_loss']:.4f}, "
                          f"lr {record['lr']:.3g}")

    def train(self) -> bool:
        """Train to --train-iters (True), or until a stop signal on any rank (False: that step is saved)."""
        run, total = self.run, self.optim.train_iters
        window = _empty_window()
        attempted = applied = 0
        while self.step < total:
            t0 = time.perf_counter()
            loss, aux, extras, skipped = self.train_step()
            dt = time.perf_counter() - t0
            attempted += 1
            applied += not skipped
            if skipped:
                self.skipped_total += 1
                self.skipped_in_row += 1
                self.log.write({"kind": "skip", "step": self.step, "skipped_total": self.skipped_total,
                                "skipped_in_row": self.skipped_in_row})
                self.log.info(f"step {self.step}: non-finite loss, step skipped "
                              f"({self.skipped_in_row} in a row, {self.skipped_total} in all)")
                if self.skipped_in_row >= run.max_skipped_steps:
                    raise TrainingStopped(
                        f"{self.skipped_in_row} steps in a row (up to step {self.step}) had a non-finite loss, "
                        f"--max-skipped-steps {run.max_skipped_steps}: lower --lr or check the data, then resume "
                        f"from the last checkpoint in {self.save_dir}")
                if self.stop.agreed(self.log.failed is not None):
                    return self._stop_on_signal()
                continue
            self.skipped_in_row = 0
            window["loss"] += loss
            window["aux"] += aux
            window["steps"] += 1
            window["time"] += dt
            for k, v in extras.items():
                window["extras"][k] = window["extras"].get(k, 0.0) + v
            self.log.progress(1, loss=loss, **{f"{self.task.unit}/s": f"{extras.get(self.task.unit, 0) / dt:.0f}"})
            last = self.step == total
            if self.step % run.log_interval == 0 or last:
                self._log_window(window)
                window = _empty_window()
            if (run.eval_interval and self.step % run.eval_interval == 0) or last:
                self.validate()
            if run.save_interval and self.step % run.save_interval == 0 and not last:
                self.save(ckpt.step_tag(self.step))
            if not last and self.stop.agreed(self.log.failed is not None):
                return self._stop_on_signal()
        if attempted and not applied:
            raise TrainingStopped(f"every one of the {attempted} step(s) of this run had a non-finite loss, so no "
                                  f"update was applied: lower --lr, or the settings that scale the loss (e.g. "
                                  f"--moe-router-topk-scaling-factor, --moe-z-loss-coeff), or check the data")
        self.save(ckpt.step_tag(self.step))
        return True

    def _stop_on_signal(self) -> bool:
        """SIGTERM/SIGINT on any rank: the current step is done; save it and stop (exit 0).  A failed log write
        on any rank (a full disk) stops every rank instead, without a save (the disk has no room for one)."""
        agreed_io(self._raise_log_failure)
        path = self.save(ckpt.step_tag(self.step))
        self.log.info(f"stopped by {self.stop.describe()} after step {self.step}; "
                      f"saved {path}: resume with --load {self.save_dir}")
        return False

    def _raise_log_failure(self) -> None:
        if self.log.failed is not None:
            raise self.log.failed

    def evaluate_only(self) -> bool:
        """--eval-only: the weights as loaded (or as built) on the validation and test splits at this step, the
        same evaluation as a run's own; log records and OUT_DIR/eval.json.  Returns False (no test to follow)."""
        source = os.path.join(self.resume_dir, self.resume_tag) if self.run.load else "the initial weights"
        out = {"step": self.step, "checkpoint": source}
        for split, iters in (("valid", self.run.eval_iters), ("test", self.run.test_iters)):
            if not self.task.has_split(split):
                self.log.info(f"no {split} split: not evaluated")
                continue
            self.doing = f"evaluating the {split} split"
            out[split] = res = self.evaluate(split, iters)
            self.log.write({"kind": split, "step": self.step, "eval_only": True, **res})
            self.log.info(f"step {self.step} ({source}): {split} {self.task.describe_eval(split, res)}")

        def write():
            if self.rank == 0:
                with open(os.path.join(self.run.out_dir, "eval.json"), "w") as f:
                    json.dump(finite_json(out), f, indent=1, default=str, allow_nan=False)

        agreed_io(write)
        return False

    def finish(self) -> None:
        plots = self.task.plots if self.run.plots and not self.run.eval_only else None
        agreed_io(lambda: self.log.finish(self.save_dir, plots))
        self.release_lock()


def _monitor_note(ds_config: Dict[str, Any]) -> str:
    """Where DeepSpeed's monitor writes the run's scalars, for the run's last line ('' when none is on)."""
    tb = ds_config.get("tensorboard") or {}
    parts = [f", TensorBoard: {os.path.join(tb.get('output_path', ''), tb.get('job_name', ''))}"] \
        if tb.get("enabled") else []
    parts += [f", {name}: on" for name in ("wandb", "csv_monitor", "comet") if (ds_config.get(name) or {}).get("enabled")]
    return "".join(parts)


def _to_host(state):
    """A (nested) state dict with every tensor copied to host memory."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_host(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_host(v) for v in state)
    return state


def _empty_window() -> Dict[str, Any]:
    return {"loss": 0.0, "aux": 0.0, "steps": 0, "time": 0.0, "extras": {}}


def _rank_from_env() -> int:
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))


def run(cmd: CommandLine, make_task, argv: Optional[List[str]] = None) -> int:
    """A driver's ``main``: parse ``argv`` with ``cmd``, ``make_task(parsed)`` builds the task (its configs
    checked), then train, test and finish.  Exit status: 0 done (or stopped by a signal after saving), 2 bad
    input, 3 training could not go on, 4 a peer rank died or hung."""
    trainer = None
    try:
        parsed = cmd.parse(argv)
        task = make_task(parsed)
        trainer = Trainer(task, cmd)
    except INPUT_ERRORS as e:  # every rank that finds it says it: the launcher may kill rank 0 first
        print(f"error: {e}", file=sys.stderr, flush=True)
        shutdown(clean=False)
        return 2
    except WriteFailed as e:  # the run's folders cannot be written (a full disk): every rank stops here together
        print(f"error: {_write_failed(e.error, None)}", file=sys.stderr, flush=True)
        shutdown(clean=False)
        return 3
    trainer.stop.install()
    try:
        finished = trainer.evaluate_only() if trainer.run.eval_only else trainer.train()
        if finished:
            trainer.test()
        trainer.finish()
    except (TrainingStopped, ckpt.CheckpointError) as e:  # the run cannot go on (e.g. a save or a log write
        # failed): every rank stops here together
        print(f"error: {_write_failed(e.error, trainer) if isinstance(e, WriteFailed) else e}", file=sys.stderr,
              flush=True)
        trainer.log.close()
        trainer.release_lock()
        shutdown(clean=False)
        return 3
    except Exception as e:  # noqa: BLE001 -- only the backend's own errors are turned into a message
        if not collective_failure(e):
            raise
        dead = dead_ranks(trainer.rank, trainer.world)
        who = (f"rank(s) {', '.join(map(str, dead))} stopped" if dead else
               "rank 0 or the launcher (it holds the rendezvous store) stopped" if dead is None else
               "a collective failed")
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"error: rank {trainer.rank}: {who} responding while {trainer.doing} ({first}): see that rank's log, "
              f"then resume with --load {trainer.save_dir}", file=sys.stderr, flush=True)
        os._exit(4)  # the process group is broken: destroying it could hang
    shutdown(clean=True)
    return 0


def _write_failed(e: OSError, trainer: Optional[Trainer]) -> str:
    """The one line for a run whose files could not be written."""
    what = f"writing {e.filename}" if e.filename else "writing the run's files"
    fix = ("free space or give --out-dir (and --save) a folder on a disk with room" if out_of_space(e) else
           "give --out-dir (and --save) a folder you can write to")
    if trainer is None:
        return f"{what} failed ({e.strerror or e}): {fix}; nothing was trained"
    latest = ckpt.read_latest(trainer.save_dir)
    last = os.path.join(trainer.save_dir, latest) if latest else "none yet"
    return (f"{what} failed at step {trainer.step} ({e.strerror or e}): {fix}, then resume with --load "
            f"{trainer.save_dir}; the last complete checkpoint is {last}")
