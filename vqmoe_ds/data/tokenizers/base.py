"""The one small interface every tokenizer of the project has.

Why one interface: preprocessing, the datasets, sampling and evaluation (BPC needs bytes per token, PPL
needs words) all talk to "a tokenizer" without knowing which of the four it is, and a preprocessed corpus
can rebuild its tokenizer from ``<prefix>.tokenizer.json`` alone (``from_metadata``).

``encode_block`` is what the multi-process preprocessing calls: it gets a block of raw bytes cut from the
corpus where ``block_cut`` allows ("any" byte, a "utf8" character boundary, or a "line" end) and returns the
token ids of the block plus the lengths of the sequences (lines) it holds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Sequence, Tuple

import numpy as np

from ..metadata import TokenizerMeta


class Tokenizer(ABC):
    kind: str = ""
    block_cut: str = "line"  # where preprocessing may cut the corpus into blocks: "any", "utf8" or "line"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        ...

    @property
    def eos_id(self):
        return None

    @abstractmethod
    def encode(self, text: str) -> List[int]:
        ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        ...

    @abstractmethod
    def encode_block(self, block: bytes, path: str = "<text>", offset: int = 0) -> Tuple[np.ndarray, List[int]]:
        ...

    @abstractmethod
    def to_metadata(self, dtype: str) -> TokenizerMeta:
        ...

    @staticmethod
    def from_metadata(meta: TokenizerMeta) -> "Tokenizer":
        """Rebuild the tokenizer that made a preprocessed corpus."""
        if meta.kind == "byte":
            from .byte import ByteTokenizer
            return ByteTokenizer()
        if meta.kind == "char":
            from .char import CharTokenizer
            return CharTokenizer(meta.chars or "")
        if meta.kind == "word":
            from .word import WordTokenizer
            return WordTokenizer.load(meta.vocab_file, min_count=meta.min_count or 1)
        if meta.kind == "hf":
            from .hf import HFTokenizer
            return HFTokenizer(meta.vocab_file)
        from .sentencepiece import SentencePieceTokenizer
        return SentencePieceTokenizer(meta.vocab_file)


def split_lines(block: bytes) -> List[bytes]:
    """The lines of a block, each keeping its b"\\n" (the last may lack one)."""
    return block.splitlines(keepends=True) if b"\r" not in block else _split_on_newline(block)


def _split_on_newline(block: bytes) -> List[bytes]:
    # bytes.splitlines also splits on \r; the corpora count lines by \n only, so split by hand here.
    parts = block.split(b"\n")
    out = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out
