"""Transformer-XL's ordered segment iterator: B parallel streams read in order, segment after segment.

The token stream is cut into ``batch_size x world_size`` equal contiguous pieces (the tail that does not
divide is dropped); rank r owns pieces ``r*B ... r*B + B - 1``, one per batch row.  Segment i holds, for every
row, tokens ``[i*tgt_len, i*tgt_len + T)`` of its piece as input and the next token of each as target, so
row b of segment i+1 continues exactly where row b of segment i stopped -- what lets the model carry its
memory (``mems``) from one segment to the next.  The last segment may be shorter than ``tgt_len``.

Every rank has the same number of segments, so data-parallel ranks step together.  The position is the
index of the next segment (``state_dict``/``load_state_dict`` or ``start_index``); after a resume the model's
memory must be rebuilt (or was checkpointed) by the driver.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np
import torch

from .errors import DataError


class OrderedSegments:
    def __init__(self, stream, batch_size: int, tgt_len: int, rank: int = 0, world_size: int = 1,
                 start_index: int = 0, name: str = "corpus"):
        if batch_size < 1 or tgt_len < 1:
            raise DataError(f"batch_size={batch_size} and tgt_len={tgt_len} must both be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.stream, self.batch_size, self.tgt_len = stream, batch_size, tgt_len
        self.rank, self.world_size = rank, world_size
        self.piece_len = len(stream) // (batch_size * world_size)
        if self.piece_len < 2:
            raise DataError(f"{name} has {len(stream)} tokens, too few for {batch_size * world_size} parallel "
                            f"streams of at least 2 tokens: use a larger corpus or a smaller batch size")
        self.num_segments = -(-(self.piece_len - 1) // tgt_len)
        self.load_state_dict({"index": start_index})

    def __len__(self) -> int:
        return self.num_segments

    def state_dict(self) -> Dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        index = int(state["index"])
        if not 0 <= index <= self.num_segments:
            raise DataError(f"segment position {index} is outside [0, {self.num_segments}]: the checkpoint was "
                            f"made with other data or settings")
        self.index = index

    def segment(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Segment i as ``(input [B, T], target [B, T])`` int64, T = min(tgt_len, piece_len - 1 - i*tgt_len)."""
        start = i * self.tgt_len
        t = min(self.tgt_len, self.piece_len - 1 - start)
        first_row = self.rank * self.batch_size
        rows = np.stack([self.stream.read((first_row + b) * self.piece_len + start, t + 1)
                         for b in range(self.batch_size)])
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        while self.index < self.num_segments:
            seg = self.segment(self.index)
            self.index += 1
            yield seg
