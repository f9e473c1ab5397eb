"""preprocess: validate the raw IDX files and write train/val/test tensors.

In:  data/raw/*.gz; data/feedback/ (corrections from the web app, maybe none); params.yaml ``preprocess``.
Out: data/processed/{train,val,test}_{images,labels}.npy (uint8 images, int64 labels), and
     feedback_{,train_}{images,labels}.npy where pictures were collected; metrics/data.json (counts).

The validation split is carved from the 60,000 training images, stratified and seeded
(``val_size: 0``: an empty one). How corrections become the ``feedback`` and ``feedback_train``
splits: docs/feedback.md, "In the pipeline"; without any, the outputs are a project's without
feedback, byte for byte. No torch here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnist_dvc.data import N_CLASSES, feedback_held_out, load_feedback, read_raw_pair, save_split, split_paths
from mnist_dvc.params import load_section
from mnist_dvc.stage import StageError, parse_paths, run_stage, write_json


def split_train_val(images, labels, val_size, seed):
    """Stratified, seeded split of the training set; val_size 0 gives an empty val set."""
    if not val_size:
        return images, labels, images[:0], labels[:0]
    from sklearn.model_selection import train_test_split  # imported only when splitting (docs/performance.md)

    try:
        train_x, val_x, train_y, val_y = train_test_split(
            images, labels, test_size=val_size, stratify=labels, random_state=seed
        )
    except ValueError as exc:  # e.g. a count larger than this (small) training set
        raise StageError(f"preprocess.val_size = {val_size!r} cannot split {len(labels)} images: {exc}") from None
    return train_x, train_y, val_x, val_y


def split_feedback(folder: Path, holdout: float) -> tuple[tuple, tuple]:
    """The collected pictures as ``(train_images, train_labels), (test_images, test_labels)``, by content hash."""
    names, images, labels = load_feedback(folder)
    held = np.array([feedback_held_out(name, holdout) for name in names], dtype=bool)
    return (images[~held], labels[~held]), (images[held], labels[held])


def feedback_training(pictures, train_x, train_y, repeat: int, seed: int):
    """The ``feedback_train`` split: ``repeat`` copies of each of ``pictures`` (images, labels), then
    as many training images (all of them if fewer), drawn without replacement with ``seed``."""
    images, labels = pictures
    copies = len(labels) * repeat
    replay = np.sort(np.random.default_rng(seed).choice(len(train_y), min(copies, len(train_y)), replace=False))
    return (np.concatenate([np.tile(images, (repeat, 1, 1)), train_x[replay]]),
            np.concatenate([np.tile(labels.astype(train_y.dtype), repeat), train_y[replay]]))


def split_summary(labels: np.ndarray) -> dict:
    """Image count and per-class counts of one split."""
    per_class = np.bincount(labels, minlength=N_CLASSES)
    return {"count": int(len(labels)), "per_class": {str(c): int(n) for c, n in enumerate(per_class)}}


def main(argv: list[str] | None = None) -> None:
    args = parse_paths(__doc__, argv, raw="data/raw", feedback="data/feedback/pictures", out="data/processed",
                       metrics="metrics/data.json")
    params = load_section("preprocess")
    train_images, train_labels = read_raw_pair(args.raw, "train")
    test_images, test_labels = read_raw_pair(args.raw, "test")
    train_x, train_y, val_x, val_y = split_train_val(train_images, train_labels, params.val_size, params.seed)
    feedback_train, feedback_test = split_feedback(args.feedback, params.feedback.holdout)
    splits = {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_images, test_labels)}
    if len(feedback_test[1]):
        splits["feedback"] = feedback_test
    if len(feedback_train[1]):
        splits["feedback_train"] = feedback_training(feedback_train, train_x, train_y, params.feedback.repeat,
                                                     params.seed)
    for name in ("feedback", "feedback_train"):
        if name not in splits:  # run by hand over an earlier output (dvc repro removes it first): no stale split
            for path in split_paths(args.out, name):
                path.unlink(missing_ok=True)
    for name, (images, labels) in splits.items():
        save_split(args.out, name, images, labels)
    summary = {name: split_summary(labels) for name, (_, labels) in splits.items() if name != "feedback_train"}
    if len(feedback_train[1]):
        summary["feedback_train"] = {**split_summary(feedback_train[1]), "repeat": params.feedback.repeat,
                                     "images": len(splits["feedback_train"][1])}
    write_json(args.metrics, summary)
    print(", ".join(f"{name}: {len(labels)} images" for name, (_, labels) in splits.items()))


if __name__ == "__main__":
    run_stage(main)
