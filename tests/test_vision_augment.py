"""Augmentation on a hand-made image: crop offsets and zero padding land where they should, the flip mirrors
columns, random draws only ever produce one of the (2p+1)^2 x 2 legal crops, and normalisation."""
import numpy as np
import torch

from vqmoe_ds.vision.augment import channel_stats, normalize, random_crop_flip, to_tensor


def hand_image():
    """1 x 2 channels x 4 x 5: channel 0 holds 10*row + col + 1 (no zero inside), channel 1 its negative."""
    base = torch.tensor([[10 * r + c + 1 for c in range(5)] for r in range(4)], dtype=torch.float32)
    return torch.stack([base, -base])[None]


def test_crop_offsets_and_padding():
    x = hand_image()
    same = random_crop_flip(x, padding=4, offsets_B2=torch.tensor([[4, 4]]), flips_B=torch.tensor([False]))
    torch.testing.assert_close(same, x)  # offset = padding: the original window
    shifted = random_crop_flip(x, padding=4, offsets_B2=torch.tensor([[3, 6]]), flips_B=torch.tensor([False]))
    # window starts one row above and two columns right of the image: row 0 is padding, the last 2 columns too
    want = torch.zeros_like(x)
    want[0, :, 1:, :3] = x[0, :, :3, 2:]
    torch.testing.assert_close(shifted, want)
    corner = random_crop_flip(x, padding=4, offsets_B2=torch.tensor([[0, 0]]), flips_B=torch.tensor([False]))
    assert corner.abs().sum() == 0  # entirely inside the zero padding (4 rows > image height 4)


def test_flip_mirrors_columns():
    x = hand_image()
    flipped = random_crop_flip(x, padding=4, offsets_B2=torch.tensor([[4, 4]]), flips_B=torch.tensor([True]))
    assert flipped[0, 0, 2].tolist() == [25.0, 24.0, 23.0, 22.0, 21.0]
    torch.testing.assert_close(flipped, x.flip(-1))
    both = random_crop_flip(x, padding=4, offsets_B2=torch.tensor([[4, 5]]), flips_B=torch.tensor([True]))
    # crop one column right, then mirror: the first output column is padding, the rest columns 4..1 reversed
    assert both[0, 0, 0].tolist() == [0.0, 5.0, 4.0, 3.0, 2.0]


def test_random_draws_are_legal_crops_and_keep_shape_dtype():
    x = torch.randint(1, 255, (64, 3, 8, 8), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, generator=g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen_flip = seen_shift = False
    for b in range(64):
        cands = [(padded[b, :, i:i + 8, j:j + 8], f) for i in range(5) for j in range(5) for f in (False, True)]
        hits = [(c.flip(-1) if f else c) for c, f in cands if torch.equal(c.flip(-1) if f else c, out[b])]
        assert hits, f"image {b} is not a padded crop (+flip) of its input"
        seen_flip |= not torch.equal(out[b], padded[b, :, 2:10, 2:10])
        seen_shift |= (out[b] == 0).any().item()
    assert seen_flip and seen_shift
    no_flip = random_crop_flip(x, padding=0, flip=False, generator=g)
    torch.testing.assert_close(no_flip, x)  # no padding, no flip: identity


def test_to_tensor_normalize_and_stats():
    imgs = np.zeros((2, 3, 4, 3), np.uint8)
    imgs[..., 0], imgs[..., 1], imgs[..., 2] = 255, 0, 51
    t = to_tensor(imgs)
    assert t.shape == (2, 3, 3, 4) and t[0, 0, 1, 2] == 255 and t[0, 2, 0, 0] == 51
    y = normalize(t, mean=[1.0, 0.0, 0.1], std=[0.5, 1.0, 0.1])
    torch.testing.assert_close(y[:, 0], torch.zeros(2, 3, 4))
    torch.testing.assert_close(y[:, 2], torch.ones(2, 3, 4), atol=1e-6, rtol=0)
    half = np.concatenate([np.zeros((5, 2, 2, 3), np.uint8), np.full((5, 2, 2, 3), 255, np.uint8)])
    mean, std = channel_stats(half)
    np.testing.assert_allclose(mean, [0.5] * 3)
    np.testing.assert_allclose(std, [0.5] * 3)
