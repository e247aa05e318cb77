import os
import sys

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))
sys.path.insert(0, os.path.dirname(__file__))

_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _end_group_and_restore(saved):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    from dist_helper import clear_deepspeed_groups

    clear_deepspeed_groups()  # its cached groups belong to a destroyed group (here, or by the entry point itself)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _isolate_process_group():
    """Tests that load a checkpoint in-process start a 1-rank process group and set the rendezvous variables
    (RANK, MASTER_PORT, ...) in os.environ, as the tools do when run alone.  Left behind, the group's store keeps
    that port listening and every later subprocess inherits the variables: torchrun's children fail with
    EADDRINUSE, and mpirun's ranks skip MPI discovery and all act as rank 0.  End the group and restore the
    environment after each test..."""
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    _end_group_and_restore(saved)


@pytest.fixture(autouse=True, scope="module")
def _isolate_module_fixtures():
    """... and after each module, for module-scoped fixtures that ran a tool in-process."""
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    _end_group_and_restore(saved)
