"""A Hugging Face tokenizer (its ``tokenizer.json``, read by the ``tokenizers`` library): the tokenizer of a model
imported with ``tools/convert_hf.py`` (OLMoE's GPT-NeoX BPE), so that the tools encode and decode text as the
model was trained.  Text is encoded as ``tokenizers`` encodes it with its special tokens (its post-processor)."""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

from ..errors import DataError, check_utf8
from ..metadata import TokenizerMeta
from .base import Tokenizer


class HFTokenizer(Tokenizer):
    kind = "hf"
    block_cut = "line"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tokenizer

        if path is not None and os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if path is None or not os.path.isfile(path):
            raise DataError(f"Hugging Face tokenizer {path} does not exist: give the tokenizer.json of the model "
                            f"(tools/convert_hf.py copies it into its --out-dir)")
        self.path = os.path.abspath(path)
        try:
            self.tok = _Tokenizer.from_file(self.path)
        except Exception as e:  # noqa: BLE001 -- `tokenizers` raises a bare Exception for a malformed file; its
            # message is kept in the one line
            raise DataError(f"{path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:120]}): give the "
                            f"tokenizer.json that save_pretrained wrote") from None

    def __getstate__(self):  # the Rust tokenizer is rebuilt from its file in worker processes
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def encode_block(self, block: bytes, path: str = "<text>", offset: int = 0) -> Tuple[np.ndarray, List[int]]:
        ids = np.asarray(self.encode(check_utf8(block, path, offset)), dtype=np.int64)
        return ids, [len(ids)]

    def to_metadata(self, dtype: str) -> TokenizerMeta:
        return TokenizerMeta(kind="hf", vocab_size=self.vocab_size, dtype=dtype, vocab_file=self.path)
