#!/usr/bin/env python
"""Run pretrain_vqmoe.py over a preset's grid (arms x seeds x override sets) and report it: the command line of
``vqmoe_ds.experiments`` (see ``python tools/sweep.py --help`` and ``vqmoe_ds/experiments/cli.py``)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))

from vqmoe_ds.experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
