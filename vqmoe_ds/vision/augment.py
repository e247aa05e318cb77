"""The standard CIFAR augmentation in torch, on a batch: random crop with zero padding, horizontal flip.

Why on uint8 batches before normalisation: padding with 0 is black, as in the usual recipe; after
normalisation a 0 would be the mean colour.  Why vectorised: one gather per batch instead of a Python loop
over images.  Randomness comes from an explicit ``torch.Generator`` so that runs are reproducible and each
rank draws its own crops.
"""
from __future__ import annotations

import typing
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Augment = Literal["standard", "crop", "none"]  # crop+flip, crop only (sets whose labels a flip changes), nothing
AUGMENTS = typing.get_args(Augment)


def random_crop_flip(x_BCHW: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: Optional[torch.Generator] = None, offsets_B2: Optional[torch.Tensor] = None,
                     flips_B: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each image: pad by ``padding`` zeros on every side, cut an H x W window at a random offset in
    [0, 2 * padding] (both axes), then mirror left-right with probability 1/2.

    ``offsets_B2`` (row, column offsets in the padded image) and ``flips_B`` (bool) replace the random draws
    (tests).  Same shape and dtype out as in."""
    B, C, H, W = x_BCHW.shape
    if offsets_B2 is None:
        offsets_B2 = torch.randint(0, 2 * padding + 1, (B, 2), generator=generator)
    if flips_B is None:
        flips_B = (torch.rand(B, generator=generator) < 0.5) if flip else torch.zeros(B, dtype=torch.bool)
    padded = F.pad(x_BCHW, (padding, padding, padding, padding)) if padding else x_BCHW
    rows_BH = offsets_B2[:, :1] + torch.arange(H)  # [B, H] rows of the padded image
    cols_BW = offsets_B2[:, 1:] + torch.arange(W)
    cols_BW = torch.where(flips_B[:, None], cols_BW.flip(1), cols_BW)  # a flip reads the window's columns backwards
    b = torch.arange(B)[:, None, None]
    out_BHWC = padded.permute(0, 2, 3, 1)[b, rows_BH[:, :, None], cols_BW[:, None, :]]
    return out_BHWC.permute(0, 3, 1, 2).contiguous()


def to_tensor(images_BHWC: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, C] numpy -> uint8 [B, C, H, W] torch."""
    return torch.from_numpy(np.ascontiguousarray(images_BHWC)).permute(0, 3, 1, 2).contiguous()


def normalize(x_BCHW_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 -> float32 (x / 255 - mean) / std per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x_BCHW_u8.float() / 255.0 - m) / s


def channel_stats(images, max_images: int = 10000, seed: int = 0):
    """Per-channel mean and std (in [0, 1] units) over up to ``max_images`` images chosen by ``seed``."""
    n = len(images)
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:max_images]) if n > max_images else np.arange(n)
    x = np.asarray(images[idx], dtype=np.float64) / 255.0
    flat = x.reshape(-1, x.shape[-1])
    return flat.mean(0).tolist(), np.maximum(flat.std(0), 1e-3).tolist()
