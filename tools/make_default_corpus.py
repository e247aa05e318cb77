#!/usr/bin/env python
"""Write the demo's synthetic corpus (no download): train/valid/test text, source spans, optional .bin/.idx.

    python tools/make_default_corpus.py --out-dir data/default --num-bytes 4000000 --preprocess

Writes OUT/{train,valid,test}.txt, OUT/sources.json (per split: the [start, end) byte range and source of
every document, for routing-purity analysis) and with --preprocess the byte-level data at OUT/byte
(--data-path OUT/byte).  The three splits are generated from the seed independently (split i from
``seed * 3 + i``), so valid/test documents are fresh draws from the same sources.
"""
import argparse
import json
import os
import sys


from vqmoe_ds.data.corpora import parse_ratios  # noqa: E402
from vqmoe_ds.data.default_corpus import SOURCES, generate_documents  # noqa: E402
from vqmoe_ds.data.errors import DataError  # noqa: E402


def make(out_dir, num_bytes=4_000_000, seed=0, split="0.9,0.05,0.05", preprocess=False, workers=1, progress=False):
    ratios = parse_ratios(split)
    sizes = [round(num_bytes * ratios[0]), round(num_bytes * ratios[1])]
    sizes.append(num_bytes - sum(sizes))
    if min(sizes) < 1:
        raise DataError(f"--num-bytes {num_bytes} is too small to split {split}: use a larger size")
    os.makedirs(out_dir, exist_ok=True)
    spans_out, paths = {"sources": list(SOURCES)}, {}
    for i, (name, n) in enumerate(zip(("train", "valid", "test"), sizes)):
        text, spans = generate_documents(n, seed * 3 + i)
        paths[name] = os.path.join(out_dir, f"{name}.txt")
        with open(paths[name], "w", encoding="ascii", newline="") as f:
            f.write(text)
        spans_out[name] = [[a, b, SOURCES.index(s)] for a, b, s in spans]
    with open(os.path.join(out_dir, "sources.json"), "w") as f:
        json.dump(spans_out, f, separators=(",", ":"))
    if preprocess:
        from vqmoe_ds.data.preprocess import PreprocessConfig, preprocess_corpus

        preprocess_corpus(paths, os.path.join(out_dir, "byte"),
                          PreprocessConfig(tokenizer="byte", workers=workers, progress=progress))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="data/default")
    p.add_argument("--num-bytes", type=int, default=4_000_000, help="total size of the three splits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="0.9,0.05,0.05")
    p.add_argument("--preprocess", action="store_true", help="also write byte-level OUT/byte.<split>.bin/.idx")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    try:
        paths = make(a.out_dir, a.num_bytes, a.seed, a.split, a.preprocess, a.workers, progress=True)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{path}\t{os.path.getsize(path)} bytes")
    return 0


def cli() -> None:
    """The console script ``vqmoe-make-default-corpus`` (setup.py)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
