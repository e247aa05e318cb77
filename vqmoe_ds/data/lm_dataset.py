"""GPT-style training samples: (input, target) windows of ``seq_len`` cut from a token stream.

Sample k of the stream is ``tokens[k*seq_len : k*seq_len + seq_len + 1]``: input is its first ``seq_len``
tokens, target the last ``seq_len`` (shifted by one), so consecutive samples share one boundary token and
every token but the first is a target exactly once per epoch.

Order: each epoch visits the samples in a permutation drawn from ``(seed, epoch)`` (or in stream order with
``shuffle=False``).  Data parallelism: position p of the epoch's order belongs to rank ``p % world_size``, and
every rank gets ``num_samples // world_size`` samples (the last few positions are dropped), so ranks see
disjoint samples and take the same number of steps.  Resuming: the position is ``(epoch, index)``;
``LMBatches.state_dict()`` is what the training driver checkpoints.

Why not megatron-core's ``GPTDataset``: it shuffles *documents* before cutting samples and builds its
sample index as cache files coordinated through ``torch.distributed``; the character-level benchmarks need
windows cut from the corpus in its own order (enwik8's split is one contiguous byte range, and the
Transformer-XL segment iterator must follow the same stream), and their samples are a pure function of a
position, so a permutation of positions is all the index there is.  The tokens themselves are still read
through megatron-core's ``IndexedDataset`` (see ``token_stream.py``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .errors import DataError


class LMDataset(torch.utils.data.Dataset):
    """This rank's share of one epoch of GPT windows; ``dataset[j]`` is its j-th sample of the epoch."""

    def __init__(self, stream, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, epoch: int = 0, name: str = "corpus"):
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.num_samples = (len(stream) - 1) // seq_len
        if self.num_samples < world_size:
            raise DataError(f"{name} has {len(stream)} tokens, too few for {world_size} sample(s) of seq_len "
                            f"{seq_len} (+1 target token) per rank: use a larger corpus or a smaller --seq-length")
        self.samples_per_rank = self.num_samples // world_size
        self._order_epoch, self._order = None, None
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: Optional[int] = None) -> np.ndarray:
        """The global sample order of ``epoch`` (all ranks compute the same one)."""
        epoch = self.epoch if epoch is None else epoch
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def sample_id(self, j: int) -> int:
        """Which window of the stream is this rank's j-th sample in the current epoch."""
        if not 0 <= j < self.samples_per_rank:
            raise IndexError(f"sample {j} outside [0, {self.samples_per_rank})")
        return int(self.order()[j * self.world_size + self.rank])

    def window(self, k: int) -> np.ndarray:
        return self.stream.read(k * self.seq_len, self.seq_len + 1)

    def __len__(self) -> int:
        return self.samples_per_rank

    def __getitem__(self, j: int) -> Tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.window(self.sample_id(j)))
        return w[:-1], w[1:]


class LMBatches:
    """Endless iterator of ``(input [B, T], target [B, T])`` int64 batches over epochs, resumable.

    An epoch ends when fewer than ``batch_size`` of this rank's samples are left (those are skipped, the
    same on every rank).  ``state_dict()`` = ``{"epoch", "index"}`` of the next batch's first sample.
    """

    def __init__(self, dataset: LMDataset, batch_size: int, epoch: int = 0, start_index: int = 0):
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if dataset.samples_per_rank < batch_size:
            raise DataError(f"the corpus gives {dataset.samples_per_rank} samples of seq_len {dataset.seq_len} per "
                            f"rank, fewer than one batch of {batch_size}: lower --micro-batch-size or --seq-length")
        self.dataset, self.batch_size = dataset, batch_size
        self.batches_per_epoch = dataset.samples_per_rank // batch_size
        self.load_state_dict({"epoch": epoch, "index": start_index})

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.dataset.samples_per_rank:
            raise DataError(f"data position {state} is outside the dataset ({self.dataset.samples_per_rank} samples "
                            f"per rank): the checkpoint was made with other data or settings")
        self.epoch, self.index = epoch, index

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.index + self.batch_size > self.dataset.samples_per_rank:
            self.epoch, self.index = self.epoch + 1, 0
        self.dataset.set_epoch(self.epoch)
        items = [self.dataset[j] for j in range(self.index, self.index + self.batch_size)]
        self.index += self.batch_size
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
