"""Word-level tokenizer the Transformer-XL way (WikiText-103, lm1b-as-words).

Each line is stripped and split on whitespace and gets an ``<eos>`` token (empty lines too, so the line
structure of the corpus is part of what the model predicts).  The vocabulary is counted on the training
split only: id 0 is ``<eos>``, id 1 is ``<unk>``, then every word seen at least ``min_count`` times in
train, most frequent first (ties by code point order, so the vocabulary does not depend on the order the
counts were merged in).  Other words become ``<unk>``.  WikiText-103's own ``<unk>`` tokens map to id 1, so
with ``min_count=1`` its vocabulary has the standard 267,735 entries.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..errors import UTF8_OR_BYTES, DataError, check_utf8
from ..metadata import TokenizerMeta
from .base import Tokenizer, split_lines

EOS = "<eos>"
UNK = "<unk>"


def count_words(block: bytes, path: str = "<text>", offset: int = 0) -> Counter:
    """Word counts of one block of lines (preprocessing merges these over worker processes)."""
    return Counter(check_utf8(block, path, offset, fix=UTF8_OR_BYTES).split())


class WordTokenizer(Tokenizer):
    kind = "word"
    block_cut = "line"

    def __init__(self, words: Sequence[str], min_count: int = 1):
        if list(words[:2]) != [EOS, UNK]:
            raise DataError(f"word vocabulary must start with {EOS}, {UNK}: rebuild it with WordTokenizer.build")
        self.words = list(words)
        self.min_count = min_count
        self.index: Dict[str, int] = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise DataError("word vocabulary has duplicate entries: rebuild it with WordTokenizer.build")

    @classmethod
    def build(cls, counts: Counter, min_count: int = 1) -> "WordTokenizer":
        if min_count < 1:
            raise DataError(f"--min-count {min_count} must be >= 1")
        kept = [w for w, c in counts.items() if c >= min_count and w not in (EOS, UNK)]
        kept.sort(key=lambda w: (-counts[w], w))
        return cls([EOS, UNK] + kept, min_count)

    @classmethod
    def load(cls, path: str, min_count: int = 1) -> "WordTokenizer":
        if path is None:
            raise DataError("word tokenizer metadata has no vocab_file: re-run tools/preprocess_data.py")
        try:
            with open(path, encoding="utf-8") as f:
                words = [ln.rstrip("\n") for ln in f]
        except FileNotFoundError:
            raise DataError(f"word vocabulary {path} does not exist: re-run tools/preprocess_data.py "
                            f"(it writes <prefix>.vocab.txt beside the data)") from None
        return cls(words, min_count)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for w in self.words:
                f.write(w + "\n")

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def eos_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    def encode_line(self, line: str) -> List[int]:
        get = self.index.get
        return [get(w, 1) for w in line.split()] + [0]

    def encode(self, text: str) -> List[int]:
        """Every line of ``text`` (split on "\\n") becomes its words and an ``<eos>``."""
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return [i for ln in lines for i in self.encode_line(ln)]

    def decode(self, ids: Sequence[int]) -> str:
        """Words joined by spaces, ``<eos>`` as a line end: the inverse of encode up to whitespace and <unk>."""
        out, line = [], []
        for i in ids:
            if i == 0:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.words[i])
        if line:
            out.append(" ".join(line))
        return "".join(out)

    def encode_block(self, block: bytes, path: str = "<text>", offset: int = 0) -> Tuple[np.ndarray, List[int]]:
        check_utf8(block, path, offset, fix=UTF8_OR_BYTES)
        seqs = [self.encode_line(ln.decode("utf-8")) for ln in split_lines(block)]
        lengths = [len(s) for s in seqs]
        return np.fromiter((i for s in seqs for i in s), dtype=np.int64, count=sum(lengths)), lengths

    def to_metadata(self, dtype: str) -> TokenizerMeta:
        return TokenizerMeta(kind="word", vocab_size=self.vocab_size, dtype=dtype, eos_id=0, unk_id=1,
                             add_eos=True, min_count=self.min_count)
