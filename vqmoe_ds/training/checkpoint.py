"""Checkpoints that never lose work: DeepSpeed's ``save_checkpoint``/``load_checkpoint`` (model, optimizer,
scheduler; one file per expert) made crash-safe, plus what an exact resume needs beyond them.

Layout of a save folder::

    latest                  the tag of the newest *complete* checkpoint (DeepSpeed's pointer file)
    step{N}/                regular saves (the last ``--keep-last`` are kept), best/ the best validation loss
      ...DeepSpeed's files  mp_rank_00_model_states.pt, layer_*_expert_*_mp_rank_00_model_states.pt, optimizer
      rank{r}_state.pt      per rank: RNG states (python, numpy, torch), Transformer-XL memory, module buffers
      vqmoe_complete.json   the completion marker: every file of the checkpoint with its size, step, config
    .tmp_{tag}/             a save in progress (never loaded; removed by the next save)

Save protocol (collective; every rank calls :func:`save`):

  1. every rank writes into ``.tmp_{tag}`` (DeepSpeed's files, then its own ``rank{r}_state.pt``);
  2. barrier; rank 0 fsyncs every file, writes the marker (temp file, fsync, rename) and fsyncs the folder;
  3. rank 0 renames ``.tmp_{tag}`` to ``{tag}`` (an existing ``{tag}``, e.g. ``best``, is first moved
     to ``.old_{tag}`` and removed after), then switches ``latest``: ``latest.tmp``, fsync, ``os.replace``;
  4. barrier; rank 0 prunes regular checkpoints beyond the newest ``keep_last``.

``kill -9`` of any rank at any moment leaves ``latest`` pointing at the previous complete checkpoint.  A
checkpoint is only loaded after :func:`verify` (marker present, every listed file present with its size),
otherwise a :class:`CheckpointError` names what is missing.

The save folder must be visible to all ranks (a shared file system on several nodes), as DeepSpeed's
expert files already require.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

BEST = "best"
MARKER = "vqmoe_complete.json"
TMP_PREFIX, OLD_PREFIX = ".tmp_", ".old_"
STEP_TAG = re.compile(r"^step(\d+)$")
# the model-config keys that decide the shapes of the weights (a checkpoint must agree on them to load)
ARCH_KEYS = ("model", "n_layer", "d_model", "n_head", "d_inner", "expert_ffn", "vocab_size", "moe_layers",
             "tie_embeddings")
MOE_ARCH_KEYS = ("router", "num_experts", "codebook_size", "codebook_dim", "vqmoe_mode", "vq_kind")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message is one line naming the problem and the fix."""


def rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def fault(kind: str, step: Optional[int]) -> bool:
    """Fault injection for the tests: ``VQMOE_FAULT=kind@step@rank[,...]`` (step/rank ``*`` = any)."""
    spec = os.environ.get("VQMOE_FAULT")
    if not spec:
        return False
    for item in spec.split(","):
        k, s, r = (item.split("@") + ["*", "*"])[:3]
        if k == kind and s in ("*", str(step)) and r in ("*", str(_rank())):
            return True
    return False


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _list_files(folder: str) -> Dict[str, int]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, folder)] = os.path.getsize(full)
    return out


def step_tags(save_dir: str) -> List[Tuple[int, str]]:
    """Complete regular checkpoints in ``save_dir`` as (step, tag), oldest first."""
    if not os.path.isdir(save_dir):
        return []
    tags = []
    for name in os.listdir(save_dir):
        m = STEP_TAG.match(name)
        if m and os.path.isfile(os.path.join(save_dir, name, MARKER)):
            tags.append((int(m.group(1)), name))
    return sorted(tags)


