"""Byte-level tokenizer: token id = byte value, 256 ids (enwik8 is modelled this way; BPC = bits per byte)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from ..metadata import TokenizerMeta
from .base import Tokenizer


class ByteTokenizer(Tokenizer):
    kind = "byte"
    block_cut = "any"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        # errors="replace": a sampled or cut-off sequence may end inside a multi-byte character.
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    def encode_block(self, block: bytes, path: str = "<text>", offset: int = 0) -> Tuple[np.ndarray, List[int]]:
        return self.encode_bytes(block), [len(block)]

    def to_metadata(self, dtype: str) -> TokenizerMeta:
        return TokenizerMeta(kind="byte", vocab_size=256, dtype=dtype)
