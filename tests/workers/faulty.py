"""Run a driver with faults injected, for the failure tests: ``python tests/workers/faulty.py DRIVER.py ARGS...``
with ``VQMOE_FAULT=kind@step@rank[,...]`` (step or rank ``*``: any).  Kinds:

  * ``nan``: the task loss of every micro-batch of that step is NaN on that rank;
  * ``exit``: that rank dies (``os._exit(1)``) just before that step;
  * ``kill_in_save``: that rank is killed (SIGKILL) during the save of that step, after its files are written;
  * ``enospc_in_save``: writing that rank's state file in the save of that step fails with "No space left on
    device".

The faults are monkeypatches of the training loop and the checkpoint store, so the library itself carries no
fault hooks.
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from vqmoe_ds.checkpoint import store  # noqa: E402
from vqmoe_ds.training import loop  # noqa: E402

STEP = {"current": 0}  # the step being trained (1-based), or the one just finished while it is saved


def fault(kind: str) -> bool:
    rank = os.environ.get("RANK", "0")
    for item in os.environ.get("VQMOE_FAULT", "").split(","):
        k, s, r = (item.split("@") + ["*", "*"])[:3]
        if k == kind and s in ("*", str(STEP["current"])) and r in ("*", rank):
            return True
    return False


_train_step = loop.Trainer.train_step


def train_step(self):
    STEP["current"] = self.step + 1
    if fault("exit"):
        os._exit(1)
    task = self.task
    if not getattr(task, "_faulty", False):
        micro_step = task.micro_step

        def poisoned(engine):
            loss, aux, extras = micro_step(engine)
            return (loss * float("nan") if fault("nan") else loss), aux, extras

        task.micro_step, task._faulty = poisoned, True
    try:
        return _train_step(self)
    finally:
        STEP["current"] = self.step


_write_rank_state = store.write_rank_state


def write_rank_state(folder, rank, state):
    if fault("enospc_in_save"):
        raise OSError(28, "No space left on device", os.path.join(folder, f"rank{rank}_state.pt"))
    _write_rank_state(folder, rank, state)
    if fault("kill_in_save"):
        os.kill(os.getpid(), 9)


loop.Trainer.train_step = train_step
store.write_rank_state = write_rank_state

if __name__ == "__main__":
    driver = os.path.abspath(sys.argv[1])
    sys.argv = [driver, *sys.argv[2:]]
    runpy.run_path(driver, run_name="__main__")