def module_buffers(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's buffers (router step, VQ EMA / usage counters, StableMoE's frozen router): rank 0's copy
    is what DeepSpeed saves, so ranks whose buffers differ get their own back from ``rank{r}_state.pt``."""
    return {n: b.detach().cpu().clone() for n, b in model.named_buffers()}


def save(engine, save_dir: str, tag: str, client_state: Dict[str, Any], mems: Optional[List[torch.Tensor]] = None,
         latest: bool = True, keep_last: int = 0, model: Optional[torch.nn.Module] = None,
         step: Optional[int] = None) -> str:
    """Collective: every rank calls it.  Returns the checkpoint folder (complete when this returns)."""
    rank = _rank()
    tmp_tag = TMP_PREFIX + tag
    tmp = os.path.join(save_dir, tmp_tag)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        for name in os.listdir(save_dir):  # leftovers of saves that were killed: never complete, never loaded
            if name.startswith((TMP_PREFIX, OLD_PREFIX)) and os.path.isdir(os.path.join(save_dir, name)):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    _barrier()
    engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    state = {"rng": rng_state(), "mems": [m.detach().cpu() for m in mems] if mems else None,
             "buffers": module_buffers(model) if model is not None else None}
    torch.save(state, os.path.join(tmp, f"rank{rank}_state.pt"))
    if fault("kill_in_save", step):  # the tests' kill -9 in the middle of a save
        os.kill(os.getpid(), 9)
    _barrier()
    if rank == 0:
        files = _list_files(tmp)
        for name in files:
            _fsync_file(os.path.join(tmp, name))
        world = dist.get_world_size() if dist.is_initialized() else 1
        missing = [f"rank{r}_state.pt" for r in range(world) if f"rank{r}_state.pt" not in files]
        if missing:
            raise CheckpointError(f"save of {tag} in {save_dir} lacks {missing[0]}: the folder is not shared by all "
                                  f"ranks; give --save a folder on a file system every node sees")
        marker = {"tag": tag, "step": step, "world_size": world, "files": files,
                  "model_config": client_state.get("model_config")}
        _write_atomic(os.path.join(tmp, MARKER), json.dumps(marker, indent=1))
        _fsync_dir(tmp)
        final = os.path.join(save_dir, tag)
        if os.path.exists(final):
            old = os.path.join(save_dir, OLD_PREFIX + tag)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(save_dir)
        if latest:
            _write_atomic(os.path.join(save_dir, "latest"), tag)
    _barrier()
    if rank == 0 and keep_last > 0:
        prune(save_dir, keep_last)
    return os.path.join(save_dir, tag)


def prune(save_dir: str, keep_last: int) -> List[str]:
    """Remove regular checkpoints beyond the newest ``keep_last`` (never ``best``, never the one ``latest``
    names).  Returns the removed tags."""
    current = read_latest(save_dir)
    tags = step_tags(save_dir)
    removed = []
    for _, tag in tags[:-keep_last] if keep_last < len(tags) else []:
        if tag == current:
            continue
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
        removed.append(tag)
    return removed


def read_latest(load_dir: str) -> Optional[str]:
    path = os.path.join(load_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def resolve_tag(load_dir: str, tag: Optional[str] = None) -> str:
    """The tag to load: ``tag`` or the one ``latest`` names; a one-line error when there is none."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"checkpoint folder {load_dir} does not exist: give the --save folder of an earlier run")
    if tag is None or tag == "latest":
        tag = read_latest(load_dir)
        if tag is None:
            done = step_tags(load_dir)
            hint = (f"it has complete checkpoint {done[-1][1]}: write that tag into {load_dir}/latest"
                    if done else "give the --save folder of a run that saved (--save-interval) or start without --load")
            raise CheckpointError(f"no checkpoint in {load_dir} (no 'latest' file): {hint}")
    if tag == BEST and not os.path.isdir(os.path.join(load_dir, BEST)) and \
            os.path.isdir(os.path.join(load_dir, OLD_PREFIX + BEST)):
        tag = OLD_PREFIX + BEST  # killed between the two renames of a best save: the previous best is complete
    return tag


