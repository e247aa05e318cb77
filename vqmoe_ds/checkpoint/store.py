"""Checkpoints that never lose work: DeepSpeed's ``save_checkpoint``/``load_checkpoint`` (model, optimizer,
scheduler; one file per expert) made crash-safe, plus what an exact resume needs beyond them.

Save protocol (collective; every rank calls :func:`save`):

  1. every rank writes into ``.tmp_{tag}`` (DeepSpeed's files, then its own ``rank{r}_state.pt``);
  2. barrier; rank 0 fsyncs every file, writes the marker (temp file, fsync, rename) and fsyncs the folder;
  3. rank 0 renames ``.tmp_{tag}`` to ``{tag}`` (an existing ``{tag}``, e.g. ``best``, is first moved
     to ``.old_{tag}`` and removed after), then switches ``latest``: ``latest.tmp``, fsync, ``os.replace``;
  4. barrier; rank 0 prunes regular checkpoints beyond the newest ``keep_last``.

``kill -9`` of any rank at any moment leaves ``latest`` pointing at the previous complete checkpoint.  A
checkpoint is only loaded after ``layout.verify`` (marker present, every listed file present with its size).

The save folder must be visible to all ranks (a shared file system on several nodes), as DeepSpeed's expert
files already require.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .layout import (BEST, MARKER, OLD_PREFIX, TMP_PREFIX, CheckpointError, digests, expert_file, fsync_dir,
                     fsync_file, list_files, rank_file, read_latest, resolve, step_tags, verify, write_atomic)
from .states import read_states, save_states, use_safe_loading

# Fields of a model config that may change between a checkpoint and the run that resumes it: they shape neither
# the weights nor the buffers (regularisation, capacity, loss weights, the dispatch implementation).  Every
# other field must match.
MAY_CHANGE_ON_RESUME = {"dropout", "attn_dropout", "init_std"}
MOE_MAY_CHANGE_ON_RESUME = {"dropout", "capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens",
                            "expert_impl", "router_jitter", "balance_loss_coef", "vq_alpha", "vq_beta",
                            "stablemoe_distill_coef", "init_std", "output_init_std"}


def rng_state() -> Dict[str, Any]:
    """The host RNG states as tensors, numbers and tuples (readable with ``weights_only=True``)."""
    np_state = np.random.get_state(legacy=False)
    numpy_state = {"bit_generator": np_state["bit_generator"], "has_gauss": int(np_state["has_gauss"]),
                   "gauss": float(np_state["gauss"]),
                   "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                             "pos": int(np_state["state"]["pos"])}}
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore `rng_state`'s states (also the earlier format, which kept numpy's own state tuple)."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        key = np_state["state"]["key"]
        np_state = {**np_state, "state": {"key": np.asarray(key.numpy() if torch.is_tensor(key) else key,
                                                            dtype=np.uint32), "pos": np_state["state"]["pos"]}}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def module_buffers(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's buffers (router step, VQ EMA / usage counters, StableMoE's frozen router): rank 0's copy
    is what DeepSpeed saves, so ranks whose buffers differ get their own back from ``rank{r}_state.pt``."""
    return {n: b.detach().cpu().clone() for n, b in model.named_buffers()}


def write_rank_state(folder: str, rank: int, state: Dict[str, Any]) -> None:
    save_states(state, os.path.join(folder, rank_file(rank)))


