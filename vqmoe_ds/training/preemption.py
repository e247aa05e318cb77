"""Pre-emption: SIGTERM or SIGINT asks a run to stop after its current step, save it, and exit 0.

Clusters pre-empt jobs with SIGTERM (Slurm sends it before SIGKILL; Ctrl-C is SIGINT).  The handler only
records the signal; every rank asks ``agreed`` once per step, an all-reduce that is true everywhere as soon
as any rank got a signal, so all ranks save the same step together (a checkpoint is collective) and none is
left waiting in a collective that its peers abandoned.  Used by every training driver.
"""
from __future__ import annotations

import signal
from typing import Optional



class StopRequest:
    def __init__(self):
        self.signal_name: Optional[str] = None

    def install(self) -> "StopRequest":
        def handler(signum, frame):
            self.signal_name = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
        return self

    def agreed(self, other_reason: bool = False) -> bool:
        """Whether any rank got a stop signal (or has ``other_reason`` to stop, e.g. a failed log write): the same
        answer on every rank."""
        from ..parallel import any_rank

        return any_rank(self.signal_name is not None or other_reason)

    def describe(self) -> str:
        return self.signal_name or "a signal on another rank"
