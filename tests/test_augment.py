"""Augmentation: whole-batch tensor operations, seeded, label-preserving, exact shifts."""

from __future__ import annotations

import numpy as np
import torch
from skorch.dataset import Dataset

from helpers import tiny_mnist_arrays
from mnist_dvc.augment import augment_batch, augment_generator
from mnist_dvc.skorch_net import TensorBatches

DIGITS = torch.from_numpy(tiny_mnist_arrays()["test_images"][:64]).float().div(255)


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """(row, col) of each image's ink."""
    rows = torch.arange(28.0)[None, :, None]
    cols = torch.arange(28.0)[None, None, :]
    mass = images.sum(dim=(1, 2))
    return torch.stack([(images * rows).sum(dim=(1, 2)) / mass, (images * cols).sum(dim=(1, 2)) / mass], 1)


def test_no_augmentation_returns_the_batch_and_draws_nothing():
    generator = augment_generator(0)
    state = generator.get_state()
    assert augment_batch(DIGITS, generator, 0, 0.0) is DIGITS
    assert torch.equal(generator.get_state(), state)


def test_shifts_move_the_ink_by_whole_pixels_within_the_requested_range():
    # Digits with a margin of at least 2 px all round: no ink slides out of the picture.
    margin = DIGITS[:, :2].sum((1, 2)) + DIGITS[:, -2:].sum((1, 2)) + DIGITS[:, :, :2].sum((1, 2)) + DIGITS[:, :, -2:].sum((1, 2))
    digits = DIGITS[margin == 0]
    assert len(digits) >= 40
    shifted = augment_batch(digits, augment_generator(0), shift=2)
    assert shifted.shape == digits.shape and shifted.dtype == digits.dtype
    moves = set()
    for before, after in zip(digits, shifted):
        # The same picture, moved: exactly one (dy, dx) in [-2, 2]^2 reproduces it.
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(torch.roll(before, (dy, dx), dims=(0, 1)), after)]
        assert len(matches) == 1, matches
        moves.add(matches[0])
    assert len(moves) >= 15  # all kinds of moves, not one for the whole batch
    # Centres of mass moved by the same whole amounts.
    delta = centre_of_mass(shifted) - centre_of_mass(digits)
    assert torch.allclose(delta, delta.round(), atol=1e-4) and delta.round().abs().max() == 2


def test_rotations_turn_about_the_centre_and_keep_the_ink():
    turned = augment_batch(DIGITS, augment_generator(0), shift=0, rotate=15.0)
    assert not torch.equal(turned, DIGITS)
    ink_before, ink_after = DIGITS.sum(dim=(1, 2)), turned.sum(dim=(1, 2))
    assert torch.allclose(ink_after, ink_before, rtol=0.05)  # bilinear resampling keeps the ink
    drift = (centre_of_mass(turned) - centre_of_mass(DIGITS)).norm(dim=1)
    assert drift.max() < 1.0  # turned about the centre, where MNIST puts the ink's centre
    assert turned.min() >= 0 and turned.max() <= 1


def test_same_seed_same_augmentations_other_seed_others():
    a = augment_batch(DIGITS, augment_generator(7), 2, 10.0)
    b = augment_batch(DIGITS, augment_generator(7), 2, 10.0)
    c = augment_batch(DIGITS, augment_generator(8), 2, 10.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_skorch_iterator_augments_images_and_keeps_the_labels():
    labels = torch.from_numpy(tiny_mnist_arrays()["test_labels"][:64].astype(np.int64))
    plain = TensorBatches(Dataset(DIGITS, labels), 16, shuffle=True, generator=torch.Generator().manual_seed(0))
    augmented = TensorBatches(Dataset(DIGITS, labels), 16, shuffle=True, generator=torch.Generator().manual_seed(0),
                              augment=(2, 0.0), augment_generator=augment_generator(0))
    for (x, y), (xa, ya) in zip(plain, augmented):
        assert torch.equal(y, ya)  # same order, same labels
        assert not torch.equal(x, xa) and x.shape == xa.shape
