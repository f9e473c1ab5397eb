"""preprocess: validate the raw IDX files and write train/val/test tensors.

In:  data/raw/*.gz; params.yaml ``preprocess`` (val_size, seed).
Out: data/processed/{train,val,test}_{images,labels}.npy (uint8 images,
     int64 labels); metrics/data.json (images per split and per class).

The validation split is carved from the 60,000 training images, stratified
by class and seeded, so every class keeps its share in both parts. With
``val_size: 0`` the val split is written empty and the trainings log no
validation. This stage needs no torch: it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mnist_dvc.data import N_CLASSES, read_raw_pair, save_split
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


def split_summary(labels: np.ndarray) -> dict:
    """Image count and per-class counts of one split."""
    per_class = np.bincount(labels, minlength=N_CLASSES)
    return {"count": int(len(labels)), "per_class": {str(c): int(n) for c, n in enumerate(per_class)}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--out", type=Path, default=Path("data/processed"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/data.json"))
    args = parser.parse_args(argv)
    params = load_section("preprocess")

    train_images, train_labels = read_raw_pair(args.raw, "train")
    test_images, test_labels = read_raw_pair(args.raw, "test")
    train_x, train_y, val_x, val_y = split_train_val(
        train_images, train_labels, params.val_size, params.seed
    )
    splits = {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_images, test_labels)}
    for name, (images, labels) in splits.items():
        save_split(args.out, name, images, labels)
    write_json(args.metrics, {name: split_summary(labels) for name, (_, labels) in splits.items()})
    print(", ".join(f"{name}: {len(labels)} images" for name, (_, labels) in splits.items()))


if __name__ == "__main__":
    run_stage(main)
