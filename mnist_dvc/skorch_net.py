"""The shared MLP as a skorch ``NeuralNetClassifier``, with its batch iterator and DVCLive callback.

Why a batch iterator of its own and why ``CrossEntropyLoss``: docs/design.md.
"""

from __future__ import annotations

import math

import torch
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback, LRScheduler
from skorch.dataset import Dataset
from skorch.helper import predefined_split
from torch import nn

from mnist_dvc.augment import augment_batch, augment_generator
from mnist_dvc.model import (
    MLP,
    OPTIMIZERS,
    check_finite_loss,
    lr_scheduler,
    needs_scheduler,
    optimizer_kwargs,
    schedule_steps,
)


class TensorBatches:
    """``(X, y)`` batches sliced out of a skorch ``Dataset``'s tensors, as the explicit loop slices them: with
    ``shuffle``, a permutation per epoch from ``generator`` (the net's own, never torch's global RNG), and
    ``augment`` = (shift, rotate) with draws from ``augment_generator`` (the training iterator only)."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = False, generator=None,
                 augment: tuple[int, float] = (0, 0.0), augment_generator=None):
        # scikit-learn (a Pipeline, GridSearchCV's folds) hands over numpy arrays: tensor views, no copy.
        self.X = torch.as_tensor(dataset.X)
        self.y = None if dataset.y is None else torch.as_tensor(dataset.y)
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator
        self.augment, self.augment_generator = augment, augment_generator

    def __len__(self) -> int:
        return math.ceil(len(self.X) / self.batch_size)

    def __iter__(self):
        n = len(self.X)
        order = torch.randperm(n, generator=self.generator).to(self.X.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            batch = order[start : start + self.batch_size] if self.shuffle else slice(start, start + self.batch_size)
            inputs = augment_batch(self.X[batch], self.augment_generator, *self.augment)
            # y is None when predicting; skorch ignores the placeholder then.
            targets = self.y[batch] if self.y is not None else torch.zeros(len(inputs))
            yield inputs, targets


class DvcLiveLogger(Callback):
    """Log skorch's per-epoch history to DVCLive in ``live_dir`` (DVCLive has no skorch integration).

    ``Live`` exists only during a fit, so the net stays clonable and picklable. ``resume``
    (``callbacks__DvcLiveLogger__resume=True``, before a ``partial_fit``) continues the logged steps.
    """

    KEYS = {"train_loss": "train/loss", "valid_loss": "val/loss", "valid_acc": "val/accuracy"}

    def __init__(self, live_dir: str = "metrics/fit", resume: bool = False):
        self.live_dir, self.resume = live_dir, resume

    def on_train_begin(self, net, **kwargs):
        from dvclive import Live  # imported where used: tune's fits never log

        self.live_ = Live(str(self.live_dir), dvcyaml=None, save_dvc_exp=False, resume=self.resume)

    def on_epoch_end(self, net, **kwargs):
        row = net.history[-1]
        for key, name in self.KEYS.items():
            if key in row:
                self.live_.log_metric(name, row[key])
        self.live_.next_step()

    def on_train_end(self, net, **kwargs):
        self.live_.end()
        del self.live_


class StopWhenDiverged(Callback):
    """End the fit with a StageError once an epoch's train_loss is NaN or infinite (``check_finite_loss``)."""

    def on_epoch_end(self, net, **kwargs):
        check_finite_loss(net.history[-1, "train_loss"], len(net.history))


def build_net(model_params, train_params, *, seed: int, device: str = "cpu", val_split=None, n_train=None,
              callbacks=(), **overrides):
    """A ``NeuralNetClassifier`` of the shared MLP with the ``train:`` hyperparameters.

    ``val_split``: preprocess's ``(images, labels)``, or None: no validation (skorch's default would
    hold out 20% of the training data). A schedule or warm-up needs ``n_train``, the training images.
    """
    callbacks = list(callbacks)
    if needs_scheduler(train_params):
        callbacks.insert(0, ("lr_schedule", LRScheduler(
            policy=lr_scheduler, step_every="batch", schedule=train_params.schedule, warmup=train_params.warmup,
            total_steps=schedule_steps(train_params, n_train))))
    params = dict(
        module=MLP,
        module__hidden=list(model_params.hidden),
        module__activation=model_params.activation,
        module__dropout=model_params.dropout,
        module__seed=seed,
        # The module returns logits: skorch's default NLLLoss would take their log, NaN (docs/design.md).
        criterion=nn.CrossEntropyLoss,
        optimizer=OPTIMIZERS[train_params.optimizer],
        lr=train_params.lr,
        max_epochs=train_params.epochs,
        batch_size=train_params.batch_size,
        iterator_train=TensorBatches,
        iterator_train__shuffle=True,
        iterator_train__generator=torch.Generator().manual_seed(seed),
        iterator_train__augment=(train_params.augment.shift, train_params.augment.rotate),
        iterator_train__augment_generator=augment_generator(seed),
        iterator_valid=TensorBatches,
        callbacks=callbacks,
        train_split=predefined_split(Dataset(*val_split)) if val_split is not None and len(val_split[0]) else None,
        device=device,
        # Only tensors are ever loaded: load_params refuses pickled code.
        torch_load_kwargs={"weights_only": True},
    )
    params.update({f"optimizer__{k}": v for k, v in optimizer_kwargs(train_params).items()})
    params.update(overrides)
    return NeuralNetClassifier(**params)
