"""Random shifts and rotations of a training batch, as tensor operations on the whole batch.

Both trainings call ``augment_batch`` on every training batch with a generator from
``augment_generator``, so they stay bit-identical. A shift (whole pixels, background slides in)
is exact; a rotation resamples bilinearly, the shift included. Labels never change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Augmentation draws come from their own stream, not the batch-order one:
# turning augmentation on does not change the order of the batches.
AUGMENT_SEED_OFFSET = 1_000_003


def augment_generator(seed: int) -> torch.Generator:
    """The generator both trainings draw their augmentations from, for ``train.seed``."""
    return torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)


def augment_batch(images: torch.Tensor, generator: torch.Generator, shift: int = 0,
                  rotate: float = 0.0) -> torch.Tensor:
    """``images`` (B, H, W), each shifted by up to ``shift`` px and turned by up to ``rotate`` degrees
    (uniform draws); with neither, the batch as it is, and the generator untouched."""
    if not shift and not rotate:
        return images
    n = len(images)
    offsets = torch.randint(-shift, shift + 1, (2, n), generator=generator)  # (dy, dx) per image
    if not rotate:
        return _shift(images, offsets.to(images.device), shift)
    angles = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(rotate)
    return _rotate_and_shift(images, angles, offsets)


def _shift(images: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Move image i down by offsets[0, i] and right by offsets[1, i] pixels, exactly."""
    n, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)).reshape(n, -1)
    rows = torch.arange(height, device=images.device)[None, :] - offsets[0][:, None] + pad  # (B, H)
    cols = torch.arange(width, device=images.device)[None, :] - offsets[1][:, None] + pad  # (B, W)
    # One gather over the flattened padded images: far faster than advanced indexing (docs/performance.md).
    index = (rows[:, :, None] * (width + 2 * pad) + cols[:, None, :]).reshape(n, -1)
    return padded.gather(1, index).reshape(n, height, width)


def _rotate_and_shift(images: torch.Tensor, angles: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Turn each image about its centre, then shift it, in one bilinear resampling."""
    n, height, width = images.shape
    cos, sin = torch.cos(angles), torch.sin(angles)
    # affine_grid maps output to input coordinates in [-1, 1] (align_corners=False):
    # the inverse rotation, and a shift of k pixels is 2k/side.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, sin
    theta[:, 1, 0], theta[:, 1, 1] = -sin, cos
    theta[:, 0, 2] = -2 * offsets[1].double() / width
    theta[:, 1, 2] = -2 * offsets[0].double() / height
    grid = F.affine_grid(theta.to(images.dtype).to(images.device), [n, 1, height, width], align_corners=False)
    return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
