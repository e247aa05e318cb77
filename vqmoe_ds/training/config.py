"""The configs every training driver shares -- optimisation, run (outputs, checkpoints, evaluation), parallelism --
and the DeepSpeed config resolved from them.

DeepSpeed config vs flags: **the ds_config wins where it sets a value, flags fill what it leaves out**, and a
flag given explicitly that contradicts the config is an error (never a silent choice).  This covers the
optimizer's lr, the scheduler (a ``"scheduler"`` block in the config replaces the flags' warmup + cosine),
``gradient_clipping`` and the batch sizes.
"""
from __future__ import annotations

import copy
import errno
import json
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

from ..fields import setting
from ..cli import ConfigError

DEFAULT_LR, DEFAULT_CLIP, DEFAULT_MICRO_BATCH = 3.5e-4, 1.0, 8
DEFAULT_MIN_LR_RATIO = 0.1  # --min-lr's default: this x the peak lr


def _finite(name: str, value: Optional[float]) -> None:
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"{name}={value} is not a finite number: give a real value")


@dataclass
class OptimConfig:
    micro_batch_size: Optional[int] = setting(None, "examples per rank per micro-batch; default: the ds_config's, "
                                                    "else the driver's")
    gradient_accumulation_steps: Optional[int] = setting(None, "micro-batches per optimizer step; default: the "
                                                               "ds_config's or 1")
    train_iters: int = setting(100, "optimizer steps")
    lr: Optional[float] = setting(None, "peak learning rate; default: the ds_config's or 3.5e-4")
    min_lr: Optional[float] = setting(None, "lr at the end of the cosine; default 0.1 x lr")
    lr_warmup_iters: Optional[int] = setting(None, "linear warmup steps (default 0: step 1 trains at the peak)")
    weight_decay: float = setting(0.0, "the optimizer's weight decay")
    clip_grad: Optional[float] = setting(None, "gradient-norm clipping; default: the ds_config's or 1.0")
    seed: int = setting(1234, "seeds the weights (the same on every rank), the data order and, offset by rank, "
                              "dropout")

    def __post_init__(self):
        for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
            _finite(name, getattr(self, name))
        for name in ("micro_batch_size", "gradient_accumulation_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}={v} must be >= 1")
        if self.train_iters < 1:
            raise ConfigError(f"train_iters={self.train_iters} must be >= 1")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.min_lr is not None and self.min_lr < 0:
            raise ConfigError(f"min_lr={self.min_lr} must be >= 0")
        if self.min_lr is not None and self.lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr} exceeds lr={self.lr}: lower --min-lr")
        if self.lr_warmup_iters is not None and not 0 <= self.lr_warmup_iters <= self.train_iters:
            raise ConfigError(f"lr_warmup_iters={self.lr_warmup_iters} must lie in [0, train_iters={self.train_iters}]: "
                           f"shorten the warmup")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ConfigError(f"clip_grad={self.clip_grad} must be >= 0 (0: no clipping)")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")


