"""The driver's data layer: where tokens come from, and the batches one rank trains and evaluates on.

Sources (one per run):
  * ``--data-path P``: the preprocessed splits ``P.{train,valid,test}.bin/.idx`` through ``vqmoe_ds.data``
    (megatron-core's indexed format; vocabulary from ``P.tokenizer.json``);
  * ``--data-file F``: a text file read as bytes (vocab 256) and split in order 90/5/5 (enwik8-style);
  * neither: ``vqmoe_ds.data.default_corpus.generate(--corpus-bytes, --seed)`` -- deterministic, no download.

Batches: GPT trains on shuffled contiguous windows (``vqmoe_ds.data.LMBatches``; each rank a disjoint share);
Transformer-XL trains on ordered segments (``OrderedSegments``: B parallel streams per rank), carrying memory
from one segment to the next.  Both have a position (``state_dict``) that the checkpoint saves.  Evaluation
(``eval_batches``) covers every token of a split once, the last partial window or row included, with a mask
marking the padding that makes every batch the same shape on every rank.
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
    missing: Optional[Dict[str, str]] = None  # split -> why it is absent (preprocessed data without valid/test)

    def __post_init__(self):
        self.missing = dict(self.missing or {})
        self._counts: Dict[str, Optional[Dict[str, int]]] = {}

    def split_counts(self, split: str) -> Optional[Dict[str, int]]:
        """``{"tokens", "bytes", "chars", "words", "lines"}`` of the split's text (``vqmoe_ds.data.text_counts``),
        or None where they cannot be known: word or sentencepiece data preprocessed before the counts were
        recorded in its tokenizer.json.  Raw bytes and byte/char data are counted from their tokens."""
        if split not in self._counts:
            self._counts[split] = self._count(split)
        return self._counts[split]

    def _count(self, split: str) -> Optional[Dict[str, int]]:
        from ..data.text_counts import count_bytes

        stream = self.streams[split]
        recorded = (getattr(self.meta, "splits", None) or {}).get(split)
        if recorded and recorded.get("tokens") == len(stream):
            return dict(recorded)
        kind = self.meta.kind if self.meta is not None else "byte"
        if kind not in ("byte", "char"):
            return None
        ids = np.asarray(stream.read(0, len(stream)), dtype=np.int64)
        if kind == "byte":
            data = ids.astype(np.uint8).tobytes()
        else:
            data = "".join(np.asarray(list(self.meta.chars), dtype=object)[ids]).encode("utf-8")
        return {"tokens": len(stream), **count_bytes(data)}

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
        import os

        streams, missing = {}, {}
        streams["train"], meta = load_split(data_path, "train", model_vocab_size)
        for split in SPLITS[1:]:
            if not os.path.isfile(f"{data_path}.{split}.idx"):
                missing[split] = f"{data_path}.{split}.idx does not exist"
            elif meta.splits is not None and split not in meta.splits:
                missing[split] = f"{data_path}.tokenizer.json records no {split} split (its .bin/.idx are stale)"
            else:
                streams[split], _ = load_split(data_path, split, model_vocab_size)
        present = ",".join(s for s in SPLITS if s in streams)
        return Corpus(streams, meta.vocab_size, f"{data_path}.{{{present}}}", meta.kind, meta, missing)
    if model_vocab_size is not None and model_vocab_size < 256:  # --data-file and the default corpus are bytes
        raise DataError(f"--vocab-size {model_vocab_size} is smaller than the 256 byte values of "
                        f"{'--data-file ' + data_file if data_file else 'the default corpus'}: drop --vocab-size "
                        f"(or set 256 or more)")
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


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def predictable_tokens(stream) -> int:
    """Tokens of a split that a language model predicts: all but the first (it has no context)."""
    return max(0, len(stream) - 1)


def eval_batches(stream, model: str, batch_size: int, seq_len: int, rank: int, world_size: int,
                 max_batches: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's evaluation batches ``(input [B, T], target [B, T], mask [B, T])`` in stream order.

    Together the ranks predict every token of the split but the first exactly once (``max_batches`` = 0) or
    the first ``max_batches`` batches of every rank.  ``mask`` is False on padding: the last window (GPT) or the
    end of the last rows (Transformer-XL) is padded to the batch's shape, and a rank with fewer real windows
    than another runs whole padding batches, so every rank runs the same number of equally sized forwards
    (the MoE all-to-all is collective).  Padding holds token 0; the models route no padding
    (``forward(..., mask_BT=mask)``) and ``NLLMeter.add(..., mask)`` counts none of it.

    GPT: windows ``k = 0, 1, ...`` predict targets ``k*T + 1 ... k*T + T`` from the window's own context;
    window k belongs to rank ``k % world_size``.  Transformer-XL: the ``n - 1`` targets are cut in order into
    ``batch_size x world_size`` rows of ``L = ceil((n - 1) / rows)`` (the last rows shorter, or empty); rank r owns
    rows ``r*B ... r*B + B - 1``, read segment after segment of ``T`` tokens (the last segment shorter), to be
    run with memory."""
    n_pred = predictable_tokens(stream)
    if n_pred < 1:
        raise DataError(f"the evaluation split has {len(stream)} token(s), nothing to predict: give a split of at "
                        f"least 2 tokens")
    if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size:
        raise DataError(f"batch_size={batch_size}, seq_len={seq_len} must be >= 1 and rank={rank} in "
                        f"[0, {world_size})")
    B, T = batch_size, seq_len
    if model == "gpt":
        windows = _ceil_div(n_pred, T)
        n = _ceil_div(_ceil_div(windows, world_size), B)
        n = min(n, max_batches) if max_batches else n
        for b in range(n):
            x, y = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
            mask = torch.zeros(B, T, dtype=torch.bool)
            for j in range(B):
                k = (b * B + j) * world_size + rank
                if k >= windows:
                    break
                t = min(T, n_pred - k * T)
                w = torch.from_numpy(np.asarray(stream.read(k * T, t + 1), dtype=np.int64))
                x[j, :t], y[j, :t], mask[j, :t] = w[:-1], w[1:], True
            yield x, y, mask
    else:
        rows = B * world_size
        L = _ceil_div(n_pred, rows)
        n = _ceil_div(L, T)
        n = min(n, max_batches) if max_batches else n
        for i in range(n):
            t = min(T, L - i * T)
            x, y = torch.zeros(B, t, dtype=torch.long), torch.zeros(B, t, dtype=torch.long)
            mask = torch.zeros(B, t, dtype=torch.bool)
            for j in range(B):
                q = rank * B + j
                real = min(t, max(0, min(L, n_pred - q * L) - i * T))
                if real > 0:
                    w = torch.from_numpy(np.asarray(stream.read(q * L + i * T, real + 1), dtype=np.int64))
                    x[j, :real], y[j, :real], mask[j, :real] = w[:-1], w[1:], True
            yield x, y, mask


def eval_sizes_ok(stream, model: str, batch_size: int, seq_len: int, world_size: int, split: str = "evaluation"
                  ) -> None:
    """Raise a one-line DataError now if a split is too small to evaluate (instead of at the first eval)."""
    if predictable_tokens(stream) < 1:
        raise DataError(f"the {split} split has {len(stream)} token(s), nothing to predict: give a larger corpus")


__all__: List[str] = ["Corpus", "load_corpus", "TrainBatches", "eval_batches", "eval_sizes_ok", "predictable_tokens",
                      "split_in_order", "bytes_to_tokens"]
