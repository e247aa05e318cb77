"""Known harmless output of the libraries underneath, filtered where it arises, so that a run prints our lines.

Each filter matches one message exactly and is installed only around the call that produces it (or, for a
warning raised at every step, for that one message), so anything else the libraries say still shows:

* DeepSpeed's ``WarmupCosineLR`` (a ds_config's scheduler block) logs "Attempting to get learning rate from
  scheduler before it has started" from its constructor (inside ``deepspeed.initialize``, once per rank): it
  builds the schedule at iteration -1 and asks it for a learning rate.  ``training.lr_schedule.start_lr_schedule`` moves the schedule to its first
  iteration before any step, so the 0 it answers is never used.
* DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" on every rank when
  ``deepspeed.init_distributed`` loads its CPU shared-memory collectives (``deepspeed/comm/torch.py``), and
  "No existing process group found, creating a new group named: ep_size_N" on every rank when an MoE layer's
  expert-parallel group is created (``deepspeed/moe/layer.py``): both are the expected set-up.
* torch 2.13 deprecates ``torch.distributed.all_gather_into_tensor`` (FutureWarning, once per rank), which
  DeepSpeed's ZeRO 1/2 optimizer step calls (``deepspeed/runtime/utils.py: all_gather_into_tensor_dp_groups``);
  nothing for us to change, and the call still works.
* megatron-core warns four times at import that Transformer Engine and Apex are not installed: we use only its
  indexed dataset format, which needs neither (``vqmoe_ds.data.token_stream.indexed_dataset``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from typing import Iterator, Sequence

UNSTARTED_SCHEDULE = "Attempting to get learning rate from scheduler before it has started"
SHM_BUILT = "deepspeed_shm_comm_op built successfully"
EP_GROUP_CREATED = "No existing process group found, creating a new group named"
GATHER_DEPRECATED = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
NO_TE_APEX = "Transformer Engine and Apex are not installed"


class _DropMessages(logging.Filter):
    def __init__(self, texts: Sequence[str]):
        super().__init__()
        self.texts = tuple(texts)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(t in msg for t in self.texts)


@contextlib.contextmanager
def stdout_without(*texts: str) -> Iterator[None]:
    """Inside the block, lines printed to ``sys.stdout`` that contain one of ``texts`` are dropped; every other
    line is printed as it was, when the block ends."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        kept = [ln for ln in buf.getvalue().splitlines(keepends=True) if not any(t in ln for t in texts)]
        if kept:
            sys.stdout.write("".join(kept))
            sys.stdout.flush()


@contextlib.contextmanager
def deepspeed_logger_without(*texts: str) -> Iterator[None]:
    """Inside the block, DeepSpeed's logger drops records containing one of ``texts``."""
    from deepspeed.utils import logger

    f = _DropMessages(texts)
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


@contextlib.contextmanager
def engine_start() -> Iterator[None]:
    """Around ``deepspeed.initialize``: its known set-up messages dropped, and from here on torch's
    deprecation of the all-gather DeepSpeed's ZeRO step uses."""
    warnings.filterwarnings("ignore", message=GATHER_DEPRECATED, category=FutureWarning)
    with deepspeed_logger_without(UNSTARTED_SCHEDULE), stdout_without(EP_GROUP_CREATED):
        yield
