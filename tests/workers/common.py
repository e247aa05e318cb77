import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402


def init():
    deepspeed.init_distributed(dist_backend=None, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def finish():
    """End the worker the way the entry points end: barrier, destroy the group, exit without finalising."""
    from vqmoe_ds.parallel import exit_process, shutdown

    shutdown(clean=True)
    exit_process(0)