@dataclass
class RunConfig:
    out_dir: str = setting("runs/latest", "logs, TensorBoard, plots, the resolved config.json, results.json")
    save: Optional[str] = setting(None, "checkpoint folder; default OUT_DIR/checkpoints")
    load: Optional[str] = setting(None, "resume from the latest checkpoint in this folder (a --save folder)")
    overwrite: bool = setting(False, "a fresh run in a folder that holds a run replaces it (its logs, results and "
                                     "checkpoints)")
    save_interval: int = setting(0, "save every N steps (0: only best and final)")
    keep_last: int = setting(0, "keep only the newest N regular checkpoints (0: all); best is always kept")
    eval_interval: int = setting(0, "validate every N steps (0: only at the end)")
    eval_iters: int = setting(0, "validation batches per rank (0: the whole split)")
    test_iters: int = setting(0, "test batches per rank (0: the whole split)")
    eval_batch_size: Optional[int] = setting(None, "default: the micro-batch size")
    log_interval: int = setting(10, "steps between training log lines")
    max_skipped_steps: int = setting(10, "stop after this many steps in a row with a non-finite loss (each is "
                                         "skipped)")
    progress: bool = setting(True, "a tqdm bar on rank 0")
    plots: bool = setting(True, "PNG plots at the end")
    moe_per_layer_logging: bool = setting(False, "the monitor (TensorBoard ...): every MoE layer's routing metrics "
                                                 "too, not only their summary")
    eval_only: bool = setting(False, "evaluate the weights (those --load gives, e.g. an imported model's: a baseline "
                                     "at its step) on the validation and test splits, write OUT_DIR/eval.json and "
                                     "stop: no training, no checkpoint")

    # keys that config files of earlier versions hold, read and ignored: "tensorboard" (the monitor is the
    # ds_config's: TensorBoard by default, `resolve_ds_config`)
    RETIRED: ClassVar[Tuple[str, ...]] = ("tensorboard",)

    def __post_init__(self):
        for name in ("save_interval", "keep_last", "eval_interval", "eval_iters", "test_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("log_interval", "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size={self.eval_batch_size} must be >= 1")
        if self.load is not None and not os.path.isdir(self.load):
            raise ConfigError(f"load={self.load} is not a folder: give the --save folder of an earlier run")

    @property
    def save_dir(self) -> str:
        return self.save or os.path.join(self.out_dir, "checkpoints")

    def previous_run(self) -> Optional[str]:
        """What of an earlier run lies where this run writes (None: nothing)."""
        if os.path.isfile(os.path.join(self.out_dir, "log.jsonl")):
            return os.path.join(self.out_dir, "log.jsonl")
        if os.path.isdir(self.save_dir) and any(
                n == "latest" or n == "best" or n.startswith("step") for n in os.listdir(self.save_dir)):
            return self.save_dir
        return None

    def check_fresh(self) -> None:
        """A run without --load must not write over an earlier run unless --overwrite says so."""
        found = None if self.load or self.overwrite else self.previous_run()
        if found:
            raise ConfigError(f"{found} belongs to an earlier run: resume it with --load {self.save_dir}, choose another "
                           f"--out-dir (and --save), or give --overwrite to replace it")

    def clear_previous(self) -> None:
        """--overwrite: remove the earlier run's logs, results, plots and checkpoints (rank 0, before any step)."""
        import shutil

        if not self.overwrite or self.load:
            return
        for name in ("log.jsonl", "results.json", "run_info.json", "tensorboard"):
            path = os.path.join(self.out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        if os.path.isdir(self.save_dir):
            for n in os.listdir(self.save_dir):
                if n in ("latest", "best") or n.startswith(("step", ".tmp_", ".old_")):
                    full = os.path.join(self.save_dir, n)
                    shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)


@dataclass
class ParallelConfig:
    deepspeed_config: Optional[str] = setting(None, "DeepSpeed JSON (ZeRO stage, precision, optimizer, batch); see "
                                                    "ds_configs/")
    dist_timeout_minutes: float = setting(30.0, "a collective waiting longer than this (a rank died or hangs) fails "
                                                "the run")
    distributed_port: int = setting(factory=lambda: int(os.environ.get("MASTER_PORT", 29500)),
                                    help="rendezvous port when ranks are found through MPI (mpirun)")
    local_rank: int = setting(factory=lambda: int(os.environ.get("LOCAL_RANK", 0)), help="set by the launchers")
    deepspeed: bool = setting(False, "accepted for DeepSpeed's launch examples; the engine is always DeepSpeed")

    FLAGS: ClassVar[Dict[str, Tuple[str, ...]]] = {
        "deepspeed_config": ("--deepspeed_config", "--deepspeed-config"),
        "local_rank": ("--local_rank", "--local-rank")}
    CLI_ONLY: ClassVar[Tuple[str, ...]] = ("distributed_port", "local_rank", "deepspeed")

    def __post_init__(self):
        if self.deepspeed_config is not None and not os.path.isfile(self.deepspeed_config):
            raise ConfigError(f"deepspeed_config={self.deepspeed_config} does not exist: see ds_configs/")
        if not self.dist_timeout_minutes > 0 or not math.isfinite(self.dist_timeout_minutes):
            raise ConfigError(f"dist_timeout_minutes={self.dist_timeout_minutes} must be > 0")


def check_world(ep: int, is_moe: bool, world_size: int) -> None:
    if world_size % ep:
        raise ConfigError(f"--moe-expert-parallel-size {ep} does not divide the world size {world_size}: "
                       f"launch a multiple of {ep} ranks or lower the expert-parallel size")
    if ep > 1 and not is_moe:
        raise ConfigError(f"--moe-expert-parallel-size {ep} needs MoE layers, but the model is dense: "
                       f"set --router or drop the flag")


def load_ds_config(path: Optional[str]) -> Dict[str, Any]:
    if not path:
        return {"zero_optimization": {"stage": 0}}
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path} is not valid JSON (line {e.lineno}: {e.msg}): fix the file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--deepspeed_config {path} is not text: give a JSON file") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed_config {path} holds a {type(ds).__name__}, not a JSON object: write it as "
                       f"{{\"zero_optimization\": {{...}}, ...}}")
    return ds


