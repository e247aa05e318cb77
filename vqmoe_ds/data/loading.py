"""From a ``--data-path`` prefix (what tools/preprocess_data.py wrote) to the datasets the driver trains on.

Why a separate entry point: the driver should not know the file layout (``P.<split>.bin/.idx``,
``P.tokenizer.json``); it passes the prefix, the split, its parallel position and its model's vocabulary
size, and gets back a dataset that has already been checked against that model.
"""
from __future__ import annotations

import difflib
from typing import Optional, Tuple

import numpy as np

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
    check_tokens(stream, meta, data_path, split)
    return stream, meta


SAMPLE = 1 << 16  # tokens read from the start of a split for the checks below
# byte values that plain text (UTF-8, any language) almost never holds: the C0 controls but tab, newline and
# carriage return, and DEL.  Measured: 0 in enwik8's first 64 KiB and in War and Peace; a char-level .bin read as
# bytes is mostly in this range (its ids are indices into a sorted alphabet, space = 1).
_CONTROL = np.array([b for b in range(32) if b not in (9, 10, 13)] + [127])


def check_tokens(stream, meta: TokenizerMeta, data_path: str, split: str) -> None:
    """Refuse a split whose tokens were not written with ``<data_path>.tokenizer.json``: a token count other than
    the one preprocessing recorded for the split, ids beyond the vocabulary, bytes that are not text for a byte
    tokenizer, and for the learned tokenizers (word, sentencepiece, hf) a sample that does not survive decoding and
    re-encoding (another tokenizer's ids decode to text that encodes differently; a word vocabulary re-encodes
    whatever it decodes, so there only the recorded count and the id range can tell)."""
    where = f"{data_path}.{split}.bin"
    fix = (f"the .bin and {data_path}.tokenizer.json come from different preprocessing runs or tokenizers: re-run "
           f"tools/preprocess_data.py with the tokenizer you want (it writes both)")
    recorded = ((meta.splits or {}).get(split) or {}).get("tokens")
    if recorded is not None and int(recorded) != len(stream):
        raise DataError(f"{where} holds {len(stream)} tokens, {data_path}.tokenizer.json recorded {recorded} for "
                        f"the {split} split: {fix}")
    ids = stream.read(0, min(len(stream), SAMPLE))
    if ids.size == 0:
        return
    top = int(ids.max())
    if top >= meta.vocab_size or int(ids.min()) < 0:
        raise DataError(f"{where} holds token id {top}, beyond the {meta.vocab_size}-token {meta.kind} vocabulary of "
                        f"{data_path}.tokenizer.json: {fix}")
    if meta.kind == "byte":
        share = float(np.isin(ids, _CONTROL).mean())
        if share > 0.01:
            raise DataError(f"{where} is not bytes of text ({100 * share:.0f}% of its first {ids.size} tokens are "
                            f"control characters) but {data_path}.tokenizer.json says byte: {fix}")
    elif meta.kind in ("word", "sentencepiece", "hf"):
        from .tokenizers import Tokenizer

        tok = Tokenizer.from_metadata(meta)
        sample = ids[:2048].tolist()
        agree = difflib.SequenceMatcher(None, sample, tok.encode(tok.decode(sample)), autojunk=False).ratio()
        if agree < 0.9:  # measured: 1.0 for each tokenizer on its own data, 0.72 for sentencepiece ids read by hf
            raise DataError(f"{where} does not decode and re-encode with the {meta.kind} tokenizer of "
                            f"{data_path}.tokenizer.json (a {len(sample)}-token sample comes back {100 * agree:.0f}% "
                            f"the same): {fix}")


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