def save(engine, save_dir: str, tag: str, client_state: Dict[str, Any], task_state: Optional[Dict[str, Any]] = None,
         latest: bool = True, keep_last: int = 0, model: Optional[torch.nn.Module] = None,
         step: Optional[int] = None, config: Optional[Dict[str, Any]] = None,
         marker_extra: Optional[Dict[str, Any]] = None) -> str:
    """Collective: every rank calls it.  ``task_state``: this rank's own state beyond the model (e.g. the
    Transformer-XL memory); ``config``: the run's resolved configuration, kept in the marker; ``marker_extra``:
    more marker fields (``imported``: weights without optimizer, scheduler or data position, see `load`).
    Returns the checkpoint folder (complete when this returns).  ``client_state["model_config"]`` goes into the
    marker, the one place a checkpoint records its model config, not into DeepSpeed's model file."""
    client_state = dict(client_state)
    model_config = client_state.pop("model_config", None)
    rank = _rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    tmp_tag = TMP_PREFIX + tag
    tmp = os.path.join(save_dir, tmp_tag)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        clear_leftovers(save_dir)
    _barrier()
    error = None
    try:
        engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
        write_rank_state(tmp, rank, {"rng": rng_state(), "task": _to_cpu(task_state),
                                     "buffers": module_buffers(model) if model is not None else None})
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if not isinstance(e, OSError) and not _failed_write(e, save_dir):
            raise
        error = e
    _agree_on_write(error, step, tmp, save_dir)
    _barrier()
    files, mine, error = {}, {}, None
    try:
        files = list_files(tmp)  # every rank hashes (and syncs) its share of the files: the reading is split
        mine = digests(tmp, list(files), (rank, world))
        for name in mine:
            fsync_file(os.path.join(tmp, name))
    except OSError as e:
        error = e
    _agree_on_write(error, step, tmp, save_dir)
    shares = [None] * world
    if world > 1:
        dist.all_gather_object(shares, mine)
    else:
        shares = [mine]
    error = None
    try:
        if rank == 0:
            _finish_save(save_dir, tag, tmp, files, shares, world, step, model_config, config, marker_extra, latest)
    except (OSError, CheckpointError) as e:
        error = e
    _agree_on_write(error, step, tmp, save_dir)
    _barrier()
    if rank == 0 and keep_last > 0:
        prune(save_dir, keep_last)
    return os.path.join(save_dir, tag)


# what torch.save's C++ writer says when a write fails (measured on a full tmpfs: "basic_ios::clear: iostream
# error", then "unexpected pos N vs M" from the zip writer's end-of-file)
_WRITE_FAILURES = ("writ", "iostream error", "unexpected pos", "no space left", "disk quota")


def _failed_write(e: RuntimeError, folder: str) -> bool:
    """Whether torch.save's RuntimeError is a failed write (its words, or a file system with no room left)."""
    text = " ".join(str(x) for x in (e, e.__context__) if x is not None).lower()
    if any(w in text for w in _WRITE_FAILURES):
        return True
    try:
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize < (1 << 20)
    except OSError:
        return False


def _reason(error: BaseException, folder: str) -> str:
    """The cause of a failed write in a few words: the OSError's, or for torch.save's RuntimeError the state of the
    file system (a full one is named as such) and torch's first line."""
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {first}"
    try:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if free is not None and free < (1 << 20):
        return f"No space left on device: {free // 1024} KiB free; torch.save: {first}"
    return f"torch.save: {first}"


def _agree_on_write(error: Optional[BaseException], step, tmp: str, save_dir: str) -> None:
    """Collective: if a write failed on any rank, every rank raises one `CheckpointError` (the failing rank with
    its own reason), so that no rank goes on into a collective its peers left."""
    from ..parallel import any_rank

    if not any_rank(error is not None):
        return
    reason = (_reason(error, save_dir) if error is not None and not isinstance(error, CheckpointError)
              else "a write failed on another rank")
    if _rank() == 0:  # the partial save goes: a full disk gets its space back, the last complete save stays
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(error, CheckpointError):
        raise error
    raise CheckpointError(f"saving step {step} to {tmp} failed ({reason}): free space or give --save a folder you "
                          f"can write to; the last complete checkpoint is {_last_complete(save_dir)}")