# optimizers DeepSpeed builds itself (deepspeed.runtime.config's names, lower case); others must be torch.optim's
DS_OPTIMIZERS = ("adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon", "onebitadam",
                 "zerooneadam", "onebitlamb")
GPU_ONLY_OPTIMIZERS = ("lamb", "onebitadam", "zerooneadam", "onebitlamb")  # CUDA kernels or NCCL compression


def _number(value, where: str, src: str, low: float = None, low_open: bool = False, integer: bool = False):
    kind = "an integer" if integer else "a finite number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        raise ConfigError(f"{where} = {value!r} in {src} is not {kind}: write it as {kind}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{where} = {value!r} in {src} must be {'>' if low_open else '>='} {low}: fix the ds_config")
    return value


def check_ds_shapes(ds: Dict[str, Any], src: str, on_cpu: bool) -> None:
    """The parts of a ds_config this driver reads, checked for type and range (one line each)."""
    for key in ("zero_optimization", "optimizer", "scheduler", "bf16", "fp16"):
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{key} in {src} is a {type(ds[key]).__name__}, not an object: write it as "
                           f"\"{key}\": {{...}}")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in ds:
            _number(ds[key], key, src, low=1, integer=True)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise ConfigError(f"zero_optimization.stage = {stage!r} in {src} is not a stage number: use 0, 1 or 2")
    if "gradient_clipping" in ds:
        _number(ds["gradient_clipping"], "gradient_clipping", src, low=0)
    opt = ds.get("optimizer")
    if opt is not None:
        kind = opt.get("type")
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"the optimizer block in {src} has no \"type\": name one, e.g. \"type\": \"AdamW\"")
        import torch

        if kind.lower() not in DS_OPTIMIZERS and not hasattr(torch.optim, kind):
            raise ConfigError(f"optimizer type {kind!r} in {src} is neither DeepSpeed's ({', '.join(DS_OPTIMIZERS)}) "
                           f"nor a torch.optim class: fix its name")
        if on_cpu and kind.lower() in GPU_ONLY_OPTIMIZERS:
            raise ConfigError(f"optimizer {kind} in {src} needs a GPU (CUDA kernels): use Adam or AdamW on the CPU")
        params = opt.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"optimizer.params in {src} is a {type(params).__name__}, not an object: fix the ds_config")
        if "lr" in params:
            _number(params["lr"], "optimizer.params.lr", src, low=0, low_open=True)
        if "weight_decay" in params:
            _number(params["weight_decay"], "optimizer.params.weight_decay", src, low=0)
        if "eps" in params:
            _number(params["eps"], "optimizer.params.eps", src, low=0, low_open=True)
        if "betas" in params:
            b = params["betas"]
            if not (isinstance(b, list) and len(b) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                 and 0 <= v < 1 for v in b)):
                raise ConfigError(f"optimizer.params.betas = {b!r} in {src} must be two numbers in [0, 1), e.g. "
                               f"[0.9, 0.999]: fix the ds_config")
    sched = ds.get("scheduler")
    if sched is not None:
        from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

        if sched.get("type") not in VALID_LR_SCHEDULES:
            raise ConfigError(f"scheduler type {sched.get('type')!r} in {src} is not one of DeepSpeed's "
                           f"({', '.join(VALID_LR_SCHEDULES)}): fix its name")
        if not isinstance(sched.get("params", {}), dict):
            raise ConfigError(f"scheduler.params in {src} is not an object: fix the ds_config")


