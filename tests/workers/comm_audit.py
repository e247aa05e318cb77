"""Run a driver with every torch.distributed collective recorded: ``python tests/workers/comm_audit.py DRIVER.py
ARGS...`` with ``VQMOE_AUDIT=PREFIX`` writes ``PREFIX.<rank>``: one JSON line per call with the collective, the
devices of its tensors and the module that called it (the first frame outside torch.distributed)."""
import functools
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

NAMES = ("all_reduce", "all_gather", "broadcast", "all_to_all_single", "all_to_all", "reduce_scatter_tensor",
         "all_gather_into_tensor", "all_gather_object", "barrier")


def _tensors(args, kwargs):
    out = []
    for a in list(args) + list(kwargs.values()):
        if torch.is_tensor(a):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [x for x in a if torch.is_tensor(x)]
    return out


def _caller():
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("torch.distributed", "__main__")) and frame.f_code.co_filename != __file__:
            return name
        frame = frame.f_back
    return "?"


def _wrap(fn, name):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        rank = dist.get_rank() if dist.is_initialized() else -1
        with open(f"{os.environ['VQMOE_AUDIT']}.{rank}", "a") as f:
            f.write(json.dumps({"op": name, "caller": _caller(),
                                "devices": sorted({t.device.type for t in _tensors(args, kwargs)})}) + "\n")
        return fn(*args, **kwargs)
    return wrapper


for _name in NAMES:
    setattr(dist, _name, _wrap(getattr(dist, _name), _name))

if __name__ == "__main__":
    driver = os.path.abspath(sys.argv[1])
    sys.argv = [driver, *sys.argv[2:]]
    runpy.run_path(driver, run_name="__main__")