def _finish_save(save_dir, tag, tmp, files, shares, world, step, model_config, config, marker_extra, latest) -> None:
    """Rank 0: the marker, the rename into place and ``latest`` (see the module's protocol, steps 2 and 3)."""
    missing = [rank_file(r) for r in range(world) if rank_file(r) not in files]
    if missing:
        raise CheckpointError(f"save of {tag} in {save_dir} lacks {missing[0]}: the folder is not shared by all "
                              f"ranks; give --save a folder on a file system every node sees")
    sha = {name: d for share in shares for name, d in share.items()}
    marker = {"tag": tag, "step": step, "world_size": world, "files": files, "sha256": sha,
              "model_config": model_config, "config": config, **(marker_extra or {})}
    write_atomic(os.path.join(tmp, MARKER), json.dumps(marker, indent=1, default=str))
    fsync_dir(tmp)
    final = os.path.join(save_dir, tag)
    if os.path.exists(final):
        old = os.path.join(save_dir, OLD_PREFIX + tag)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(save_dir)
    if latest:
        write_atomic(os.path.join(save_dir, "latest"), tag)


def clear_leftovers(save_dir: str) -> None:
    """Remove the folders of saves that were killed (``.tmp_*``: never complete, never loaded).  An ``.old_X`` is the
    previous complete ``X`` during its replacement: it goes back to ``X`` if the save was killed before the new
    ``X`` was in place (so a tag such as ``best`` never disappears), and is removed otherwise."""
    for name in os.listdir(save_dir):
        full = os.path.join(save_dir, name)
        if not os.path.isdir(full):
            continue
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(full, ignore_errors=True)
        elif name.startswith(OLD_PREFIX):
            final = os.path.join(save_dir, name[len(OLD_PREFIX):])
            if os.path.exists(final):
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.replace(full, final)


def _last_complete(save_dir: str) -> str:
    tag = read_latest(save_dir)
    return os.path.join(save_dir, tag) if tag else "none yet"


def _to_cpu(state):
    if torch.is_tensor(state):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return state


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


def _moe_settings(record: Dict[str, Any]) -> Dict[str, Any]:
    """Every MoE setting of a model-config record, the ones it does not give at their defaults
    (`MoEConfig.from_settings`); its keys that are no MoEConfig setting (a ViTConfig's SoftMoE keys) as they are,
    retired keys left out."""
    from ..moe.config import MoEConfig

    moe = {k: v for k, v in (record.get("moe") or {}).items() if k not in MoEConfig.RETIRED}
    names = MoEConfig.setting_names()
    given = MoEConfig.from_settings({k: v for k, v in moe.items() if k in names})
    return {**given.all_settings(), **{k: v for k, v in moe.items() if k not in names}}


def _flag(section: str, key: str) -> str:
    """The command-line flag of a model or MoE config field (what a message should name, not the field)."""
    from ..models import ModelConfig
    from ..moe.config import MoEConfig

    cls = MoEConfig if section == "moe" else ModelConfig
    return cls.FLAGS.get(key, ("--" + key.replace("_", "-"),))[0]


def check_architecture(saved: Optional[Dict[str, Any]], current: Dict[str, Any], where: str) -> None:
    """The checkpoint's model config must describe the model this run builds: every field must match except
    those in ``MAY_CHANGE_ON_RESUME`` / ``MOE_MAY_CHANGE_ON_RESUME``.  One line naming the first difference."""
    if not saved:
        return
    for key in sorted(set(saved) | set(current)):
        if key == "moe" or key in MAY_CHANGE_ON_RESUME:
            continue
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if key == "vocab_size":
            raise CheckpointError(f"{where} was saved with a vocabulary of {a} tokens, this run's data has {b}: use "
                                  f"the tokenizer (--data-path / --vocab-size) of the run that saved it")
        raise CheckpointError(f"{where} was saved from a model with {_flag('model', key)} {a!r} ({key}), this run "
                              f"has {b!r}: use the same model flags as the run that saved it")
    sm, cm = _moe_settings(saved), _moe_settings(current)
    if sm.get("router") == "dense" and cm.get("router") == "dense":
        return
    for key in sorted(set(sm) | set(cm)):
        if key in MOE_MAY_CHANGE_ON_RESUME or sm.get(key) == cm.get(key):
            continue
        if key == "ep_size":
            raise CheckpointError(f"{where} was saved at expert-parallel size {sm[key]}, this run has {cm[key]}: "
                                  f"convert it with tools/reshard_checkpoint.py --ep-size {cm[key]}, or resume with "
                                  f"--moe-expert-parallel-size {sm[key]}")
        raise CheckpointError(f"{where} was saved from a model with {_flag('moe', key)} {sm.get(key)!r} (moe.{key}), "
                              f"this run has {cm.get(key)!r}: use the same MoE flags as the run that saved it")