def check_with_deepspeed(ds: Dict[str, Any], src: str) -> None:
    """DeepSpeed's own parsing of the resolved config (its pydantic models and batch checks), each failure as one
    line naming the key, the value and the file."""
    import torch.distributed as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = copy.deepcopy(ds)  # DeepSpeed checks the batch against the world it sees (1 before the group exists);
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1  # ours was checked above
    probe["train_batch_size"] = probe["train_micro_batch_size_per_gpu"] * probe["gradient_accumulation_steps"] * world
    try:
        DeepSpeedConfig(probe)
    except Exception as e:  # noqa: BLE001 -- translated into one line; DeepSpeed raises several kinds
        errors = getattr(e, "errors", None)
        if callable(errors):
            first = errors()[0]
            block = {"DeepSpeedZeroConfig": "zero_optimization.", "DeepSpeedBF16Config": "bf16.",
                     "DeepSpeedFP16Config": "fp16."}.get(getattr(e, "title", ""), "")
            key = block + ".".join(str(p) for p in first.get("loc", ()))
            raise ConfigError(f"{key} = {first.get('input')!r} in {src}: {first.get('msg')}: fix the ds_config") from None
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"DeepSpeed refuses {src}: {line[:200]}: fix the ds_config") from None


MONITORS = ("tensorboard", "wandb", "csv_monitor", "comet")  # DeepSpeed's monitor blocks


def flag_lr_schedule(optim: OptimConfig, ds: Dict[str, Any]) -> Optional[Tuple[int, int, float]]:
    """The flags' lr schedule of a resolved ds_config -- (warmup steps, train steps, min_lr / lr) for
    `lr_schedule.flag_schedule` -- or None when the ds_config has its own ``"scheduler"`` block, which wins."""
    if "scheduler" in ds:
        return None
    lr = ds["optimizer"]["params"]["lr"]
    min_lr = optim.min_lr if optim.min_lr is not None else DEFAULT_MIN_LR_RATIO * lr
    return optim.lr_warmup_iters or 0, optim.train_iters, min_lr / lr


