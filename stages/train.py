"""train: the MLP with an explicit PyTorch loop, every moving part in sight.

In:  data/processed/{train,val}_*.npy, and feedback_train_* where preprocess wrote it;
     params.yaml ``model`` and ``train``.
Out: models/mlp.pt (a state_dict); metrics/train/ (DVCLive: train/loss, val/loss, val/accuracy per epoch).

The data stays in memory as one tensor; each epoch slices whole batches out of
a seeded permutation, without a DataLoader. The options (schedule, weight decay,
augmentation) are built by the same functions as skorch's net, so ``fit`` learns
the same weights (docs/design.md). With corrections, ``train.feedback.epochs``
follow on the ``feedback_train`` split (docs/feedback.md, "In the pipeline").
On a GPU the step can run as one CUDA graph (mnist_dvc/cuda_graph.py).
"""

from __future__ import annotations

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
from mnist_dvc.stage import atomic_dir, atomic_file, parse_paths, run_stage


def seeded_generators(seed: int) -> dict[str, torch.Generator]:
    """The run's seeded generators, as skorch's net has them: batch order, augmentation (dropout: the model's)."""
    return {"batches": torch.Generator().manual_seed(seed), "augment": augment_generator(seed)}


def batch_order(count: int, generator: torch.Generator, device) -> torch.Tensor:
    """An epoch's random order of ``count`` images, drawn on the CPU (the same on every device)."""
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
    metrics = {"train/loss": train_loss}
    if len(val_images):
        metrics["val/loss"], metrics["val/accuracy"] = loss_and_accuracy(
            predict_logits(model, val_images, 1000), val_labels)
    print(f"{desc}: " + "  ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    if live is not None:
        for name, value in metrics.items():
            live.log_metric(name, value)
        live.next_step()


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
    args = parse_paths(__doc__, argv, data="data/processed", model="models/mlp.pt", live="metrics/train")
    model_params, train_params = load_section("model"), load_section("train")
    configure_torch(train_params.threads, resolve_device(train_params.device), load_section("numerics").cpu)
    train_split, val_split = load_split(args.data, "train"), load_split(args.data, "val")
    feedback_split = load_optional_split(args.data, "feedback_train")
    from dvclive import Live  # imported where used: the benchmarks import this module without it

    # DVCLive fills a new folder, which replaces the last good one only once the model is saved.
    with atomic_dir(args.live) as live_dir:
        with Live(str(live_dir), dvcyaml=None, save_dvc_exp=False) as live:
            model = train(model_params, train_params, train_split, val_split, live, feedback_split)
        state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
        with atomic_file(args.model) as f:
            torch.save(state, f)


if __name__ == "__main__":
    run_stage(main)
