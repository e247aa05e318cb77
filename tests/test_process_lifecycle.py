"""How entry points start and end (vqmoe_ds.parallel): stale JIT-extension locks are cleared before
DeepSpeed loads its comm op; ``exit_process`` keeps the exit status and everything printed or logged, with and
without a process group."""
import os
import subprocess
import sys
import time

import pytest

from vqmoe_ds import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import logging, os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from vqmoe_ds.parallel import exit_process, shutdown
if {group}:
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo")
    import torch
    t = torch.ones(3)
    dist.all_reduce(t)
    assert dist.is_initialized()
logging.basicConfig(stream=open(sys.argv[2], "w"), level=logging.INFO, format="%(message)s")
logging.getLogger("x").info("logged line")
sys.stdout.write("unflushed stdout line")  # no newline, no flush: must still arrive
sys.stderr.write("stderr line")
exit_process(7)
print("not reached")
"""


@pytest.mark.parametrize("group", [True, False])
def test_exit_process_keeps_status_and_output(tmp_path, group):
    from dist_helper import free_port

    log = tmp_path / "log.txt"
    script = _SCRIPT.format(root=ROOT, group=group)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONUNBUFFERED", None)  # buffered streams, as under a launcher writing to a file
    r = subprocess.run([sys.executable, "-c", script, str(free_port()), str(log)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 7, r.stderr[-2000:]
    assert r.stdout == "unflushed stdout line"
    assert r.stderr.endswith("stderr line")
    assert log.read_text() == "logged line\n"


def test_exit_process_without_group_is_sys_exit(monkeypatch):
    monkeypatch.setattr(parallel, "_JOINED", False)
    with pytest.raises(SystemExit) as e:
        parallel.exit_process(5)
    assert e.value.code == 5


def test_stale_extension_locks_are_cleared_and_fresh_ones_kept(tmp_path, monkeypatch, capsys):
    for name, age_s in (("deepspeed_shm_comm", 3600), ("vqmoe_ds_nearest_code", 5), ("no_lock_here", None)):
        (tmp_path / name).mkdir()
        if age_s is not None:
            lock = tmp_path / name / "lock"
            lock.write_text("")
            os.utime(lock, (time.time() - age_s, time.time() - age_s))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    removed = parallel.clear_stale_extension_locks()
    assert removed == [str(tmp_path / "deepspeed_shm_comm" / "lock")]
    assert not (tmp_path / "deepspeed_shm_comm" / "lock").exists()
    assert (tmp_path / "vqmoe_ds_nearest_code" / "lock").exists()  # a build may own it: left alone
    err = capsys.readouterr().err
    assert err.count("warning: removed") == 1 and "60 min old" in err
    assert parallel.clear_stale_extension_locks(str(tmp_path / "missing")) == []
    # torch's default root has one more level (py311_cpu/<extension>/lock)
    deep = tmp_path / "default" / "py311_cpu" / "some_op"
    deep.mkdir(parents=True)
    (deep / "lock").write_text("")
    os.utime(deep / "lock", (time.time() - 3600, time.time() - 3600))
    assert parallel.clear_stale_extension_locks(str(tmp_path / "default")) == [str(deep / "lock")]
