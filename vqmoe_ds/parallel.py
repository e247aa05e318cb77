"""Process-level parallel set-up: starting (``init_distributed``), expert-parallel groups outside a DeepSpeed
engine (tests, benchmarks, evaluation scripts), and ending (``shutdown``, ``exit_process``).

Inside training, ``deepspeed.initialize`` does this itself: it calls ``set_deepspeed_parallelism`` on every
``deepspeed.moe.layer.MoE``, which creates DeepSpeed's expert-parallel and expert-data-parallel groups.
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn


def setup_expert_parallel(model: nn.Module) -> nn.Module:
    """Create DeepSpeed's expert-parallel groups for every MoE layer of ``model`` (needs
    ``deepspeed.init_distributed()`` first) — what the engine does at initialisation."""
    from deepspeed.moe.layer import MoE

    from .quiet import EP_GROUP_CREATED, stdout_without

    with stdout_without(EP_GROUP_CREATED):  # DeepSpeed's per-rank print of the expected set-up (see quiet.py)
        for m in model.modules():
            if isinstance(m, MoE) and m.deepspeed_moe.ep_group is None:
                m.set_deepspeed_parallelism()
    return model


# --- process start ----------------------------------------------------------------------------------------
def extension_build_root() -> str:
    """Where torch builds JIT extensions (DeepSpeed's CPU shm comm op, our nearest-code kernel)."""
    import os

    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def clear_stale_extension_locks(root: Optional[str] = None, max_age_s: float = 600.0) -> List[str]:
    """Remove JIT-extension ``lock`` files older than ``max_age_s``; return their paths.

    torch's extension loader serialises builds with a ``lock`` file and waits, without a timeout, for it to
    disappear.  A process killed during the build or load (a pre-empted job, a Ctrl-C at start-up) leaves
    the file behind, and every later run on the machine then hangs before its first step (seen here after
    killing a test run).  A build holds the lock for about 30-60 s, so a lock older than 10 minutes has no
    owner.  Each removal is reported on stderr."""
    import glob
    import os
    import sys
    import time

    root = root or extension_build_root()
    removed = []
    if not os.path.isdir(root):
        return removed
    now = time.time()
    # $TORCH_EXTENSIONS_DIR/<ext>/lock, or <default root>/py311_cpu/<ext>/lock when the variable is unset
    for lock in sorted(glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))):
        try:
            age = now - os.path.getmtime(lock)
            if age > max_age_s:
                os.remove(lock)
                removed.append(lock)
                print(f"warning: removed {lock} ({age / 60:.0f} min old), left by a process killed while building "
                      f"or loading that extension", file=sys.stderr, flush=True)
        except OSError:  # no lock, or another rank removed it first
            continue
    return removed


