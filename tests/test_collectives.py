"""Every collective of a real 2-rank training run (language model and vision, ep 2, with validation, logging,
checkpoints and the final test) is issued either by DeepSpeed, by a data-path module on tensors of the data's
device (the dispatch's all-to-all, the codebook's and routers' statistics, the checkpoint's object gathers), or
through the small-collective helpers of `vqmoe_ds.parallel`, which put their tensors on the accelerator's current
device.  Under NCCL a collective on a CPU tensor fails, so a metric or flag summed with an ad-hoc CPU tensor
anywhere else would crash the first GPU run; the audit wraps torch.distributed and names every caller."""
import json
import os
import subprocess
import sys

import pytest

from vqmoe_ds.parallel import comm_device
from vqmoe_ds.training.launch import DRIVER, ROOT, env_for_ranks, free_port, remove_new_shm, shm_files

AUDIT = os.path.join(ROOT, "tests", "workers", "comm_audit.py")
CPU_CFG = os.path.join(ROOT, "ds_configs", "cpu_fp32.json")
ALLOWED = ("vqmoe_ds.parallel", "vqmoe_ds.moe.dispatch", "vqmoe_ds.quantizers.codebook", "vqmoe_ds.routers.topk",
           "vqmoe_ds.routers.cluster", "vqmoe_ds.checkpoint.store", "deepspeed")
COMMON = ["--deepspeed_config", CPU_CFG, "--moe-expert-parallel-size", "2", "--train-iters", "4", "--log-interval",
          "2", "--eval-interval", "2", "--save-interval", "2", "--no-progress", "--no-plots"]
RUNS = {
    "language model": (DRIVER, ["--corpus-bytes", "100000", "--eval-iters", "2", "--test-iters", "2",
                                "--moe-router-enable-expert-bias", "--moe-router-load-balancing-type",
                                "global_aux_loss"]),
    "vision": (os.path.join(ROOT, "train_vision.py"), ["--synthetic-train-size", "256", "--valid-size", "32",
                                                       "--synthetic-test-size", "32", "--micro-batch-size", "16"]),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_every_collective_goes_through_the_helpers_or_the_data_path(tmp_path, name):
    script, args = RUNS[name]
    port, prefix = str(free_port()), str(tmp_path / "audit")
    before, procs = shm_files(), []
    try:
        for rank in range(2):
            env = env_for_ranks(str(tmp_path))
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, VQMOE_AUDIT=prefix)
            procs.append(subprocess.Popen([sys.executable, AUDIT, script, *COMMON, *args, "--out-dir",
                                           str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, cwd=ROOT))
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        remove_new_shm(before)
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:]
    device = comm_device().type
    for rank in range(2):
        calls = [json.loads(line) for line in open(f"{prefix}.{rank}")]
        callers = {c["caller"] for c in calls}
        assert "vqmoe_ds.parallel" in callers and "vqmoe_ds.moe.dispatch" in callers  # both kinds were seen
        stray = sorted({c["caller"] for c in calls if not c["caller"].startswith(ALLOWED)})
        assert not stray, f"collectives issued outside the helpers and the data path: {stray}"
        for c in calls:
            if c["caller"] == "vqmoe_ds.parallel":
                assert c["devices"] in ([], [device]), c


def test_each_rank_makes_its_local_device_current(monkeypatch):
    """On an accelerator, init_distributed makes LOCAL_RANK's device current (else every rank of a node would put
    its small collectives on device 0: NCCL refuses two ranks on one GPU); on the CPU it does nothing."""
    import deepspeed.accelerator

    from vqmoe_ds import parallel

    calls = []

    class FakeCuda:
        def device_name(self, index=None):
            return "cuda"

        def set_device(self, index):
            calls.append(index)

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeCuda())
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: None)
    monkeypatch.setenv("LOCAL_RANK", "3")
    parallel.init_distributed()
    assert calls == [3]

    class FakeCpu(FakeCuda):
        def device_name(self, index=None):
            return "cpu"

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeCpu())
    parallel.bind_local_device()
    assert calls == [3]


def test_a_lone_process_takes_a_free_rendezvous_port(monkeypatch):
    """Started without a launcher or MPI, a process forms a one-rank group on a free port, not DeepSpeed's default
    29500 (two such runs on one machine would collide there); under a launcher its variables are left alone."""
    import os
    import socket

    import deepspeed

    from vqmoe_ds import parallel

    for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              *parallel.MPI_RANK_VARIABLES):
        monkeypatch.delenv(v, raising=False)
    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(os.environ, port=kw.get("distributed_port")))
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 29500))  # another run holds the default port
    except OSError:
        pass  # it is already taken
    try:
        parallel.init_distributed(distributed_port=29500)
    finally:
        busy.close()
    assert (seen["RANK"], seen["WORLD_SIZE"], seen["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert seen["MASTER_PORT"] != "29500"
    seen.clear()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "12345")
    parallel.init_distributed(distributed_port=29500)
    assert seen["RANK"] == "1" and seen["MASTER_PORT"] == "12345"
