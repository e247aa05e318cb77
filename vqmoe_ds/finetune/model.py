"""Sequence classifier on a pretrained language model: the LM head is dropped, the final (LayerNormed) hidden
states are pooled (mean over the real tokens, or the last real token -- in a causal model the only position
that has read the whole text), and a classifier of two fully connected layers maps them to labels.

Why replace ``lm_head`` by an identity instead of a new forward: the backbone keeps its own forward (GPT or
Transformer-XL, MoE layers and their auxiliary losses unchanged) and returns ``ln_f(h)`` where it returned
logits, so nothing of the model code is duplicated here.
"""
from __future__ import annotations

import typing
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

Pooling = Literal["mean", "last"]
POOLINGS = typing.get_args(Pooling)


def pool(h_BTD: torch.Tensor, mask_BT: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over the positions where ``mask_BT`` is true, or the hidden state of the last such position."""
    m = mask_BT.to(h_BTD.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (h_BTD * m).sum(1) / m.sum(1).clamp_min(1.0)
    last_B = mask_BT.long().sum(1).clamp_min(1) - 1
    return h_BTD[torch.arange(h_BTD.shape[0], device=h_BTD.device), last_B]


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str = "mean", hidden: Optional[int] = None,
                 dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
        backbone.lm_head = nn.Identity()  # also unties it from the token embedding
        self.backbone, self.pooling = backbone, pooling
        D = backbone.cfg.d_model
        H = hidden or D
        self.classifier = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Dropout(dropout), nn.Linear(H, num_labels))

    def embed(self, idx_BT: torch.Tensor, mask_BT: torch.Tensor):
        """(pooled hidden states [B, D], summed auxiliary loss of the MoE layers)."""
        h_BTD, _, aux, _ = self.backbone(idx_BT, mask_BT=mask_BT)  # padding takes no expert route or capacity
        return pool(h_BTD, mask_BT, self.pooling), aux

    def forward(self, idx_BT, mask_BT, labels_B=None):
        """(logits [B, C], mean cross-entropy or None, auxiliary loss)."""
        z_BD, aux = self.embed(idx_BT, mask_BT)
        logits_BC = self.classifier(z_BD)
        loss = F.cross_entropy(logits_BC.float(), labels_B) if labels_B is not None else None
        return logits_BC, loss, aux
