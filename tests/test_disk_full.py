"""A full disk: a save that does not fit, an ``--out-dir`` with no room at all, and a log write that fails mid-run
each stop the run with one ``error:`` line and exit status 3, no traceback, and the last complete checkpoint
intact and loadable.  Real full disks on a small tmpfs (needs root and ``mount``; skipped otherwise), the log
write by fault injection (a log file whose writes fail with ENOSPC after a few records)."""
import errno
import json
import os
import subprocess

import pytest
from dist_helper import clear_deepspeed_groups

from vqmoe_ds import checkpoint as ckpt

BASE = ["--corpus-bytes", "60000", "--eval-iters", "1", "--test-iters", "1", "--no-progress", "--no-plots",
        "--seq-length", "32", "--eval-interval", "0", "--keep-last", "5", "--router", "topk"]


def _lm(*argv):
    from vqmoe_ds.training.lm import main

    return main([*BASE, *argv])


@pytest.fixture
def tmpfs(tmp_path):
    """A 12 MiB tmpfs at tmp_path/disk, and a function that leaves ``free`` bytes on it (a ballast file)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")

    def leave(free: int) -> None:
        st = os.statvfs(mnt)
        have = st.f_bavail * st.f_frsize
        with open(mnt / "ballast", "wb") as f:
            f.write(b"\0" * max(0, have - free))

    try:
        yield mnt, leave
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _one_error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def test_a_save_that_does_not_fit_keeps_the_last_checkpoint(tmp_path, tmpfs, capsys):
    mnt, leave = tmpfs
    # the size of one checkpoint of this model, measured on the real disk
    assert _lm("--train-iters", "1", "--save-interval", "1", "--out-dir", str(tmp_path / "probe")) == 0
    capsys.readouterr()
    clear_deepspeed_groups()  # the probe run's groups went with its process group
    one = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "probe" / "checkpoints" / "step1")
              for f in fs)
    leave(int(1.6 * one) + 256 * 1024)  # room for the run's files and one checkpoint, not two
    out = mnt / "run"
    rc = _lm("--train-iters", "4", "--save-interval", "1", "--out-dir", str(out))
    line = _one_error(capsys)
    assert rc == 3
    assert "saving step 2" in line and "No space left on device" in line and "free space" in line, line
    assert line.endswith(f"the last complete checkpoint is {out / 'checkpoints' / 'step1'}"), line
    saved = out / "checkpoints"
    assert (saved / "latest").read_text() == "step1"
    ckpt.verify(str(saved), "step1")  # every file present, at its size and checksum
    assert not [n for n in os.listdir(saved) if n.startswith(".tmp_")]  # the partial save gave its space back
    assert not (out / ".lock").exists()


def test_an_out_dir_on_a_full_disk_is_one_line(tmp_path, tmpfs, capsys):
    mnt, leave = tmpfs
    leave(0)
    rc = _lm("--train-iters", "2", "--out-dir", str(mnt / "run"))
    line = _one_error(capsys)
    assert rc == 3
    assert "No space left on device" in line and "nothing was trained" in line and "free space" in line, line


class _FullAfter:
    """A log file whose writes fail with ENOSPC after ``n`` records."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def write(self, text):
        if self.n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)
        self.n -= 1
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_log_write_that_fails_mid_run_stops_with_one_line(tmp_path, monkeypatch, capsys):
    from vqmoe_ds.training import run_log

    real_init = run_log.RunLog.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        if self.jsonl is not None:
            self.jsonl = _FullAfter(self.jsonl, 2)

    monkeypatch.setattr(run_log.RunLog, "__init__", init)
    out = tmp_path / "run"
    rc = _lm("--train-iters", "8", "--save-interval", "2", "--log-interval", "1", "--out-dir", str(out))
    line = _one_error(capsys)
    assert rc == 3
    assert f"writing {out / 'log.jsonl'} failed at step 3" in line and "No space left on device" in line, line
    assert line.endswith(f"the last complete checkpoint is {out / 'checkpoints' / 'step2'}"), line
    ckpt.verify(str(out / "checkpoints"), "step2")
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
