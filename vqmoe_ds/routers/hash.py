"""Hash routing (Roller et al., "Hash Layers for Large Sparse Models", 2021): a fixed table sends every token
id to one expert, whatever its hidden state.  A discrete baseline beside VQ routing: both pick one expert per
token from a discrete key, but the hash key is the token's identity and is never learned.

The table is a buffer (saved with the model, the same on every rank):

  * ``"random"``: a seeded random table (each id to an expert drawn uniformly; the seed is ``hash_seed``);
  * ``"balanced"``: built from the token frequencies of the training data by `balanced_table` (the most
    frequent ids first, each to the expert with the least total frequency so far), so that the expected load
    is as even as a fixed table allows.  The training driver calls `fit_hash_tables` with the counts before
    the first step; until then the table is the random one.

One route per token with weight 1, no auxiliary loss, no parameters.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .base import Router, Routing


def random_table(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_experts, (vocab_size,), generator=g, device="cpu")


def balanced_table(counts_V: Sequence[int], num_experts: int) -> torch.Tensor:
    """Greedy bin packing of the ids by frequency: each id, most frequent first (ties: lower id first), goes
    to the expert whose assigned frequency is smallest so far (ties: lower expert)."""
    counts = np.asarray(counts_V, dtype=np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))
    load = np.zeros(num_experts, dtype=np.int64)
    table = np.zeros(len(counts), dtype=np.int64)
    for v in order:
        e = int(np.argmin(load))
        table[v] = e
        load[e] += counts[v]
    return torch.from_numpy(table)


class HashRouter(Router):
    def __init__(self, vocab_size: int, num_experts: int, table: str = "random", seed: int = 0):
        super().__init__(num_experts)
        if vocab_size is None or vocab_size < 1:
            raise ValueError("hash routing needs the vocabulary size (the model passes it) and token ids")
        self.kind = table
        self.register_buffer("table_V", random_table(vocab_size, num_experts, seed))

    def fit(self, counts_V: Sequence[int]) -> None:
        """Replace the table by the balanced one for these token frequencies (``table="balanced"`` only)."""
        if self.kind != "balanced":
            return
        if len(counts_V) != self.table_V.numel():
            raise ValueError(f"token counts for {len(counts_V)} ids, the table has {self.table_V.numel()}")
        self.table_V.copy_(balanced_table(counts_V, self.num_experts).to(self.table_V.device))

    def forward(self, x_TD: torch.Tensor, ids_T: Optional[torch.Tensor] = None, seq_len=None) -> Routing:
        if ids_T is None:
            raise ValueError("hash routing needs the input token ids: the model passes them to its MoE layers "
                             "(call the layer as layer(x, mask, ids))")
        experts_TK = self.table_V.index_select(0, ids_T.reshape(-1)).unsqueeze(1)
        weights_TK = torch.ones(experts_TK.shape, dtype=torch.float32, device=x_TD.device)
        return Routing(experts_TK, weights_TK, x_TD.new_zeros((), dtype=torch.float32), unit_weights=True)


def fit_hash_tables(model: nn.Module, counts_V: Sequence[int]) -> int:
    """Give every balanced hash router of ``model`` the table for these token frequencies; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, HashRouter) and m.kind == "balanced":
            m.fit(counts_V)
            n += 1
    return n
