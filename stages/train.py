"""train: the MLP with an explicit PyTorch loop, every moving part in sight.

In:  data/processed/{train,val}_{images,labels}.npy, and feedback_train_* where
     preprocess wrote it; params.yaml ``model`` and ``train``.
Out: models/mlp.pt (a state_dict); metrics/train/ (DVCLive: metrics.json and
     per-epoch train/loss, val/loss, val/accuracy under plots/).

The data stays in memory as one float tensor; each epoch draws a permutation
of indices from an explicit, seeded ``torch.Generator`` and slices whole
batches out of it, so there is no per-sample Python work and no DataLoader.
Options on top of the tutorial's loop (params.yaml ``train``): a learning-rate
schedule stepped after every batch, weight decay, and augmentation of each
batch (mnist_dvc/augment.py), all built by the same functions skorch's net
uses (mnist_dvc/skorch_net.py), so that ``fit`` learns the same weights.

Where people's corrections were collected (docs/feedback.md), the loop goes
on for ``train.feedback.epochs`` on the ``feedback_train`` split, at
``train.lr * train.feedback.lr_scale``, with no schedule: the same
optimizer, generators and logging, as skorch's ``partial_fit`` does in ``fit``.

On a GPU the same step can run as one CUDA graph (``train.cuda_graph``;
the variant lives in mnist_dvc/cuda_graph.py): the loop here stays the one
that runs on the CPU and the reference the graph is measured against.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mnist_dvc.augment import augment_batch, augment_generator
from mnist_dvc.cuda_graph import CudaGraphStep, use_cuda_graph
from mnist_dvc.data import load_optional_split, load_split
from mnist_dvc.model import (
    build_mlp,
    build_optimizer,
    check_finite_loss,
    configure_torch,
    loss_and_accuracy,
    lr_scheduler,
    needs_scheduler,
    predict_logits,
    resolve_device,
    schedule_steps,
)
from mnist_dvc.params import load_section
from mnist_dvc.stage import atomic_dir, atomic_file, run_stage


def seeded_generators(seed: int) -> dict[str, torch.Generator]:
    """Every draw of a run from an explicit generator seeded by ``train.seed``, as skorch's net
    does: the batch order and the augmentation (dropout masks come from the model's own)."""
    return {"batches": torch.Generator().manual_seed(seed), "augment": augment_generator(seed)}


def batch_order(count: int, generator: torch.Generator, device) -> torch.Tensor:
    """An epoch's random order of ``count`` images, drawn on the CPU from ``generator``
    (so every device sees the same order), then moved to ``device``."""
    return torch.randperm(count, generator=generator).to(device)


def train_epoch(model, optimizer, images, labels, train_params, generators, scheduler=None, desc="") -> float:
    """One pass over the data in a seeded random order; returns the mean training loss."""
    model.train()
    batch_size, augment = train_params.batch_size, (train_params.augment.shift, train_params.augment.rotate)
    order = batch_order(len(images), generators["batches"], images.device)
    total_loss = torch.zeros((), device=images.device)
    steps = range(0, len(images), batch_size)
    for start in tqdm(steps, desc=desc, leave=False, mininterval=0.5, disable=None):
        batch = order[start : start + batch_size]
        inputs = augment_batch(images[batch], generators["augment"], *augment)
        targets = labels[batch]
        optimizer.zero_grad()
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.detach() * len(batch)
    return total_loss.item() / len(images)


def end_epoch(model, train_loss, epoch, desc, val_images, val_labels, live=None) -> None:
    """After an epoch: stop on a non-finite loss; the loss and validation figures to ``live`` and stdout."""
    check_finite_loss(train_loss, epoch)
    line = f"{desc}: train/loss {train_loss:.4f}"
    if live is not None:
        live.log_metric("train/loss", train_loss)
    if len(val_images):
        val_logits = predict_logits(model, val_images, 1000)
        val_loss, val_accuracy = loss_and_accuracy(val_logits, val_labels)
        line += f"  val/loss {val_loss:.4f}  val/accuracy {val_accuracy:.4f}"
        if live is not None:
            live.log_metric("val/loss", val_loss)
            live.log_metric("val/accuracy", val_accuracy)
    if live is not None:
        live.next_step()
    print(line)


def train(model_params, train_params, train_split, val_split, live=None, feedback_split=None):
    """Build the MLP and train it for ``train.epochs``, then ``train.feedback.epochs`` on
    ``feedback_split`` (if given and not empty); log each epoch to ``live``."""
    device = resolve_device(train_params.device)
    graphed = use_cuda_graph(model_params, train_params, device)
    model = build_mlp(model_params, train_params.seed).to(device)
    optimizer = build_optimizer(model.parameters(), train_params, capturable=graphed)
    images, labels = (t.to(device) for t in train_split)
    val_images, val_labels = (t.to(device) for t in val_split)
    generators = seeded_generators(train_params.seed)
    scheduler = None
    if needs_scheduler(train_params):
        scheduler = lr_scheduler(optimizer, train_params.schedule, train_params.warmup,
                                 schedule_steps(train_params, len(images)))
    step = CudaGraphStep(model, optimizer, images, labels, train_params.batch_size) if graphed else None
    for epoch in range(1, train_params.epochs + 1):
        desc = f"epoch {epoch}/{train_params.epochs}"
        if step is not None:
            train_loss = step.epoch(batch_order(len(images), generators["batches"], device), desc)
        else:
            train_loss = train_epoch(model, optimizer, images, labels, train_params, generators, scheduler, desc)
        end_epoch(model, train_loss, epoch, desc, val_images, val_labels, live)
    if feedback_split is not None and len(feedback_split[1]) and train_params.feedback.epochs:
        feedback_images, feedback_labels = (t.to(device) for t in feedback_split)
        for group in optimizer.param_groups:  # the schedule, if any, has ended: a constant rate
            group["lr"] = train_params.lr * train_params.feedback.lr_scale
        for epoch in range(1, train_params.feedback.epochs + 1):
            desc = f"feedback epoch {epoch}/{train_params.feedback.epochs}"
            train_loss = train_epoch(model, optimizer, feedback_images, feedback_labels, train_params, generators,
                                     None, desc)
            end_epoch(model, train_loss, train_params.epochs + epoch, desc, val_images, val_labels, live)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--model", type=Path, default=Path("models/mlp.pt"))
    parser.add_argument("--live", type=Path, default=Path("metrics/train"))
    args = parser.parse_args(argv)
    model_params, train_params = load_section("model"), load_section("train")
    configure_torch(train_params.threads, resolve_device(train_params.device), load_section("numerics").cpu)
    train_split, val_split = load_split(args.data, "train"), load_split(args.data, "val")
    feedback_split = load_optional_split(args.data, "feedback_train")
    from dvclive import Live  # imported where used: the benchmarks import this module without it

    # DVCLive fills its folder as training goes: it writes a new one, which replaces
    # the last good one only once the model is saved.
    with atomic_dir(args.live) as live_dir:
        with Live(str(live_dir), dvcyaml=None, save_dvc_exp=False) as live:
            model = train(model_params, train_params, train_split, val_split, live, feedback_split)
        state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
        with atomic_file(args.model) as f:
            torch.save(state, f)


if __name__ == "__main__":
    run_stage(main)