def resolve_ds_config(optim: OptimConfig, parallel: ParallelConfig, world_size: int, on_cpu: bool,
                      default_micro_batch: int = DEFAULT_MICRO_BATCH, out_dir: Optional[str] = None) -> Dict[str, Any]:
    """The DeepSpeed config the engine gets: the file's settings, completed from the flags (see module doc).
    ``out_dir``: a run's folder; when the file configures none of DeepSpeed's monitors, TensorBoard is turned on in
    ``out_dir/tensorboard`` (the run's scalars go through the engine's monitor: `RunLog`)."""
    ds = copy.deepcopy(load_ds_config(parallel.deepspeed_config))
    src = parallel.deepspeed_config or "the default ds_config"
    check_ds_shapes(ds, src, on_cpu)

    def conflict(flag, flag_value, key, cfg_value):
        raise ConfigError(f"{flag} {flag_value} contradicts {key}={cfg_value} in {src}: remove one of them")

    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        raise ConfigError(f"ZeRO stage 3 in {src} is not supported: DeepSpeed's MoE layers refuse it; use stage 0, 1 or 2")
    if stage not in (0, 1, 2):
        raise ConfigError(f"zero_optimization.stage={stage} in {src}: use 0, 1 or 2")
    # batch sizes: train_batch = micro x accumulation x data-parallel world (all ranks; experts are sharded
    # over the ep group but every rank reads its own data)
    micro = optim.micro_batch_size or ds.get("train_micro_batch_size_per_gpu") or default_micro_batch
    accum = optim.gradient_accumulation_steps or ds.get("gradient_accumulation_steps") or 1
    for flag, val, key in (("--micro-batch-size", optim.micro_batch_size, "train_micro_batch_size_per_gpu"),
                           ("--gradient-accumulation-steps", optim.gradient_accumulation_steps,
                            "gradient_accumulation_steps")):
        if val is not None and key in ds and ds[key] != val:
            conflict(flag, val, key, ds[key])
    if "train_batch_size" in ds and ds["train_batch_size"] != micro * accum * world_size:
        raise ConfigError(f"train_batch_size={ds['train_batch_size']} in {src} is not micro {micro} x accumulation "
                       f"{accum} x world {world_size} = {micro * accum * world_size}: fix one of them")
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
              train_batch_size=micro * accum * world_size)
    # optimizer
    opt = ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    params = opt.setdefault("params", {})
    if "lr" in params and optim.lr is not None and params["lr"] != optim.lr:
        conflict("--lr", optim.lr, "optimizer.params.lr", params["lr"])
    params.setdefault("lr", optim.lr or DEFAULT_LR)
    params.setdefault("weight_decay", optim.weight_decay)
    if on_cpu and opt["type"].lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)  # no JIT-compiled CPU FusedAdam
    lr = params["lr"]
    # scheduler: the config's block, or linear warmup + cosine from the flags
    if "scheduler" in ds:
        for flag, val in (("--lr-warmup-iters", optim.lr_warmup_iters), ("--min-lr", optim.min_lr)):
            if val is not None:
                raise ConfigError(f"{flag} {val} given but {src} has its own scheduler block, which wins: "
                               f"remove the flag or the block")
    elif optim.min_lr is not None and optim.min_lr > lr:  # the flags' schedule (`flag_lr_schedule`)
        raise ConfigError(f"--min-lr {optim.min_lr} exceeds the peak lr {lr}: lower --min-lr")
    # clipping
    if "gradient_clipping" in ds and optim.clip_grad is not None and ds["gradient_clipping"] != optim.clip_grad:
        conflict("--clip-grad", optim.clip_grad, "gradient_clipping", ds["gradient_clipping"])
    ds.setdefault("gradient_clipping", optim.clip_grad if optim.clip_grad is not None else DEFAULT_CLIP)
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"fp16 in {src} is not supported (MoE routers need bf16 or fp32 range): use bf16")
    if on_cpu and ds.get("bf16", {}).get("enabled") and ds.get("zero_optimization", {}).get("offload_optimizer"):
        raise ConfigError(f"{src} offloads the optimizer, which needs a GPU: use ds_configs/cpu_fp32.json on CPU")
    ds.setdefault("steps_per_print", 10 ** 9)  # the driver logs; keep DeepSpeed's own step prints quiet
    ds.setdefault("wall_clock_breakdown", False)
    if out_dir is not None and not any(k in ds for k in MONITORS):
        ds["tensorboard"] = {"enabled": True, "output_path": out_dir, "job_name": "tensorboard"}
    check_with_deepspeed(ds, src)
    return ds


def check_save_dir(path: str, rank: int = 0) -> None:
    """The checkpoint folder can be created and written (each rank probes it: on several nodes it must be shared)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe_rank{rank}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # not a bad input: the run cannot go on (exit 3)
            raise
        raise ConfigError(f"checkpoint folder {path} is not writable ({e.strerror}): give --save a folder you can "
                       f"write to") from None
