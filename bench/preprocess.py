#!/usr/bin/env python
"""Preprocessing throughput (MB/s) at 1 and 2 workers, and the dataset's random-access samples/s.

    python bench/preprocess.py [/work/shared/data/warpeace.txt] [--mb 50] [--tokenizers byte char word sentencepiece]

The text file is repeated into a ``--mb`` MB corpus in a temporary folder.  Each tokenizer runs
``preprocess_corpus`` (what tools/preprocess_data.py calls) at 1 and 2 workers; the time includes building
the vocabulary (char alphabet, word counts) and writing megatron-core's .bin/.idx, not the one-off import of
megatron-core (done before timing).  The sentencepiece model (BPE, 8k) is trained on the first 3 MB first,
untimed.  Random access: ``LMDataset[j]`` (GPT windows, shuffled order, seq_len 512) and the raw
``IndexedTokenStream.read`` at random offsets, each against the floor of slicing a ``np.memmap`` of the
same .bin at the same offsets.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from vqmoe_ds.data.loading import build_lm_dataset  # noqa: E402
from vqmoe_ds.data.preprocess import PreprocessConfig, preprocess_corpus  # noqa: E402
from vqmoe_ds.data.token_stream import IndexedTokenStream  # noqa: E402

DEFAULT_TEXT = os.path.join(ROOT, "..", "shared", "data", "warpeace.txt")


def make_corpus(src: str, mb: float, out: str) -> int:
    data = open(src, "rb").read()
    target = int(mb * 1e6)
    with open(out, "wb") as f:
        written = 0
        while written < target:
            chunk = data[: target - written]
            f.write(chunk)
            written += len(chunk)
    return written


def time_preprocess(corpus: str, prefix: str, tokenizer: str, workers: int, sp_model=None) -> float:
    cfg = PreprocessConfig(tokenizer=tokenizer, workers=workers, sp_model=sp_model, progress=False)
    t0 = time.perf_counter()
    preprocess_corpus({"train": corpus}, prefix, cfg)
    return time.perf_counter() - t0


def random_access(prefix: str, n: int = 20000, seq_len: int = 512):
    """(LMDataset samples/s, stream reads/s, memmap slices/s) for ``n`` random windows."""
    ds = build_lm_dataset(prefix, "train", seq_len, seed=0)
    stream = IndexedTokenStream(prefix + ".train")
    rng = np.random.default_rng(0)
    js = rng.integers(0, len(ds), n)
    starts = rng.integers(0, len(stream) - seq_len - 1, n)
    mm = np.memmap(prefix + ".train.bin", dtype=stream.dtype, mode="r")
    ds[0], stream.read(0, 8), np.array(mm[:8])  # warm the page cache and the index
    out = []
    for fn in (lambda i: ds[int(js[i])], lambda i: stream.read(int(starts[i]), seq_len + 1),
               lambda i: np.array(mm[starts[i]: starts[i] + seq_len + 1])):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        out.append(n / (time.perf_counter() - t0))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text_file", nargs="?", default=DEFAULT_TEXT)
    p.add_argument("--mb", type=float, default=50.0)
    p.add_argument("--tokenizers", nargs="+", default=["byte", "char", "word", "sentencepiece"],
                   choices=["byte", "char", "word", "sentencepiece"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    a = p.parse_args()
    if not os.path.isfile(a.text_file):
        print(f"error: {a.text_file} does not exist: give a text file", file=sys.stderr)
        return 2
    from vqmoe_ds.data.token_stream import indexed_dataset

    indexed_dataset()  # the one-off import of megatron-core, kept out of the timings

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        size = make_corpus(a.text_file, a.mb, corpus)
        print(f"corpus: {os.path.basename(a.text_file)} repeated to {size / 1e6:.1f} MB; {os.cpu_count()} CPU(s)")
        sp_model = None
        if "sentencepiece" in a.tokenizers:
            from vqmoe_tools.train_tokenizer import train

            sample = os.path.join(tmp, "sample.txt")
            make_corpus(a.text_file, min(3.0, a.mb), sample)
            sp_model = train([sample], os.path.join(tmp, "sp8k"), 8000)
        header = "| tokenizer | " + " | ".join(f"{w} worker(s) s | MB/s" for w in a.workers) + " | speed-up |"
        print(header)
        print("|" + "---|" * (1 + 2 * len(a.workers) + 1))
        last_prefix = None
        for tok in a.tokenizers:
            times = []
            for w in a.workers:
                prefix = os.path.join(tmp, f"{tok}_w{w}")
                times.append(time_preprocess(corpus, prefix, tok, w, sp_model))
                last_prefix = last_prefix or prefix
            cells = " | ".join(f"{t:.1f} | {size / 1e6 / t:.1f}" for t in times)
            print(f"| {tok} | {cells} | {times[0] / times[-1]:.2f}x |", flush=True)
        ds_s, read_s, mm_s = random_access(last_prefix)
        print(f"\nrandom access ({a.tokenizers[0]} tokens, windows of 513):")
        print("| reader | samples/s | ÷ memmap slice |\n|---|---|---|")
        print(f"| LMDataset[j] (shuffled GPT windows) | {ds_s:,.0f} | {ds_s / mm_s:.2f} |")
        print(f"| IndexedTokenStream.read | {read_s:,.0f} | {read_s / mm_s:.2f} |")
        print(f"| np.memmap slice (floor) | {mm_s:,.0f} | 1.00 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
