"""Character-level tokenizer over an alphabet built from the training split (text8: 27 symbols).

Why not bytes: text8 is reported in bits per *character* over its 27-symbol alphabet; a byte model would
carry 229 never-used outputs.  A character of valid/test missing from the train alphabet is an error that
says so (it would otherwise need an <unk> the benchmark does not have); use the byte tokenizer for such text.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import numpy as np

from ..errors import UTF8_OR_BYTES, DataError, check_utf8
from ..metadata import TokenizerMeta
from .base import Tokenizer


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class CharTokenizer(Tokenizer):
    kind = "char"
    block_cut = "utf8"

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise DataError("char alphabet must be sorted and free of duplicates: rebuild it with CharTokenizer.build")
        if not chars:
            raise DataError("char alphabet is empty: build it from a non-empty training text")
        self.chars = chars
        self._cps = _codepoints(chars)  # sorted, so ids come from a binary search

    @classmethod
    def build(cls, texts: Iterable[str]) -> "CharTokenizer":
        alphabet = set()
        for t in texts:
            alphabet.update(t)
        return cls("".join(sorted(alphabet)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def _ids(self, text: str, where: str) -> np.ndarray:
        cps = _codepoints(text)
        ids = np.searchsorted(self._cps, cps)
        ids_c = np.minimum(ids, len(self._cps) - 1)
        bad = self._cps[ids_c] != cps
        if bad.any():
            ch = chr(int(cps[np.argmax(bad)]))
            raise DataError(f"{where}: character {ch!r} is not in the training alphabet of {len(self.chars)} "
                            f"characters: use text in that alphabet, or preprocess the corpus with "
                            f"tools/preprocess_data.py --tokenizer byte")
        return ids.astype(np.int64)

    def encode(self, text: str) -> List[int]:
        return self._ids(text, "text").tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def encode_block(self, block: bytes, path: str = "<text>", offset: int = 0) -> Tuple[np.ndarray, List[int]]:
        text = check_utf8(block, path, offset, fix=UTF8_OR_BYTES)
        return self._ids(text, f"{path} (block at byte {offset})"), [len(text)]

    def to_metadata(self, dtype: str) -> TokenizerMeta:
        return TokenizerMeta(kind="char", vocab_size=self.vocab_size, dtype=dtype, chars=self.chars)
