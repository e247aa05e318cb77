"""A spy for host reads: what, on a GPU, would make the host wait for the device."""
import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "nonzero", "bincount", "masked_select", "unique", "_unique2", "equal"}
HOST_READS = ("tolist", "item", "cpu", "numpy")  # tensor methods that bring device data to the host


class SyncSpy(TorchDispatchMode):
    """Records what would read device data back to the host on a GPU: the ops that do (or that size their output
    from the data), and calls of the tensor methods that copy to the host -- on a CPU tensor those return without
    dispatching anything, so they are patched (``watch``).  Only what runs inside ``with spy:`` counts.  ``hits``
    counts each by name, ``where`` keeps the caller's file and line of each method call."""

    def __init__(self):
        super().__init__()
        self.hits = collections.Counter()
        self.where = collections.Counter()
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def watch(self, patcher):
        """Patch the host-copying tensor methods through ``patcher.setattr`` (pytest's monkeypatch, which undoes
        them after the test, or ``Patcher``)."""
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def spy(tensor, *args, _name=name, _original=original, **kwargs):
                if self.active:
                    caller = sys._getframe(1)
                    self.hits["Tensor." + _name] += 1
                    self.where[f"Tensor.{_name} at {caller.f_code.co_filename}:{caller.f_lineno}"] += 1
                return _original(tensor, *args, **kwargs)

            patcher.setattr(torch.Tensor, name, spy)
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            self.hits[name] += 1
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
                                     if i is not None):
            self.hits["index(bool)"] += 1
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.hits["repeat_interleave"] += 1
        return func(*args, **kwargs)


class Patcher:
    """``setattr`` that ``undo`` reverts: monkeypatch for code outside pytest (the multi-rank workers)."""

    def __init__(self):
        self.saved = []

    def setattr(self, obj, name, value):
        self.saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self):
        while self.saved:
            obj, name, value = self.saved.pop()
            setattr(obj, name, value)
