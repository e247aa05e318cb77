"""Reading checkpoint files without running code: every ``.pt`` file of a checkpoint (DeepSpeed's model, expert
and optimizer states, our per-rank states) is read here and only here.

A ``.pt`` file is a pickle, and a pickle can name any Python callable to run while it loads.  A checkpoint folder
received from someone else must not be able to do that, so files are read with ``torch.load(weights_only=True)``:
tensors, containers, numbers and strings, plus exactly the globals in `ALLOWED_GLOBALS` -- the few that DeepSpeed
0.19.8's files really hold (found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` over fp32/bf16
checkpoints at ZeRO 0, 1 and 2, GPT and Transformer-XL) and numpy's array reconstruction, which the per-rank
states of this project's earlier format hold (an ndarray is rebuilt by numpy's C code; a global inside an object
array is checked like any other).  A file naming any other global is refused with one line naming the file and
the global; nothing in it runs.

DeepSpeed's engine reads its files through its ``checkpoint_engine`` (``TorchCheckpointEngine.load`` unpickles
with ``weights_only=False``); `use_safe_loading` wraps an engine's checkpoint engine so that its loads come here
too, while its saves stay DeepSpeed's.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from .layout import CheckpointError


def _allowed() -> Dict[str, Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        # DeepSpeed's ZeRO 1/2 and bf16 optimizer states: the loss scaler (plain attributes), the ZeRO stage (an
        # int enum) and the flat-partition address of each parameter (a dataclass)
        "deepspeed.runtime.fp16.loss_scaler.LossScaler": LossScaler,
        "deepspeed.runtime.zero.config.ZeroStageEnum": ZeroStageEnum,
        "deepspeed.utils.tensor_fragment.fragment_address": fragment_address,
        # numpy arrays (the numpy RNG state of rank files written by the earlier format)
        "numpy._core.multiarray._reconstruct": _reconstruct,
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
        # the numeric dtypes an array is rebuilt with (never the object dtype)
        **{f"numpy.dtypes.{type(np.dtype(t)).__name__}": type(np.dtype(t))
           for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                     "float32", "float64")},
    }


ALLOWED_GLOBALS = _allowed()
# for torch.load: the objects, and numpy's reconstruction under the name numpy 1.x pickles it by
_SAFE = list(ALLOWED_GLOBALS.values()) + [(ALLOWED_GLOBALS["numpy._core.multiarray._reconstruct"],
                                           "numpy.core.multiarray._reconstruct")]
_UNSUPPORTED = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)")


def _refuse(path: str, name: str) -> CheckpointError:
    return CheckpointError(f"{path} holds the Python object {name}, which no checkpoint of vqmoe-ds holds: refused "
                           f"without running it (a .pt file can carry code); load checkpoints only from people you "
                           f"trust, or ask for a safetensors / Hugging Face export")


def foreign_globals(path: str) -> list:
    """The globals a (zip-format) ``.pt`` file names beyond torch's defaults and `ALLOWED_GLOBALS`, found by
    reading its pickle without running it."""
    if not zipfile.is_zipfile(path):
        return []
    # numpy 1.x names the array reconstruction numpy.core.multiarray._reconstruct
    return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if g.replace("numpy.core.", "numpy._core.") not in ALLOWED_GLOBALS]


def read_states(path: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """The object saved in checkpoint file ``path``, read with ``weights_only=True`` and `ALLOWED_GLOBALS`.
    Raises `CheckpointError` (one line) when the file names another global, or cannot be read."""
    bad = None
    try:
        bad = foreign_globals(path)
    except (OSError, RuntimeError, pickle.UnpicklingError, ValueError):  # unreadable: torch.load below says why
        bad = None
    if bad:
        raise _refuse(path, bad[0])
    try:
        with torch.serialization.safe_globals(_SAFE):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = _UNSUPPORTED.search(str(e))
        if m:
            raise _refuse(path, m.group(1)) from None
        raise CheckpointError(f"{path} cannot be read ({_first_line(e)}): restore it from the run's save folder "
                              f"or load another tag") from None
    except (OSError, EOFError, RuntimeError, ValueError) as e:  # missing, truncated, not a torch file
        raise CheckpointError(f"{path} cannot be read ({_first_line(e)}): restore it from the run's save folder or "
                              f"load another tag") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


class SafeCheckpointEngine(CheckpointEngine):
    """An engine's checkpoint engine with its ``load`` replaced by `read_states`; saving, commit and the rest are
    the wrapped engine's."""

    def __init__(self, inner: CheckpointEngine):
        self.inner = inner
        self.name = f"safe({getattr(inner, 'name', type(inner).__name__)})"

    def load(self, path: str, map_location: Optional[Callable] = None):
        return read_states(path, map_location=map_location if map_location is not None else "cpu")

    def create(self, info):
        return self.inner.create(info)

    def save(self, state_dict, path: str):
        return self.inner.save(state_dict, path)

    def commit(self, info):
        return self.inner.commit(info)

    def makedirs(self, path, exist_ok=False):
        return self.inner.makedirs(path, exist_ok=exist_ok)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self):
        return self.inner.is_decoupled()

    def set_commit_info(self, info):
        return self.inner.set_commit_info(info)

    def get_commit_info(self):
        return self.inner.get_commit_info()

    def cleanup(self):
        return self.inner.cleanup()

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()

    def __getattr__(self, name):  # engine-specific attributes (e.g. a writer's config)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def check_files(load_dir: str, tag: str, marker: Dict[str, Any], share=(0, 1)) -> None:
    """Refuse checkpoint ``tag`` if one of its ``.pt`` files (of this rank's ``share`` = (rank, world): file i of
    the sorted names when i % world == rank) names a global beyond `ALLOWED_GLOBALS`, before anything loads it:
    every rank of a job learns of it at the same point, whichever rank's expert file it is."""
    rank, world = share
    path = os.path.join(load_dir, tag)
    names = sorted(n for n in marker.get("files", {}) if n.endswith(".pt"))
    for i, name in enumerate(names):
        if i % world == rank:
            try:
                bad = foreign_globals(os.path.join(path, name))
            except (OSError, RuntimeError, pickle.UnpicklingError, ValueError) as e:
                raise CheckpointError(f"{os.path.join(path, name)} cannot be read ({_first_line(e)}): restore it "
                                      f"from the run's save folder or load another tag") from None
            if bad:
                raise _refuse(os.path.join(path, name), bad[0])


def use_safe_loading(engine) -> Any:
    """Make ``engine.load_checkpoint`` read its files with `read_states` (idempotent); returns the engine."""
    current = getattr(engine, "checkpoint_engine", None)
    if current is not None and not isinstance(current, SafeCheckpointEngine):
        engine.checkpoint_engine = SafeCheckpointEngine(current)
    return engine


def save_states(state: Any, path: str) -> None:
    """Write a file `read_states` reads back (torch's zip format)."""
    torch.save(state, path)


__all__ = ["ALLOWED_GLOBALS", "SafeCheckpointEngine", "check_files", "foreign_globals", "read_states", "save_states",
           "use_safe_loading"]

