"""fit: the same MLP and hyperparameters, trained by skorch's NeuralNetClassifier.

In:  data/processed/{train,val}_*.npy, and feedback_train_* where preprocess wrote it;
     params.yaml ``model`` and ``train``.
Out: models/skorch_params.pt (the module's state_dict, via ``save_params``);
     metrics/fit/ (DVCLive: train/loss, val/loss, val/accuracy per epoch).

The net: mnist_dvc/skorch_net.py (why ``criterion=CrossEntropyLoss``: docs/design.md).
With corrections, ``partial_fit`` goes on as train's loop does (docs/feedback.md).
"""

from __future__ import annotations

from mnist_dvc.data import load_optional_split, load_split
from mnist_dvc.model import configure_torch, needs_scheduler, resolve_device
from mnist_dvc.params import load_section
from mnist_dvc.skorch_net import DvcLiveLogger, StopWhenDiverged, build_net
from mnist_dvc.stage import atomic_dir, atomic_file, parse_paths, run_stage


def fit(model_params, train_params, train_split, val_split, live_dir=None, feedback_split=None):
    """Build the skorch net and fit it on the training split, then ``train.feedback.epochs``
    on ``feedback_split`` (if given and not empty); returns the net."""
    device = resolve_device(train_params.device)
    images, labels = (t.to(device) for t in train_split)
    val_split = tuple(t.to(device) for t in val_split)
    callbacks = [StopWhenDiverged()] + ([DvcLiveLogger(str(live_dir))] if live_dir is not None else [])
    net = build_net(
        model_params, train_params, seed=train_params.seed, device=str(device),
        val_split=val_split, n_train=len(images), callbacks=callbacks,
    )
    net.fit(images, labels)
    if feedback_split is not None and len(feedback_split[1]) and train_params.feedback.epochs:
        # The same optimizer (its state kept), batch and augmentation generators; a new rate.
        changes = {"lr": train_params.lr * train_params.feedback.lr_scale}
        if needs_scheduler(train_params):
            changes["callbacks__lr_schedule"] = None  # the schedule has ended: a constant rate
        if live_dir is not None:
            changes["callbacks__DvcLiveLogger__resume"] = True
        net.set_params(**changes)
        net.initialize_callbacks()  # drops the callbacks set to None (set_params alone leaves them in place)
        feedback_images, feedback_labels = (t.to(device) for t in feedback_split)
        net.partial_fit(feedback_images, feedback_labels, epochs=train_params.feedback.epochs)
    return net


def main(argv: list[str] | None = None) -> None:
    args = parse_paths(__doc__, argv, data="data/processed", model="models/skorch_params.pt", live="metrics/fit")
    model_params, train_params = load_section("model"), load_section("train")
    configure_torch(train_params.threads, resolve_device(train_params.device), load_section("numerics").cpu)
    train_split, val_split = load_split(args.data, "train"), load_split(args.data, "val")
    feedback_split = load_optional_split(args.data, "feedback_train")
    with atomic_dir(args.live) as live_dir:  # the last good metrics stay until the model is saved
        net = fit(model_params, train_params, train_split, val_split, live_dir, feedback_split)
        with atomic_file(args.model) as f:
            net.save_params(f_params=f)


if __name__ == "__main__":
    run_stage(main)
