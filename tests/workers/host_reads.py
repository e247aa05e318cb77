"""Run a driver and record every host read of its training steps after the first two:
``python tests/workers/host_reads.py OUT DRIVER.py ARGS...`` writes ``OUT.<rank>`` (JSON) after each recorded step:
{"steps": n, "reads": {"<what> @ <file>:<line>": count}}.

A host read is an op that reads device data back or sizes its output from it (``_local_scalar_dense`` -- ``.item()``,
``float(t)``, ``bool(t)`` --, ``nonzero``, ``bincount``, boolean indexing, ``repeat_interleave`` without its output
size, ...) or a call of ``Tensor.tolist``/``item``/``cpu``/``numpy``, which on a CPU tensor dispatch nothing.  Each is
attributed to the innermost frame in vqmoe_ds (or the driver), and, when it happens inside DeepSpeed, to DeepSpeed's
innermost frame as well."""
import collections
import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from vqmoe_ds.training import loop  # noqa: E402

OPS = {"_local_scalar_dense", "nonzero", "bincount", "masked_select", "unique", "_unique2", "equal"}
READS = collections.Counter()
STATE = {"on": False, "steps": 0}


def place() -> str:
    inner = ""
    for fr in reversed(traceback.extract_stack()[:-2]):
        path = fr.filename.replace(os.sep, "/")
        if "/deepspeed/" in path and not inner:
            inner = " in deepspeed/" + path.split("/deepspeed/", 1)[1] + f":{fr.lineno}"
        if "/vqmoe_ds/" in path or path.endswith("_vqmoe.py"):
            return ("vqmoe_ds/" + path.split("/vqmoe_ds/", 1)[1] if "/vqmoe_ds/" in path
                    else os.path.basename(path)) + f":{fr.lineno}" + inner
    return "elsewhere" + inner


class Spy(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in OPS:
            READS[f"{name} @ {place()}"] += 1
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
                                     if i is not None):
            READS[f"index(bool) @ {place()}"] += 1
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            READS[f"repeat_interleave @ {place()}"] += 1
        return func(*args, **kwargs)


def _watch(name):
    original = getattr(torch.Tensor, name)

    def spy(tensor, *args, **kwargs):
        if STATE["on"]:
            READS[f"Tensor.{name} @ {place()}"] += 1
        return original(tensor, *args, **kwargs)

    setattr(torch.Tensor, name, spy)


for _name in ("tolist", "item", "cpu", "numpy"):
    _watch(_name)

_train_step = loop.Trainer.train_step


def train_step(self):
    if self.step < 2:  # the first steps: the codebook's k-means init, DeepSpeed's first-step set-up
        return _train_step(self)
    STATE["on"], STATE["steps"] = True, STATE["steps"] + 1
    try:
        with Spy():
            return _train_step(self)
    finally:
        STATE["on"] = False
        with open(f"{OUT}.{os.environ.get('RANK', '0')}", "w") as f:
            json.dump({"steps": STATE["steps"], "reads": dict(READS)}, f, indent=1)


loop.Trainer.train_step = train_step
OUT, driver = sys.argv[1], sys.argv[2]
sys.argv = [driver] + sys.argv[3:]
runpy.run_path(driver, run_name="__main__")
