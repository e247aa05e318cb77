#!/usr/bin/env python
"""Convert a checkpoint of a vqmoe-ds run to another data-parallel world size and expert-parallel size.

    python tools/reshard_checkpoint.py --load runs/a/checkpoints [--tag latest] --out runs/b/checkpoints \\
        --world-size 1 --ep-size 1

writes a complete checkpoint that ``pretrain_vqmoe.py --load`` resumes at ``--world-size`` ranks with
``--moe-expert-parallel-size EP``.  What is converted and what is not: ``vqmoe_ds/checkpoint/reshard.py``.
"""
import argparse
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqmoe_ds/torch_extensions"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="the --save folder of a run")
    p.add_argument("--tag", default="latest", help="latest (default), step<N> or best")
    p.add_argument("--out", required=True, help="the folder to write the resharded checkpoint to (a --load folder)")
    p.add_argument("--out-tag", default=None, help="tag of the written checkpoint (default: the source's tag)")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks that will resume from it")
    p.add_argument("--ep-size", type=int, required=True, help="--moe-expert-parallel-size of the resumed run")
    args = p.parse_args(argv)
    from vqmoe_ds.checkpoint import CheckpointError
    from vqmoe_ds.checkpoint.reshard import NOTICE, reshard
    from vqmoe_ds.data.errors import DataError, require_output

    try:
        require_output(args.out, "--out", "folder")
        path = reshard(args.load, args.tag, args.out, args.out_tag, args.world_size, args.ep_size)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} for {args.world_size} rank(s), ep size {args.ep_size}; resume with --load {args.out} "
          f"--moe-expert-parallel-size {args.ep_size}")
    print(NOTICE)
    return 0


def cli() -> None:
    """The console script ``vqmoe-reshard-checkpoint`` (setup.py)."""
    from vqmoe_ds.parallel import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