# --- small collectives -------------------------------------------------------------------------------------
# Every collective outside the data path (loss and metric sums, agreement flags, log statistics) goes through
# these helpers, which put their tensors on the accelerator's current device: under NCCL a collective on a CPU
# tensor fails ("No backend type associated with device type cpu"), under gloo the device is the CPU anyway.
def all_reduce_sum(t, group=None):
    """``t`` summed over the ranks of ``group``, returned on the device ``t`` came from (in place when it is
    already on the communication device).  Nothing without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return t
    device = comm_device()
    moved = t.to(device) if t.device != device else t
    dist.all_reduce(moved, group=group)
    if moved is t:
        return t
    return moved.to(t.device)


def reduce_values(values, group=None):
    """A list of numbers summed over the ranks (float64 on the communication device); a list of floats back."""
    import torch

    return all_reduce_sum(torch.tensor(list(values), dtype=torch.float64, device=comm_device()), group).tolist()


def barrier(group=None) -> None:
    """Wait for every rank of ``group`` (nothing without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is true on any rank of ``group`` (one small all-reduce; nothing without a
    process group).  The tensor lives on the accelerator's current device, so the collective runs under NCCL
    as under gloo."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return flag  # no collective, no device round trip
    return bool(max_over_ranks(torch.tensor([1.0 if flag else 0.0], device=comm_device()), group).item())


def max_value(value: float, group=None) -> float:
    """The largest of one number over the ranks of ``group`` (the number itself without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    return float(max_over_ranks(torch.tensor([float(value)], dtype=torch.float64, device=comm_device()), group).item())


def max_over_ranks(t, group=None):
    """``t`` maxed element-wise over the ranks of ``group``, as a tensor on ``comm_device()``: nothing is read
    back to the host, so a caller can fetch it together with other values in one transfer."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return t
    t = t.to(comm_device(), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def comm_device():
    """The device the tensors of small collectives live on: the accelerator's current device (cuda:N under
    NCCL, cpu under gloo)."""
    import torch

    try:
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    except Exception:  # noqa: BLE001 -- DeepSpeed without an accelerator: the CPU
        return torch.device("cpu")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for single-machine rendezvous).

    Drawn below Linux's ephemeral range (32768-60999): a port the kernel handed out with ``bind(0)`` is one it
    may hand to the next outgoing connection (gloo's, mpirun's) before the rendezvous server listens on it."""
    import random
    import socket

    rng = random.Random()
    for _ in range(64):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process() -> None:
    """A one-process group for tools that run without a launcher (DeepSpeed's MoE layers need a group): the
    rendezvous variables torchrun would set, then ``init_distributed``.  Nothing when a group exists or a
    launcher (torchrun, mpirun) set the ranks."""
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed(auto_mpi_discovery=True)


# what MPI launchers (Open MPI, MPICH / Intel MPI, PMIx) put in each rank's environment
MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def init_distributed(**kwargs) -> None:
    """``deepspeed.init_distributed(**kwargs)`` (it picks NCCL on GPUs, gloo on CPUs, and reads mpirun's ranks
    through mpi4py when asked), after clearing stale extension locks that would hang its CPU comm-op load."""
    import os

    import deepspeed

    from .quiet import SHM_BUILT, stdout_without

    if not any(v in os.environ for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", *MPI_RANK_VARIABLES)):
        # a lone process (no launcher, no MPI): DeepSpeed's MPI discovery would take --distributed-port (29500), and
        # two such runs on one machine would collide on it; a one-process group can use any free port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    clear_stale_extension_locks()
    with stdout_without(SHM_BUILT):  # DeepSpeed prints it on every rank when its CPU comm op loads (quiet.py)
        deepspeed.init_distributed(**kwargs)
    bind_local_device()


def bind_local_device() -> None:
    """On an accelerator, make this rank's device (``LOCAL_RANK``, which the launcher or DeepSpeed's MPI discovery
    sets) the current one, as Megatron does right after start-up.  NCCL needs one device per rank, and the small
    collectives (``comm_device``) put their tensors on the current device: left at device 0, every rank of a node
    would use GPU 0 from its first collective until the DeepSpeed engine sets the device.  Nothing on the CPU."""
    import os

    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    local = os.environ.get("LOCAL_RANK")
    if acc.device_name() == "cpu" or local is None:
        return
    acc.set_device(int(local))


# --- a peer that died ----------------------------------------------------------------------------------------
def announce_alive(rank: int) -> None:
    """Mark this rank alive in the rendezvous store, so that survivors can name a rank that died."""
    import os

    import torch.distributed as dist

    try:
        dist.distributed_c10d._get_default_store().set(f"vqmoe/alive/{rank}", str(os.getpid()))
    except (RuntimeError, AttributeError, ValueError):  # a backend without a store (MPI): dead ranks are not named
        pass


def dead_ranks(rank: int, world: int, wait_s: float = 5.0) -> Optional[List[int]]:
    """After a failed collective: every survivor writes ``vqmoe/failed/{rank}`` and waits ``wait_s`` for the
    others; the ranks that never write are the dead ones.  None when the store is gone (it lives with rank 0
    or the launcher's agent)."""
    import time

    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"vqmoe/failed/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world) if not store.check([f"vqmoe/failed/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except (RuntimeError, AttributeError, ValueError):
        return None


def collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is the distributed backend reporting a dead or hung peer (not a bug of the program)."""
    names = {type(e).__name__} | {t.__name__ for t in type(e).__mro__}
    if names & {"DistBackendError", "DistNetworkError", "DistStoreError", "DistError"}:
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
        "Socket Timeout"))


# --- process end ------------------------------------------------------------------------------------------
# Why an entry point ends through ``exit_process`` and not ``sys.exit``: about 1 run in 30 of a 2-rank gloo job
# (measured: 1 of 30 runs of tests/workers/zero_step.py, and once in CI) died with SIGABRT, "terminate called
# without an active exception", after all its work and ``destroy_process_group()`` were done.  The core dump
# shows why: DeepSpeed keeps references to its expert groups, so the gloo ``ProcessGroup`` objects outlive
# ``destroy_process_group`` and their worker threads are still running while Python finalises.  A worker that
# is just then releasing its last finished collective (``AsyncBarrierWork`` -> ``AsyncAllgatherWork``) drops
# tensors owned by Python objects, needs the GIL to do so, and a thread that asks for the GIL during
# finalisation is ended by ``pthread_exit``; the forced unwind crosses a noexcept destructor and the C++
# runtime aborts.  Ending with ``os._exit`` once the group is torn down and the streams are flushed skips
# finalisation altogether, so the race cannot occur.
_JOINED = False  # this process was part of a process group (single-rank gloo runs included)


def shutdown(clean: bool = True) -> None:
    """Leave the process group: with ``clean`` (every rank got here) a barrier first, so no rank tears its
    group down while a peer still talks to it; then ``destroy_process_group``.  Nothing when no group."""
    global _JOINED
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _JOINED = True
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int):
    """End an entry point with status ``code``.  After a process group (see the note above): flush the
    standard streams and the logging handlers, finalise MPI if mpi4py started it, then ``os._exit``;
    otherwise a plain ``sys.exit``.  Files the run writes are closed by their owners before this
    (``RunLog.finish`` / ``close``)."""
    import logging
    import os
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        shutdown(clean=False)
    if not _JOINED:
        sys.exit(code)
    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun DeepSpeed reads the ranks through mpi4py, which
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():  # finalises MPI at exit only
        mpi.Finalize()  # otherwise mpirun reports the rank as "exiting improperly" and fails the job
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(code or 0))
