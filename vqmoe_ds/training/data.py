"""The driver's data layer: where tokens come from, and the batches one rank trains and evaluates on.

Sources (one per run):
  * ``--data-path P``: the preprocessed splits ``P.{train,valid,test}.bin/.idx`` through ``vqmoe_ds.data``
    (megatron-core's indexed format; vocabulary from ``P.tokenizer.json``);
  * ``--data-file F``: a text file read as bytes (vocab 256) and split in order 90/5/5 (enwik8-style);
  * neither: ``vqmoe_ds.data.default_corpus.generate(--corpus-bytes, --seed)`` -- deterministic, no download.

Batches: GPT trains on shuffled contiguous windows (``vqmoe_ds.data.LMBatches``; each rank a disjoint share)
and evaluates on windows in stream order; Transformer-XL reads ordered segments (``OrderedSegments``: B
parallel streams per rank) for training and evaluation, carrying memory from one segment to the next.  Both
have a position (``state_dict``) that the checkpoint saves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..data import ArrayTokenStream, DataError, LMBatches, LMDataset, OrderedSegments, load_split

SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.9, 0.05, 0.05)


@dataclass
class Corpus:
    streams: Dict[str, object]  # split -> token stream (len(), read(start, length))
    vocab_size: int
    source: str
    tokenizer: str = "byte"
    meta: Optional[object] = None  # TokenizerMeta of preprocessed data; None: raw bytes

    def token_counts(self, split: str = "train", chunk: int = 1 << 24) -> np.ndarray:
        """How often each token id occurs in ``split`` ([vocab_size] int64), read in chunks."""
        stream = self.streams[split]
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for start in range(0, len(stream), chunk):
            ids = np.asarray(stream.read(start, min(chunk, len(stream) - start)), dtype=np.int64)
            counts += np.bincount(ids, minlength=self.vocab_size)[:self.vocab_size]
        return counts

    def tokenizer_state(self) -> dict:
        """What a checkpoint records about the tokens, so tools can decode without the data folder."""
        import dataclasses

        return dataclasses.asdict(self.meta) if self.meta is not None else {"kind": "byte", "vocab_size": 256}


def bytes_to_tokens(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


def split_in_order(tokens: np.ndarray, name: str) -> Dict[str, ArrayTokenStream]:
    n = len(tokens)
    n_valid, n_test = int(n * SPLIT_FRACTIONS[1]), int(n * SPLIT_FRACTIONS[2])
    n_train = n - n_valid - n_test
    if min(n_train, n_valid, n_test) < 2:
        raise DataError(f"{name} has {n} tokens, too few to split 90/5/5: give a larger corpus")
    return {"train": ArrayTokenStream(tokens[:n_train], 256),
            "valid": ArrayTokenStream(tokens[n_train:n_train + n_valid], 256),
            "test": ArrayTokenStream(tokens[n_train + n_valid:], 256)}


def load_corpus(data_path: Optional[str] = None, data_file: Optional[str] = None, corpus_bytes: int = 2_000_000,
                seed: int = 0, model_vocab_size: Optional[int] = None) -> Corpus:
    if data_path:
        streams, meta = {}, None
        for split in SPLITS:
            streams[split], meta = load_split(data_path, split, model_vocab_size)
        return Corpus(streams, meta.vocab_size, f"{data_path}.{{train,valid,test}}", meta.kind, meta)
    if data_file:
        from ..data.errors import require_file

        require_file(data_file, "--data-file", "give a text file (it is read as bytes)")
        with open(data_file, "rb") as f:
            tokens = bytes_to_tokens(f.read())
        return Corpus(split_in_order(tokens, data_file), 256, data_file)
    from ..data.default_corpus import generate

    text = generate(corpus_bytes, seed)
    return Corpus(split_in_order(bytes_to_tokens(text.encode("ascii")), "the default corpus"), 256,
                  f"default synthetic corpus ({corpus_bytes} bytes, seed {seed})")


class TrainBatches:
    """Endless (input_BT, target_BT) micro-batches of this rank, with a checkpointable position.

    GPT: ``LMBatches`` over shuffled windows.  TXL: consecutive ordered segments (so consecutive micro-batches
    continue each other and the model's memory carries over); at the end of the split it starts again at
    segment 0 and ``new_epoch`` tells the caller to drop the memory."""

    def __init__(self, stream, model: str, micro_batch: int, seq_len: int, rank: int, world_size: int, seed: int):
        self.model = model
        self.epoch = 0
        self.new_epoch = False
        if model == "gpt":
            self.inner = LMBatches(LMDataset(stream, seq_len, seed=seed, rank=rank, world_size=world_size,
                                             name="the train split"), micro_batch)
        else:
            self.inner = OrderedSegments(stream, micro_batch, seq_len, rank=rank, world_size=world_size,
                                         name="the train split")
            self._it = iter(self.inner)

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        self.new_epoch = False
        if self.model == "gpt":
            return next(self.inner)
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self.new_epoch = True
            self.inner.load_state_dict({"index": 0})
            self._it = iter(self.inner)
            return next(self._it)

    def state_dict(self) -> Dict[str, int]:
        if self.model == "gpt":
            return dict(self.inner.state_dict())
        return {"epoch": self.epoch, **self.inner.state_dict()}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if self.model == "gpt":
            self.inner.load_state_dict(state)
        else:
            self.epoch = int(state.get("epoch", 0))
            self.inner.load_state_dict({"index": state["index"]})
            self._it = iter(self.inner)


def eval_batches(stream, model: str, batch_size: int, seq_len: int, rank: int, world_size: int,
                 max_batches: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """This rank's evaluation batches in stream order (every rank yields the same number).

    GPT: non-overlapping windows ``[k*T, k*T + T]`` (each token predicted once, context from its window);
    TXL: ordered segments, to be run with memory.  ``max_batches`` = 0: the whole split."""
    if model == "gpt":
        ds = LMDataset(stream, seq_len, rank=rank, world_size=world_size, shuffle=False, name="the evaluation split")
        n = ds.samples_per_rank // batch_size
        if n == 0:
            raise DataError(f"the evaluation split gives {ds.samples_per_rank} windows of {seq_len} per rank, fewer "
                            f"than one batch of {batch_size}: lower --eval-batch-size or use a larger corpus")
        n = min(n, max_batches) if max_batches else n
        for b in range(n):
            items = [ds[j] for j in range(b * batch_size, (b + 1) * batch_size)]
            yield torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
    else:
        segs = OrderedSegments(stream, batch_size, seq_len, rank=rank, world_size=world_size,
                               name="the evaluation split")
        n = min(len(segs), max_batches) if max_batches else len(segs)
        for i in range(n):
            yield segs.segment(i)


def eval_sizes_ok(stream, model: str, batch_size: int, seq_len: int, world_size: int) -> None:
    """Raise a one-line DataError now if a split is too small to evaluate (instead of at the first eval)."""
    next(eval_batches(stream, model, batch_size, seq_len, 0, world_size, 1))


__all__: List[str] = ["Corpus", "load_corpus", "TrainBatches", "eval_batches", "eval_sizes_ok", "split_in_order",
                      "bytes_to_tokens"]
