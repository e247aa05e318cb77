#!/usr/bin/env python
"""Run pretrain_vqmoe.py over a preset's grid (arms x seeds x override sets) and report it: the command line of
``vqmoe_ds.experiments`` (see ``python tools/sweep.py --help`` and ``vqmoe_ds/experiments/cli.py``)."""
import os
import sys

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))

from vqmoe_ds.experiments.cli import main  # noqa: E402

def cli() -> None:
    """The console script ``vqmoe-sweep`` (setup.py)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
