"""Checkpoints: DeepSpeed's ``save_checkpoint``/``load_checkpoint`` (model, optimizer, scheduler; one file
per expert) plus what a resume needs beyond them.

  * ``client_state`` (saved once, by DeepSpeed's rank 0): step, the data position, best validation loss,
    the run's config;
  * ``rank{r}_state.pt`` beside DeepSpeed's files, one per rank: the RNG states of python, numpy and torch
    of that rank and, for Transformer-XL, that rank's memory -- they differ between ranks, so they cannot
    live in the single client_state.

Tags: ``step{N}`` for regular saves (DeepSpeed's ``latest`` file points at the newest), ``best`` for the best
validation loss (never ``latest``).  ``--load DIR`` resumes from ``DIR/latest``.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

BEST = "best"


def rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save(engine, save_dir: str, tag: str, client_state: Dict[str, Any], mems: Optional[List[torch.Tensor]] = None,
         latest: bool = True) -> str:
    """Collective: every rank calls it.  Returns the checkpoint folder."""
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=latest)
    path = os.path.join(save_dir, tag)
    torch.save({"rng": rng_state(), "mems": mems}, os.path.join(path, f"rank{_rank()}_state.pt"))
    if dist.is_initialized():
        dist.barrier()
    return path


def load(engine, load_dir: str, tag: Optional[str] = None, resume: bool = True
         ) -> Tuple[Dict[str, Any], Optional[List[torch.Tensor]]]:
    """Load model (and with ``resume`` optimizer, scheduler, RNG) from ``load_dir`` (``tag`` None: latest).
    Returns (client_state, this rank's TXL memory or None)."""
    if tag is None and not os.path.isfile(os.path.join(load_dir, "latest")):
        raise FileNotFoundError(f"no checkpoint in {load_dir} (no 'latest' file): give the --save folder of a run "
                                f"that saved (--save-interval) or start without --load")
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=resume,
                                                load_lr_scheduler_states=resume)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no loadable checkpoint in {load_dir} (tag {tag or 'latest'})")
    mems = None
    extra = os.path.join(os.path.dirname(path) if os.path.isfile(path) else path, f"rank{_rank()}_state.pt")
    if not os.path.isfile(extra):  # path may be the model-states file or the tag folder
        extra = os.path.join(load_dir, tag or open(os.path.join(load_dir, "latest")).read().strip(),
                             f"rank{_rank()}_state.pt")
    if resume and os.path.isfile(extra):
        state = torch.load(extra, weights_only=False)
        set_rng_state(state["rng"])
        mems = state["mems"]
    return client_state or {}, mems
