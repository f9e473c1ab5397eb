"""The tune stage's subset, and what its grid search pickles to the processes that run its fits.

They may be Dask workers without this checkout, so it lives in ``mnist_dvc`` (which
``mnist_dvc.cluster`` ships to them), never in ``stages/``.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split
from skorch.callbacks import Callback

from mnist_dvc.model import configure_torch


def scale_and_flatten(images: np.ndarray) -> np.ndarray:
    """uint8 N x 28 x 28 -> float32 N x 784 in [0, 1] (the same arithmetic as ``load_split``)."""
    return np.divide(images.reshape(len(images), -1), 255, dtype=np.float32)


def stratified_subset(images, labels, size: int, seed: int):
    """A seeded, class-stratified subset of ``size`` images; all of them if there are not more."""
    if size >= len(labels):
        print(f"tune.subset_size = {size} >= {len(labels)} training images: using all of them")
        return images, labels
    keep, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    return images[keep], labels[keep]


class ReproducibleFit(Callback):
    """Before each fit, wherever it runs, ``configure_torch`` (threads, denormals, a check of ``cpu_numerics``):
    a fit's result depends neither on its process nor on the order of the fits. Its draws come from the
    net's own generators; torch's global RNG is seeded too, as a guard for any draw that would not."""

    def __init__(self, threads: int = 1, seed: int = 0, cpu_numerics: str | None = None):
        self.threads, self.seed, self.cpu_numerics = threads, seed, cpu_numerics

    def on_train_begin(self, net, **kwargs):
        import torch

        configure_torch(self.threads, net.device, self.cpu_numerics)
        torch.manual_seed(self.seed)
