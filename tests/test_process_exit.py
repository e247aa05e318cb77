"""How entry points end (vqmoe_ds.parallel.exit_process): the status comes through, and nothing printed or
logged before the exit is lost, with and without a process group."""
import os
import subprocess
import sys

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
