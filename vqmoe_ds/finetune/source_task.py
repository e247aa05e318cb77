"""A small labelled task from the default synthetic corpus: which source (arithmetic, english, code, dna,
dictionary) does a snippet of text come from?

Why: it runs here in minutes with no download, and its texts are in the pretraining distribution of the demo
models (``vqmoe_ds.data.default_corpus``), so it measures what the pretrained representations carry.  Snippets
are cut at a random offset inside one document, ``snippet_chars`` long (short snippets make it harder: a few
characters of code and of arithmetic look alike).  Written as CSV (``text,label``; the CSV quoting keeps the
documents' newlines), read by ``--task csv``.
"""
from __future__ import annotations

import csv
import os
import random
from typing import Dict, List, Tuple

from ..data.default_corpus import generate_documents


def source_snippets(n: int, snippet_chars: int, seed: int) -> List[Tuple[str, str]]:
    rng = random.Random(seed)
    text, spans = generate_documents(max(200 * n, 100_000), seed)
    spans = [s for s in spans if s[1] - s[0] > snippet_chars + 2]
    out = []
    for _ in range(n):
        start, end, source = spans[rng.randrange(len(spans))]
        at = rng.randrange(start, end - snippet_chars)
        out.append((text[at:at + snippet_chars], source))
    return out


def write_source_task(out_dir: str, n_train: int = 2000, n_test: int = 500, snippet_chars: int = 24,
                      seed: int = 7) -> Dict[str, str]:
    """train.csv / test.csv in ``out_dir`` (disjoint seeds); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1000)):
        paths[split] = os.path.join(out_dir, f"{split}.csv")
        with open(paths[split], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(source_snippets(n, snippet_chars, s))
    return paths
