"""What the tune stage's grid search sends to the processes that run its fits.

GridSearchCV pickles the Pipeline (this module's ``scale_and_flatten``, the
skorch net with this module's ``ReproducibleFit``) to each process that runs a
fit: a local joblib worker, or a Dask worker on another machine that has the
project's dependencies but not this checkout. So all of it lives in
``mnist_dvc``, which ``mnist_dvc.cluster`` ships to Dask workers; nothing
comes from ``stages/``.
"""

from __future__ import annotations

import numpy as np
from skorch.callbacks import Callback

from mnist_dvc.model import configure_torch


def scale_and_flatten(images: np.ndarray) -> np.ndarray:
    """uint8 N x 28 x 28 -> float32 N x 784 in [0, 1] (the same arithmetic as ``load_split``)."""
    return np.divide(images.reshape(len(images), -1), 255, dtype=np.float32)


class ReproducibleFit(Callback):
    """Before each fit, in whichever process runs it, pin torch's threads and
    denormal handling (``configure_torch``), so that a fit's result depends
    neither on where it runs (one process, local workers, a Dask cluster) nor
    on the order of the fits. Every draw of a fit comes from the net's own
    seeded generators (init, batch order, dropout); torch's global RNG is
    seeded too, as a guard for any draw that would not."""

    def __init__(self, threads: int = 1, seed: int = 0):
        self.threads, self.seed = threads, seed

    def on_train_begin(self, net, **kwargs):
        import torch

        configure_torch(self.threads, net.device)
        torch.manual_seed(self.seed)
