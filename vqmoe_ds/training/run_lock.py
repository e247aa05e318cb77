"""One run per ``--out-dir`` at a time: ``OUT_DIR/.lock``, held with ``fcntl.flock`` by rank 0 for the run's life.

Two runs started into one folder at once would both pass the "is this folder free" check, then write over each
other's logs and checkpoints (and ``--overwrite`` would delete the other's).  The lock is the kernel's: it is
released when the holder exits however it exits (``kill -9`` included), so a lock file left by a dead run is
recognised as stale and taken over with a notice, and there is no stale-lock guessing by pid.  The file records
the holder (host, pid, start time) so that a refusal names it.  On a shared file system the lock is as good as the
file system's ``flock`` (NFSv4 and Lustre with ``flock`` mount support it).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Optional

from ..cli import ConfigError

LOCK_FILE = ".lock"


class RunLockError(ConfigError):
    """The folder is in use by another run; one line naming it and the fix (a bad input: exit status 2)."""


class RunLock:
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_FILE)
        self.fd: Optional[int] = None
        self.taken_over: Optional[str] = None  # the holder a stale lock file named, if there was one

    @staticmethod
    def holder(path: str) -> str:
        try:
            with open(path) as f:
                info = json.load(f)
            return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def acquire(self) -> "RunLock":
        """Take the lock or raise `RunLockError`.  ``taken_over`` names the dead holder of a stale lock file."""
        os.makedirs(self.out_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockError(f"{self.out_dir} is in use by another run ({self.holder(self.path)}; lock "
                                   f"{self.path}): wait for it to end or give another --out-dir") from None
            raise
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            self.taken_over = self.holder(self.path)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

