"""Labelled text for fine-tuning: read with the readers of ``vqmoe_ds.data.classification``, tokenized with the
pretrained model's tokenizer, cut to the model's context, and batched per rank.

Batches are padded to the longest text in the batch (not to the context), so padding costs as little expert
compute and capacity as possible; pads sit after the text, so in a causal model they never change the hidden
states of real tokens, and ``mask_BT`` keeps them out of the pooling.  Every rank runs the same number of
batches (expert parallelism exchanges tokens in every forward): evaluation fills the last batches with copies of
example 0 of weight 0.
"""
from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from typing import Iterator, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data import DataError
from ..data import classification as cls

TaskName = Literal["sst2", "sst5", "imdb", "banking77", "tsv", "csv"]
TASKS = typing.get_args(TaskName)


def read_task(task: str, path: str, label_names: Optional[Sequence[str]] = None, text_column: str = "text",
              label_column: str = "label") -> cls.ClassificationData:
    """One split of a task.  IMDB: ``path`` is ``aclImdb/train`` or ``aclImdb/test``; tsv/csv: a header row naming
    ``text_column`` and ``label_column`` (label names; ids are the sorted names of the train split)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if task == "sst2":
        return cls.read_sst2(path)
    if task == "sst5":
        return cls.read_sst5(path)
    if task == "imdb":
        p = os.path.normpath(path)
        return cls.read_imdb(os.path.dirname(p), os.path.basename(p))
    if task == "banking77":
        return cls.read_banking77(path, label_names)
    return cls.read_table(path, text_column, label_column, "\t" if task == "tsv" else ",", label_names)


@dataclass
class EncodedSet:
    ids: List[np.ndarray]
    labels: np.ndarray
    label_names: List[str]
    truncated: int  # how many texts were cut to max_len

    def __len__(self):
        return len(self.ids)


def encode(data: cls.ClassificationData, tokenizer, max_len: int, where: str) -> EncodedSet:
    ids, truncated = [], 0
    for i, (text, _) in enumerate(data.examples):
        t = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if t.size == 0:
            raise DataError(f"{where}: example {i} has an empty text: remove it or give it text")
        truncated += int(t.size > max_len)
        ids.append(t[:max_len])
    return EncodedSet(ids, np.asarray([y for _, y in data.examples], dtype=np.int64), list(data.label_names),
                      truncated)


def collate(items: List[np.ndarray], pad_id: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    T = max(len(x) for x in items)
    idx = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.bool)
    for b, x in enumerate(items):
        idx[b, :len(x)] = torch.from_numpy(x)
        mask[b, :len(x)] = True
    return idx, mask


class TrainBatches:
    """Endless shuffled micro-batches of this rank: one permutation per epoch (same seed on every rank), each
    rank taking every world-th example of it.  ``state_dict`` = (epoch, position)."""

    def __init__(self, data: EncodedSet, micro_batch: int, rank: int, world: int, seed: int):
        if len(data) < micro_batch * world:
            raise DataError(f"the train split has {len(data)} examples, fewer than one global batch "
                            f"({micro_batch} x {world} ranks): lower --micro-batch-size or give more data")
        self.data, self.B, self.rank, self.world, self.seed = data, micro_batch, rank, world, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self):
        g = np.random.default_rng(self.seed + self.epoch)
        n = len(self.data) // self.world * self.world
        return g.permutation(len(self.data))[:n][self.rank::self.world]

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos + self.B > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm()
        pick = self._order[self.pos:self.pos + self.B]
        self.pos += self.B
        idx, mask = collate([self.data.ids[i] for i in pick])
        return idx, mask, torch.from_numpy(self.data.labels[pick])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()


def eval_batches(data: EncodedSet, batch: int, rank: int, world: int
                 ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(idx, mask, labels, weight) in order; example j goes to rank j % world; weight 0 marks filler."""
    mine = list(range(rank, len(data), world))
    per_rank = -(-len(data) // world)
    n_batches = -(-per_rank // batch)
    mine += [-1] * (n_batches * batch - len(mine))
    for b in range(n_batches):
        pick = mine[b * batch:(b + 1) * batch]
        idx, mask = collate([data.ids[max(i, 0)] for i in pick])
        labels = torch.tensor([data.labels[max(i, 0)] for i in pick])
        yield idx, mask, labels, torch.tensor([float(i >= 0) for i in pick])
