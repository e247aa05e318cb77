"""Starting the driver on several local processes (the demo, tests, benchmarks) and cleaning up after the
launchers: ``torchrun`` leaves ``torchelastic_*`` folders in ``$TMPDIR``, the ``deepspeed`` launcher leaves
``/dev/shm/deepspeed_*`` buffers (66 MiB per rank per run)."""
from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence

from ..parallel import free_port  # noqa: F401  (re-exported for the scripts and tests)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = os.path.join(ROOT, "pretrain_vqmoe.py")


def bin_path(name: str) -> str:
    """A console script of this Python's environment (torchrun, deepspeed), else the one on PATH."""
    cand = os.path.join(os.path.dirname(sys.executable), name)
    return cand if os.path.exists(cand) else (shutil.which(name) or name)


def env_for_ranks(tmpdir: Optional[str] = None, threads: int = 1) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if tmpdir:
        env["TMPDIR"] = tmpdir
    return env


def torchrun_cmd(nproc: int, args: Sequence[str], port: int, script: str = DRIVER) -> List[str]:
    return [bin_path("torchrun"), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
            script, *args]


def shm_files() -> set:
    """DeepSpeed's CPU all-reduce buffers, ``deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}``."""
    return set(glob.glob("/dev/shm/deepspeed_*"))


def shm_in_use() -> set:
    """The /dev/shm files some live process holds open or mapped (read from /proc; empty where there is none).

    Open descriptors are read before mappings: a rank creates its buffer open, maps it, then may close the
    descriptor, so a file in use is seen in one of the two whichever moment it is read."""
    held = set()
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # the process ended, or is not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:  # closed meanwhile
                continue
            if target.startswith("/dev/shm/"):
                held.add(target)
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                held.update(line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line)
        except (OSError, IndexError):
            continue
    return held


def remove_new_shm(before: set) -> List[str]:
    """Remove the /dev/shm/deepspeed_* files that appeared since ``before`` and that no live process holds.

    Other runs may be live beside this one (a parallel sweep, pytest-xdist workers): a rank whose peer's buffer
    disappears waits for it forever, so a file still open or mapped anywhere is left to its own run's cleanup."""
    gone = []
    new = shm_files() - before
    if not new:
        return gone
    held = shm_in_use()
    for f in sorted(new - held):
        try:
            os.remove(f)
            gone.append(f)
        except OSError:
            pass
    return gone


def run_tool(fn, args, errors) -> int:
    """A command-line tool's body: ``fn(args)``; a bad input (one of ``errors``) prints one ``error:`` line and
    gives exit status 2; any process group the tool opened to load a checkpoint is closed either way."""
    from ..parallel import shutdown

    try:
        fn(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown(clean=False)
    return 0
