"""SentencePiece (BPE or unigram) tokenizer, trained by tools/train_tokenizer.py; used for lm1b and any corpus.

Each line is encoded on its own and followed by the model's ``</s>`` id, so sentence-per-line corpora
(lm1b) keep their sentence ends; ``decode`` turns ``</s>`` back into line ends.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

from ..errors import DataError, check_utf8
from ..metadata import TokenizerMeta
from .base import Tokenizer, split_lines


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    block_cut = "line"

    def __init__(self, model_file: str):
        import sentencepiece as spm

        if model_file is None or not os.path.isfile(model_file):
            raise DataError(f"sentencepiece model {model_file} does not exist: train one with "
                            f"tools/train_tokenizer.py or pass --sp-model")
        self.model_file = os.path.abspath(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{model_file} is not a sentencepiece model ({e}): train one with "
                            f"tools/train_tokenizer.py") from None
        if self.sp.eos_id() < 0:
            raise DataError(f"sentencepiece model {model_file} has no </s> id: train it with an eos id "
                            f"(tools/train_tokenizer.py does)")

    def __getstate__(self):  # the C++ processor does not pickle; worker processes reload the file
        return {"model_file": self.model_file}

    def __setstate__(self, state):
        self.__init__(state["model_file"])

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode_lines(self, lines: List[str]) -> List[List[int]]:
        eos = self.sp.eos_id()
        return [ids + [eos] for ids in self.sp.encode([ln.rstrip("\n") for ln in lines])]

    def encode(self, text: str) -> List[int]:
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return [i for s in self.encode_lines(lines) for i in s]

    def decode(self, ids: Sequence[int]) -> str:
        eos, out, cur = self.sp.eos_id(), [], []
        for i in ids:
            if i == eos:
                out.append(self.sp.decode(cur) + "\n")
                cur = []
            else:
                cur.append(int(i))
        if cur:
            out.append(self.sp.decode(cur))
        return "".join(out)

    def encode_block(self, block: bytes, path: str = "<text>", offset: int = 0) -> Tuple[np.ndarray, List[int]]:
        check_utf8(block, path, offset)
        seqs = self.encode_lines([ln.decode("utf-8") for ln in split_lines(block)])
        lengths = [len(s) for s in seqs]
        return np.fromiter((i for s in seqs for i in s), dtype=np.int64, count=sum(lengths)), lengths

    def to_metadata(self, dtype: str) -> TokenizerMeta:
        sp = self.sp
        opt = lambda i: None if i < 0 else int(i)  # noqa: E731
        return TokenizerMeta(kind="sentencepiece", vocab_size=self.vocab_size, dtype=dtype, eos_id=opt(sp.eos_id()),
                             unk_id=opt(sp.unk_id()), bos_id=opt(sp.bos_id()), pad_id=opt(sp.pad_id()),
                             add_eos=True, vocab_file=self.model_file)
