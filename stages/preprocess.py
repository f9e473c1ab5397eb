"""preprocess: validate the raw IDX files and write train/val/test tensors.

In:  data/raw/*.gz; data/feedback/ (pictures corrected in the web app, maybe
     none); params.yaml ``preprocess`` (val_size, seed, feedback).
Out: data/processed/{train,val,test}_{images,labels}.npy (uint8 images,
     int64 labels), and feedback_{images,labels}.npy where pictures were
     collected; metrics/data.json (images per split and per class).

The validation split is carved from the 60,000 training images, stratified
by class and seeded, so every class keeps its share in both parts. With
``val_size: 0`` the val split is written empty and the trainings log no
validation. The collected pictures are split by content hash: a
``feedback.holdout`` fraction becomes the ``feedback`` test split, and each
of the others is appended to the training split ``feedback.repeat`` times
(a few hundred among 60,000 would otherwise barely move the weights). With
none collected, the outputs are byte for byte those of a project without
feedback. This stage needs no torch: it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mnist_dvc.data import N_CLASSES, feedback_held_out, load_feedback, read_raw_pair, save_split, split_paths
from mnist_dvc.params import load_section
from mnist_dvc.stage import StageError, run_stage, write_json


def split_train_val(images, labels, val_size, seed):
    """Stratified, seeded split of the training set; val_size 0 gives an empty val set."""
    if not val_size:
        return images, labels, images[:0], labels[:0]
    from sklearn.model_selection import train_test_split  # 0.7 s to import: only when splitting

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


def with_feedback(train_x, train_y, pictures, repeat: int):
    """The training split followed by ``repeat`` copies of the feedback ``pictures`` (images, labels)."""
    images, labels = pictures
    if not len(labels):
        return train_x, train_y
    return (np.concatenate([train_x, np.tile(images, (repeat, 1, 1))]),
            np.concatenate([train_y, np.tile(labels.astype(train_y.dtype), repeat)]))


def split_summary(labels: np.ndarray) -> dict:
    """Image count and per-class counts of one split."""
    per_class = np.bincount(labels, minlength=N_CLASSES)
    return {"count": int(len(labels)), "per_class": {str(c): int(n) for c, n in enumerate(per_class)}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--feedback", type=Path, default=Path("data/feedback"))
    parser.add_argument("--out", type=Path, default=Path("data/processed"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/data.json"))
    args = parser.parse_args(argv)
    params = load_section("preprocess")

    train_images, train_labels = read_raw_pair(args.raw, "train")
    test_images, test_labels = read_raw_pair(args.raw, "test")
    train_x, train_y, val_x, val_y = split_train_val(
        train_images, train_labels, params.val_size, params.seed
    )
    feedback_train, feedback_test = split_feedback(args.feedback, params.feedback.holdout)
    train_x, train_y = with_feedback(train_x, train_y, feedback_train, params.feedback.repeat)
    splits = {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_images, test_labels)}
    if len(feedback_test[1]):
        splits["feedback"] = feedback_test
    else:  # run by hand over an earlier output (dvc repro removes it first): no stale split
        for path in split_paths(args.out, "feedback"):
            path.unlink(missing_ok=True)
    for name, (images, labels) in splits.items():
        save_split(args.out, name, images, labels)
    summary = {name: split_summary(labels) for name, (_, labels) in splits.items()}
    if len(feedback_train[1]):
        summary["feedback_train"] = {**split_summary(feedback_train[1]), "repeat": params.feedback.repeat}
    write_json(args.metrics, summary)
    print(", ".join(f"{name}: {len(labels)} images" for name, (_, labels) in splits.items()))


if __name__ == "__main__":
    run_stage(main)
