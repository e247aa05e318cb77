"""From a ``--data-path`` prefix (what tools/preprocess_data.py wrote) to the datasets the driver trains on.

Why a separate entry point: the driver should not know the file layout (``P.<split>.bin/.idx``,
``P.tokenizer.json``); it passes the prefix, the split, its parallel position and its model's vocabulary
size, and gets back a dataset that has already been checked against that model.
"""
from __future__ import annotations

from typing import Optional, Tuple

from .errors import DataError
from .metadata import TokenizerMeta, check_vocab
from .token_stream import ArrayTokenStream, IndexedTokenStream


def load_split(data_path: str, split: str, model_vocab_size: Optional[int] = None
               ) -> Tuple[IndexedTokenStream, TokenizerMeta]:
    """The token stream of ``<data_path>.<split>`` and the corpus' tokenizer metadata, checked against the model."""
    meta = TokenizerMeta.load(data_path + ".tokenizer.json")
    if model_vocab_size is not None:
        check_vocab(meta, model_vocab_size)
    stream = IndexedTokenStream(f"{data_path}.{split}")
    if stream.dtype != meta.dtype:
        raise DataError(f"{data_path}.{split}.idx stores {stream.dtype} tokens but {data_path}.tokenizer.json says "
                        f"{meta.dtype}: the files come from different preprocessing runs; re-run preprocess_data.py")
    return stream, meta


def build_lm_dataset(data_path: str, split: str, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                     shuffle: bool = True, model_vocab_size: Optional[int] = None):
    """GPT windows (see ``LMDataset``) of ``<data_path>.<split>``."""
    from .lm_dataset import LMDataset

    stream, _ = load_split(data_path, split, model_vocab_size)
    return LMDataset(stream, seq_len, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
                     name=f"{data_path}.{split}")


def build_segments(data_path: str, split: str, batch_size: int, tgt_len: int, rank: int = 0, world_size: int = 1,
                   start_index: int = 0, model_vocab_size: Optional[int] = None):
    """Transformer-XL ordered segments (see ``OrderedSegments``) of ``<data_path>.<split>``."""
    from .segments import OrderedSegments

    stream, _ = load_split(data_path, split, model_vocab_size)
    return OrderedSegments(stream, batch_size, tgt_len, rank=rank, world_size=world_size, start_index=start_index,
                           name=f"{data_path}.{split}")


def text_stream(text: str, tokenizer) -> ArrayTokenStream:
    """The in-memory path: ``text`` tokenized into a stream, no preprocessing (the demo's default corpus)."""
    import numpy as np

    if hasattr(tokenizer, "encode_bytes"):
        return ArrayTokenStream(tokenizer.encode_bytes(text.encode("utf-8")), tokenizer.vocab_size)
    return ArrayTokenStream(np.asarray(tokenizer.encode(text), dtype=np.int64), tokenizer.vocab_size)