def verify(load_dir: str, tag: str) -> Dict[str, Any]:
    """Check that checkpoint ``tag`` is complete; return its marker.  Raises CheckpointError naming the
    missing or truncated file."""
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist: choose a saved tag "
                              f"({', '.join(t for _, t in step_tags(load_dir)) or 'none complete'})")
    marker_path = os.path.join(path, MARKER)
    if not os.path.isfile(marker_path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER}: its save did not finish, or it predates "
                              f"crash-safe saves): load another tag or re-save it")
    try:
        with open(marker_path) as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} ({e}): load another tag") from None
    for name, size in sorted(marker["files"].items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {path} is missing {name}: restore the file or load another tag")
        actual = os.path.getsize(full)
        if actual != size:
            raise CheckpointError(f"checkpoint {path}: {name} has {actual} bytes, {size} were saved (truncated or "
                                  f"overwritten): restore the file or load another tag")
    return marker


def check_architecture(saved: Optional[Dict[str, Any]], current: Dict[str, Any], where: str) -> None:
    """The checkpoint's model config must give the same weight shapes as this run's."""
    if not saved:
        return
    for key in ARCH_KEYS:
        if key in saved and key in current and saved[key] != current[key]:
            if key == "vocab_size":
                raise CheckpointError(f"{where} was saved with a vocabulary of {saved[key]} tokens, this run's data "
                                      f"has {current[key]}: use the tokenizer (--data-path / --vocab-size) of the "
                                      f"run that saved it")
            raise CheckpointError(f"{where} was saved from a model with {key}={saved[key]!r}, this run has "
                                  f"{current[key]!r}: use the same model flags as the run that saved it")
    sm, cm = saved.get("moe") or {}, current.get("moe") or {}
    for key in MOE_ARCH_KEYS:
        if key in sm and key in cm and sm[key] != cm[key]:
            raise CheckpointError(f"{where} was saved from a model with moe.{key}={sm[key]!r}, this run has "
                                  f"{cm[key]!r}: use the same MoE flags as the run that saved it")


def check_expert_files(load_dir: str, tag: str, model: torch.nn.Module) -> None:
    """Every expert of every MoE layer has its DeepSpeed file (named by global expert id) in the checkpoint."""
    from deepspeed.moe.layer import MoE

    path = os.path.join(load_dir, tag)
    moe_id = 0
    for module in model.modules():
        if isinstance(module, MoE):
            for e in range(module.num_experts):
                name = f"layer_{moe_id}_expert_{e}_mp_rank_00_model_states.pt"
                if not os.path.isfile(os.path.join(path, name)):
                    raise CheckpointError(f"checkpoint {path} lacks the file of expert {e} of MoE layer {moe_id} "
                                          f"({name}): it was saved with fewer experts or is damaged; load another tag")
            moe_id += 1


def load(engine, load_dir: str, tag: Optional[str] = None, resume: bool = True,
         model: Optional[torch.nn.Module] = None, model_config: Optional[Dict[str, Any]] = None
         ) -> Tuple[Dict[str, Any], Optional[List[torch.Tensor]]]:
    """Verify, then load model (and with ``resume`` optimizer, scheduler, RNG, this rank's buffers) from
    ``load_dir`` (``tag`` None: latest).  Returns (client_state, this rank's TXL memory or None)."""
    tag = resolve_tag(load_dir, tag)
    marker = verify(load_dir, tag)
    if model_config is not None:
        check_architecture(marker.get("model_config"), model_config, f"checkpoint {os.path.join(load_dir, tag)}")
    if model is not None:
        check_expert_files(load_dir, tag, model)
    fresh_optimizer = resume and bool(marker.get("resharded"))  # tools/reshard_checkpoint.py: no optimizer files
    if fresh_optimizer and _rank() == 0:
        print(f"notice: {os.path.join(load_dir, tag)} was resharded (tools/reshard_checkpoint.py): model weights, "
              f"step, lr schedule and data position are loaded, the optimizer starts fresh", flush=True)
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=resume and not fresh_optimizer,
                                                load_lr_scheduler_states=resume)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no loadable checkpoint in {load_dir} (tag {tag}): load another tag")
    mems = None
    extra = os.path.join(load_dir, tag, f"rank{_rank()}_state.pt")
    if resume and os.path.isfile(extra):
        state = torch.load(extra, weights_only=False)
        if state.get("rng") is not None:  # a resharded checkpoint's extra ranks keep the driver's seeding
            set_rng_state(state["rng"])
        mems = state["mems"]
        if model is not None and state.get("buffers"):
            own = dict(model.named_buffers())
            with torch.no_grad():
                for name, value in state["buffers"].items():
                    if name in own:
                        own[name].copy_(value.to(own[name].device))
    return client_state or {}, mems


def _single_process_group() -> None:
    """A one-process group for tools that run outside a launcher (DeepSpeed's MoE layers need one)."""
    if dist.is_initialized():
        return
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        from .launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    from ..parallel import init_distributed

    init_distributed()


def load_for_inference(load_dir: str, tag: Optional[str] = None):
    """The model of a checkpoint, rebuilt in one process at expert parallelism 1 (DeepSpeed names expert files
    by global id, so any ep size loads).  Returns (model in eval mode, ModelConfig, tag)."""
    from ..models import ModelConfig, build_model

    tag = resolve_tag(load_dir, tag)
    marker = verify(load_dir, tag)
    cfg_dict = dict(marker.get("model_config") or torch.load(os.path.join(load_dir, tag, "mp_rank_00_model_states.pt"),
                                                            map_location="cpu", weights_only=False)["model_config"])
    cfg_dict["moe"] = {**cfg_dict["moe"], "ep_size": 1}
    cfg = ModelConfig(**cfg_dict)
    _single_process_group()
    import deepspeed

    model = build_model(cfg)
    engine, *_ = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1})
    check_expert_files(load_dir, tag, model)
    engine.load_checkpoint(load_dir, tag=tag, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    model.eval()
    return model, cfg, tag


def load_exported(path: str):
    """A model from ``tools/export_checkpoint.py``'s ``FILE.safetensors`` + ``FILE.json`` (no DeepSpeed
    checkpoint machinery; the MoE layers still need a one-process group).  Returns (model, ModelConfig)."""
    from safetensors.torch import load_file

    from ..models import ModelConfig, build_model

    cfg_path = os.path.splitext(path)[0] + ".json"
    for p in (path, cfg_path):
        if not os.path.isfile(p):
            raise CheckpointError(f"{p} does not exist: export the checkpoint with tools/export_checkpoint.py")
    with open(cfg_path) as f:
        meta = json.load(f)
    cfg = ModelConfig(**meta["model_config"])
    _single_process_group()
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model of {cfg_path} (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}): re-export it")
    model.eval()
    return model, cfg