def check_expert_files(load_dir: str, tag: str, model: torch.nn.Module) -> None:
    """Every expert of every MoE layer has its DeepSpeed file (named by global expert id) in the checkpoint."""
    from deepspeed.moe.layer import MoE

    path = os.path.join(load_dir, tag)
    moe_id = 0
    for module in model.modules():
        if isinstance(module, MoE):
            for e in range(module.num_experts):
                name = expert_file(moe_id, e)
                if not os.path.isfile(os.path.join(path, name)):
                    raise CheckpointError(f"checkpoint {path} lacks the file of expert {e} of MoE layer {moe_id} "
                                          f"({name}): it was saved with fewer experts or is damaged; load another tag")
            moe_id += 1


def load(engine, load_dir: str, tag: Optional[str] = None, resume: bool = True,
         model: Optional[torch.nn.Module] = None, model_config: Optional[Dict[str, Any]] = None):
    """Verify, then load model (and with ``resume`` optimizer, scheduler, RNG, this rank's buffers) from
    ``load_dir`` (``tag`` None: latest).  Returns (client_state, this rank's task state or None)."""
    load_dir, tag = resolve(load_dir, tag)
    marker = verify(load_dir, tag, checksums=False)  # sizes; the loop verifies the checksums, split over the ranks
    use_safe_loading(engine)  # DeepSpeed's files are read without unpickling code (states.py)
    if model_config is not None:
        check_architecture(marker.get("model_config"), model_config, f"checkpoint {os.path.join(load_dir, tag)}")
    if model is not None:
        check_expert_files(load_dir, tag, model)
    if marker.get("imported"):  # tools/convert_hf.py: weights only; optimizer, lr schedule and data start fresh
        if resume and _rank() == 0:
            print(f"notice: {os.path.join(load_dir, tag)} was imported ({marker['imported'].get('format', 'hf')} "
                  f"checkpoint {marker['imported'].get('source')}): the model weights are loaded, the optimizer, "
                  f"lr schedule and data order start fresh at step 0", flush=True)
        path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_module_only=True,
                                                    load_optimizer_states=False, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no loadable checkpoint in {load_dir} (tag {tag}): load another tag")
        return {k: v for k, v in (client_state or {}).items() if k != "data"}, None
    fresh_optimizer = resume and bool(marker.get("resharded"))  # tools/reshard_checkpoint.py: no optimizer files
    if fresh_optimizer and _rank() == 0:
        print(f"notice: {os.path.join(load_dir, tag)} was resharded (tools/reshard_checkpoint.py): model weights, "
              f"step, lr schedule and data position are loaded, the optimizer starts fresh", flush=True)
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=resume and not fresh_optimizer,
                                                load_lr_scheduler_states=resume)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no loadable checkpoint in {load_dir} (tag {tag}): load another tag")
    task_state = None
    extra = os.path.join(load_dir, tag, rank_file(_rank()))
    if resume and os.path.isfile(extra):
        state = read_states(extra)
        if state.get("rng") is not None:  # a resharded checkpoint's extra ranks keep the driver's seeding
            set_rng_state(state["rng"])
        task_state = state.get("task")
        if model is not None and state.get("buffers"):
            own = dict(model.named_buffers())
            with torch.no_grad():
                for name, value in state["buffers"].items():
                    if name in own:
                        own[name].copy_(value.to(own[name].device))
    return client_state or {}, task_state


__all__ = ["BEST", "MARKER", "CheckpointError", "save", "load", "prune", "verify", "resolve", "step_tags",
           "check_architecture", "check_expert_files", "module_buffers", "rng_state", "set_rng_state"]
