"""Cleaning DeepSpeed's /dev/shm buffers after a run must not remove those of a run still live beside it (a
parallel sweep, another pytest-xdist worker): a rank whose peer's buffer disappears waits for it forever."""
import os
import subprocess
import sys
import uuid

import pytest

from vqmoe_ds.training.launch import remove_new_shm, shm_files

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm") or not os.path.isdir("/proc/self/fd"),
                                reason="needs Linux /dev/shm and /proc")

# a process that holds `path` the way a rank holds its buffer: open (mode "fd") or mapped with the descriptor
# closed (mode "map"); it prints "ready" and waits for a line on stdin
HOLDER = r"""
import mmap, os, sys
path, mode = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, 4096) if mode == "map" else None
if mode == "map":
    os.close(fd)
print("ready", flush=True)
sys.stdin.readline()
"""


def _buffer(tag):
    path = f"/dev/shm/deepspeed_allreduce_buffer_test_{uuid.uuid4().hex}_{tag}"
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    return path


@pytest.mark.parametrize("mode", ["fd", "map"])
def test_a_buffer_another_process_holds_is_kept_until_it_ends(mode):
    before = shm_files()
    held, orphan = _buffer("held"), _buffer("orphan")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, held, mode], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        gone = remove_new_shm(before)
        assert orphan in gone and not os.path.exists(orphan)
        assert held not in gone and os.path.exists(held)
    finally:
        holder.communicate("\n", timeout=30)
    try:
        assert held in remove_new_shm(before) and not os.path.exists(held)
    finally:
        for p in (held, orphan):
            if os.path.exists(p):
                os.remove(p)


def test_files_there_before_are_never_touched():
    old = _buffer("old")
    try:
        before = shm_files()
        new = _buffer("new")
        assert new in remove_new_shm(before)
        assert os.path.exists(old) and not os.path.exists(new)
    finally:
        os.remove(old)
