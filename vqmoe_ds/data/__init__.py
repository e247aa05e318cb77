"""Corpora, tokenizers and datasets of vqmoe-ds.

Entry points for the training driver (see docs/data.md)::

    from vqmoe_ds.data import build_lm_dataset, build_segments, load_split, check_vocab, LMBatches
    ds = build_lm_dataset(args.data_path, "train", seq_len, seed, rank, world_size, model_vocab_size=V)
    batches = LMBatches(ds, micro_batch_size)            # state_dict()/load_state_dict() for checkpoints
    segs = build_segments(args.data_path, "valid", batch_size, tgt_len, rank, world_size, model_vocab_size=V)

Modules that need torch or megatron-core are imported on first use, so the download and preprocessing tools
start fast.
"""
from .errors import DataError
from .metadata import TokenizerMeta, check_vocab, choose_dtype

_LAZY = {
    "ArrayTokenStream": "token_stream", "IndexedTokenStream": "token_stream",
    "LMDataset": "lm_dataset", "LMBatches": "lm_dataset", "OrderedSegments": "segments",
    "load_split": "loading", "build_lm_dataset": "loading", "build_segments": "loading", "text_stream": "loading",
    "Tokenizer": "tokenizers", "ByteTokenizer": "tokenizers", "CharTokenizer": "tokenizers",
    "WordTokenizer": "tokenizers", "SentencePieceTokenizer": "tokenizers",
    "PreprocessConfig": "preprocess", "preprocess_corpus": "preprocess",
}

__all__ = ["DataError", "TokenizerMeta", "check_vocab", "choose_dtype", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
