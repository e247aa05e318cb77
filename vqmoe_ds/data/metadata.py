"""Tokenizer metadata saved beside preprocessed data, and the check that data and model agree.

Why: a .bin file is only integers.  Training a model whose embedding table is smaller than the data's
vocabulary fails late (an index error on some batch, or on GPU an illegal memory access); training with a
different tokenizer than the data was made with fails silently.  So preprocessing writes
``<prefix>.tokenizer.json`` and the driver calls ``check_vocab`` before it builds the model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from .errors import DataError

KINDS = ("byte", "char", "word", "sentencepiece", "hf")  # hf: a Hugging Face tokenizer.json (imported models)

# Token dtypes megatron-core's IndexedDataset can store that make sense for token ids, smallest first.
TOKEN_DTYPES = ("uint8", "uint16", "int32")


def dtype_capacity(dtype: str) -> int:
    """How many distinct non-negative token ids ``dtype`` can hold."""
    return int(np.iinfo(np.dtype(dtype)).max) + 1


def choose_dtype(vocab_size: int, requested: Optional[str] = None) -> str:
    """The smallest token dtype holding ``vocab_size`` ids, or ``requested`` after checking that it fits."""
    if requested is not None:
        if requested not in TOKEN_DTYPES:
            raise DataError(f"--dtype {requested} is not supported: choose one of {', '.join(TOKEN_DTYPES)}")
        if vocab_size > dtype_capacity(requested):
            raise DataError(f"vocabulary of {vocab_size} tokens does not fit --dtype {requested} "
                            f"(at most {dtype_capacity(requested)} ids): use a wider --dtype or leave it unset")
        return requested
    for dt in TOKEN_DTYPES:
        if vocab_size <= dtype_capacity(dt):
            return dt
    raise DataError(f"vocabulary of {vocab_size} tokens is larger than any supported token dtype")


@dataclass
class TokenizerMeta:
    """What a model needs to know about the tokens in a preprocessed corpus.

    ``vocab_file`` (word: one token per line, id = line number; sentencepiece: the .model file) is stored in
    the JSON relative to the JSON's folder, so a data folder can be moved; in memory it is absolute.
    """
    kind: str
    vocab_size: int
    dtype: str
    eos_id: Optional[int] = None
    unk_id: Optional[int] = None
    bos_id: Optional[int] = None
    pad_id: Optional[int] = None
    add_eos: bool = False  # an end-of-line token follows every line (word, sentencepiece)
    vocab_file: Optional[str] = None
    chars: Optional[str] = None  # char: the alphabet, character i has id i
    min_count: Optional[int] = None  # word: words seen fewer times in train became <unk>
    # per split: {"tokens", "bytes", "chars", "words", "lines"} of its text (vqmoe_ds.data.text_counts), what the
    # driver divides its summed NLL by for bits per byte / character and word-level perplexity
    splits: Optional[Dict[str, Dict[str, int]]] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"unknown tokenizer kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.vocab_size < 1:
            raise DataError(f"vocab_size={self.vocab_size} must be >= 1")
        choose_dtype(self.vocab_size, self.dtype)

    def save(self, path: str) -> None:
        d = dataclasses.asdict(self)
        if self.vocab_file is not None:
            d["vocab_file"] = os.path.relpath(self.vocab_file, os.path.dirname(os.path.abspath(path)))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=1, ensure_ascii=False)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> "TokenizerMeta":
        if not os.path.isfile(path):
            raise DataError(f"tokenizer metadata {path} does not exist: run tools/preprocess_data.py for this "
                            f"--data-path (it writes <prefix>.tokenizer.json)")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            fields = {fl.name for fl in dataclasses.fields(cls)}
            unknown = set(d) - fields
            if unknown:
                raise TypeError(f"unknown keys {sorted(unknown)}")
            meta = cls(**d)
        except (ValueError, TypeError) as e:
            if isinstance(e, DataError):
                raise DataError(f"{path}: {e}") from None
            raise DataError(f"tokenizer metadata {path} is not valid ({e}): re-run tools/preprocess_data.py") from None
        if meta.vocab_file is not None:
            meta.vocab_file = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), meta.vocab_file))
        return meta


def check_vocab(meta: TokenizerMeta, model_vocab_size: int, allow_padding: bool = True) -> None:
    """Refuse to train a model of ``model_vocab_size`` output classes on data tokenized as ``meta``.

    A model vocabulary smaller than the data's always fails.  A larger one is allowed when ``allow_padding``
    (embedding tables padded to a multiple of 64/128 for speed, as Megatron does); the extra rows are
    never targets.  With ``allow_padding=False`` the sizes must be equal.
    """
    if model_vocab_size < meta.vocab_size:
        raise DataError(f"the data's {meta.kind} vocabulary has {meta.vocab_size} tokens but the model's vocab_size "
                        f"is {model_vocab_size}: set --vocab-size {meta.vocab_size} (or more) or re-preprocess the "
                        f"data with the model's tokenizer")
    if not allow_padding and model_vocab_size != meta.vocab_size:
        raise DataError(f"the data's {meta.kind} vocabulary has {meta.vocab_size} tokens but the model's vocab_size "
                        f"is {model_vocab_size}: set --vocab-size {meta.vocab_size}")
