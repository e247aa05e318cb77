#!/usr/bin/env python
"""Download and split the language-modelling corpora of the paper, or split a local corpus.

    python tools/get_data.py enwik8            # -> data/enwik8/{train,valid,test}.txt (90M/5M/5M bytes)
    python tools/get_data.py text8
    python tools/get_data.py wikitext-103      # tokenized (.tokens); wikitext-103-raw for the raw text
    python tools/get_data.py lm1b              # valid = held-out shard 1, test = held-out shard 0
    python tools/get_data.py local --path my_corpus/ --split 0.9,0.05,0.05 --name mycorpus
    python tools/get_data.py local --path my_corpus/ --split 0.9,0.1,0     # no test split

Output goes to <data-dir>/<name>/ (default data/<dataset>/).  Downloads go to <data-dir>/downloads/ and
resume if interrupted; each is checked against its known size and md5/sha256 (--md5/--sha256 pin another
mirror's file; --base-url replaces the host).  Then run tools/preprocess_data.py on the output folder (see
docs/data.md).
"""
import argparse
import os
import sys


from vqmoe_ds.data import corpora  # noqa: E402
from vqmoe_ds.data.download import download  # noqa: E402
from vqmoe_ds.data.errors import DataError  # noqa: E402
from vqmoe_ds.data.tool_help import HelpFormatter  # noqa: E402

DATASETS = ("enwik8", "text8", "wikitext-103", "wikitext-103-raw", "lm1b", "local")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("dataset", choices=DATASETS, help="the corpus to get, or local for your own text")
    p.add_argument("--data-dir", default="data", help="root folder of downloads and prepared corpora")
    p.add_argument("--name", default=None, help="output folder name under --data-dir (default: the dataset name)")
    p.add_argument("--base-url", default=None, help="fetch <base-url>/<archive name> instead of the official URL")
    p.add_argument("--md5", default=None, help="expected md5 of the archive (replaces the built-in check)")
    p.add_argument("--sha256", default=None, help="expected sha256 of the archive (replaces the built-in check)")
    p.add_argument("--split-bytes", default=",".join(map(str, corpora.STANDARD_SPLIT_BYTES)),
                   help="enwik8/text8: train,valid,test sizes in bytes (standard: 90M,5M,5M)")
    p.add_argument("--lm1b-valid-shard", type=int, default=1, help="lm1b held-out shard used as validation")
    p.add_argument("--lm1b-test-shard", type=int, default=0, help="lm1b held-out shard used as test (standard: 0)")
    p.add_argument("--path", default=None, help="local: a text file or a folder of text files")
    p.add_argument("--split", default="0.9,0.05,0.05",
                   help="local: train,valid,test fractions of the bytes (valid or test may be 0: no such split)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait on a stalled connection")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none either when not on a terminal)")
    return p.parse_args(argv)


def run(args) -> list:
    # every setting is checked before anything is downloaded
    sizes = corpora.parse_sizes(args.split_bytes)
    out_dir = os.path.join(args.data_dir, args.name or args.dataset)
    if args.dataset == "local":
        if not args.path:
            raise DataError("get_data.py local needs --path FILE_OR_FOLDER")
        return corpora.prepare_local(args.path, out_dir, corpora.parse_ratios(args.split))
    if args.dataset == "lm1b":
        corpora.check_lm1b_shards(args.lm1b_valid_shard, args.lm1b_test_shard)
    remote = corpora.CATALOG[args.dataset]
    url = args.base_url.rstrip("/") + "/" + remote.filename if args.base_url else remote.url
    pinned = args.md5 or args.sha256
    archive = download(url, os.path.join(args.data_dir, "downloads", remote.filename),
                       size=None if pinned else remote.size, md5=args.md5 if pinned else remote.md5,
                       sha256=args.sha256 if pinned else remote.sha256, timeout=args.timeout,
                       progress=not args.no_progress and sys.stderr.isatty())  # a bar on a terminal only
    if args.dataset == "enwik8":
        return corpora.prepare_enwik8(archive, out_dir, sizes)
    if args.dataset == "text8":
        return corpora.prepare_text8(archive, out_dir, sizes)
    if args.dataset.startswith("wikitext-103"):
        return corpora.prepare_wikitext103(archive, out_dir, raw=args.dataset.endswith("raw"))
    return corpora.prepare_lm1b(archive, out_dir, args.lm1b_valid_shard, args.lm1b_test_shard)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        outs = run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in outs:
        print(f"{p}\t{os.path.getsize(p)} bytes")
    return 0


def cli() -> None:
    """The console script ``vqmoe-get-data`` (setup.py)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
