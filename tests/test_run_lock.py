"""One run per --out-dir: a second run started into the folder of a live one stops with one line naming the holder
(even with --overwrite, which would delete the live run's files), and the live run finishes untouched; a lock
file left by a dead run is taken over with a notice; the lock goes with the run however it ends."""
import json
import os
import subprocess
import sys
import time

from vqmoe_ds.training.launch import DRIVER, ROOT, env_for_ranks, free_port, remove_new_shm, shm_files
from vqmoe_ds.training.run_lock import LOCK_FILE, RunLock

BASE = ["--corpus-bytes", "60000", "--eval-iters", "1", "--test-iters", "1", "--no-progress", "--no-plots",
        "--seq-length", "32", "--router", "topk"]


def _lm(*argv):
    from vqmoe_ds.training.lm import main

    return main([*BASE, *argv])


def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    env = env_for_ranks(str(tmp_path))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    before = shm_files()
    first = subprocess.Popen([sys.executable, DRIVER, *BASE, "--train-iters", "400", "--out-dir", str(out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[1][-3000:]
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid
        rc = _lm("--train-iters", "2", "--out-dir", str(out), "--overwrite")
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(lines) == 1, err[-3000:]
        assert f"{out} is in use by another run (pid {first.pid} on host " in lines[0], lines[0]
        assert "give another --out-dir" in lines[0]
        assert first.poll() is None  # the live run was not disturbed ...
        _, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
        remove_new_shm(before)
    assert first.returncode == 0, stderr[-3000:]  # ... and finished with its files intact
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 400
    assert not (out / LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_FILE).write_text(json.dumps({"host": "somehost", "pid": int(dead.stdout), "started": "then"}))
    assert _lm("--train-iters", "2", "--out-dir", str(out)) == 0
    text = capsys.readouterr().out
    notices = [line for line in text.splitlines() if line.startswith("notice:") and LOCK_FILE in line]
    assert len(notices) == 1 and f"pid {int(dead.stdout)} on host somehost" in notices[0], text[-2000:]
    assert "takes it over" in notices[0]
    assert not (out / LOCK_FILE).exists()


def test_the_lock_goes_with_a_run_that_fails(tmp_path, capsys):
    out = tmp_path / "run"
    # a bad input found after the lock is taken (a --load folder without a checkpoint)
    (tmp_path / "empty").mkdir()
    assert _lm("--train-iters", "2", "--out-dir", str(out), "--load", str(tmp_path / "empty")) == 2
    assert not (out / LOCK_FILE).exists()
    from dist_helper import clear_deepspeed_groups

    clear_deepspeed_groups()
    assert _lm("--train-iters", "2", "--out-dir", str(out)) == 0


def test_the_lock_is_exclusive_between_open_files(tmp_path):
    """flock excludes a second holder even in the same process (the second run above is in-process)."""
    a = RunLock(str(tmp_path)).acquire()
    try:
        from vqmoe_ds.training.run_lock import RunLockError

        try:
            RunLock(str(tmp_path)).acquire()
            raise AssertionError("a second lock was granted")
        except RunLockError as e:
            assert f"pid {os.getpid()}" in str(e)
    finally:
        a.release()
    RunLock(str(tmp_path)).acquire().release()
