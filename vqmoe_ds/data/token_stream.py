"""A corpus split as one flat stream of token ids, read by position.

Why a flat stream: a language-model corpus (enwik8, text8, WikiText-103) is one long text; GPT windows and
Transformer-XL segments are cut from it at arbitrary token positions, across line and document ends.  The
preprocessed .bin holds the tokens of all lines back to back, so the stream is the .bin itself and the
.idx only says where sequences start.

``IndexedTokenStream`` reads it through megatron-core's ``IndexedDataset`` (``get(seq, offset, length)``
over the sequences a window spans, found by binary search over the cumulative sequence lengths), so the
.bin is memory-mapped, never loaded.  ``ArrayTokenStream`` is the in-memory path for the demo and tests.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .errors import DataError


def indexed_dataset():
    """megatron-core's ``indexed_dataset`` module, the one place vqmoe-ds imports megatron-core.

    Its import warns four times (UserWarning) that Transformer Engine and Apex are not installed, and that it
    falls back to local optimizer and multi-tensor implementations: harmless here, since only the indexed
    dataset format is used, which needs neither; so those warnings are silenced for the import alone."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class ArrayTokenStream:
    """Tokens held in memory (a numpy array or anything ``np.asarray`` takes)."""

    def __init__(self, tokens, vocab_size: Optional[int] = None):
        arr = np.asarray(tokens)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"token stream must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
        if vocab_size is not None and arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise DataError(f"token ids must lie in [0, {vocab_size}), found [{arr.min()}, {arr.max()}]: "
                            f"tokenize with the model's tokenizer")
        self.tokens = arr

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > len(self):
            raise IndexError(f"read [{start}, {start + length}) outside a stream of {len(self)} tokens")
        return self.tokens[start:start + length].astype(np.int64)


class IndexedTokenStream:
    """The tokens of ``<prefix>.bin``/``<prefix>.idx`` (megatron-core's indexed format) as one stream."""

    def __init__(self, prefix: str):
        idx, binf = prefix + ".idx", prefix + ".bin"
        if not os.path.isfile(idx):
            raise DataError(f"{idx} does not exist: preprocess the corpus with tools/preprocess_data.py "
                            f"--output-prefix {os.path.dirname(prefix) or '.'}/... (it writes .bin and .idx)")
        if not os.path.isfile(binf):
            raise DataError(f"{binf} is missing beside {idx}: the .bin and .idx of a prefix belong together; "
                            f"re-run tools/preprocess_data.py")
        IndexedDataset = indexed_dataset().IndexedDataset
        try:
            self.dataset = IndexedDataset(prefix, mmap=True)
        except (AssertionError, ValueError, OSError, KeyError) as e:
            raise DataError(f"{idx} is not a valid megatron-core index ({type(e).__name__}: {e}): "
                            f"re-run tools/preprocess_data.py") from None
        self.prefix = prefix
        self.dtype = np.dtype(self.dataset.index.dtype)
        lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        expected = int(self.starts[-1]) * self.dtype.itemsize
        actual = os.path.getsize(binf)
        if actual != expected:
            raise DataError(f"{binf} has {actual} bytes but {idx} describes {expected} "
                            f"({self.starts[-1]} tokens of {self.dtype}): the pair is truncated or mismatched; "
                            f"re-run tools/preprocess_data.py")

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_sequences(self) -> int:
        return len(self.starts) - 1

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"read [{start}, {start + length}) outside a stream of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        seq = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            while self.starts[seq + 1] <= pos:  # skip empty sequences
                seq += 1
            off = pos - int(self.starts[seq])
            n = min(length - filled, int(self.starts[seq + 1]) - pos)
            out[filled:filled + n] = self.dataset.get(seq, offset=off, length=n)
            filled += n
            pos += n
            seq += 1
        return out


def open_token_stream(prefix: str):
    return IndexedTokenStream(prefix)
