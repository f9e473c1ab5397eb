"""MNIST on disk: the raw gzipped IDX files and the processed tensor splits.

Raw (``data/raw/``, written by the download stage): the four official files,
named in ``RAW_FILES`` by the keys that ``params.yaml``'s ``download.md5`` uses.

Processed (``data/processed/``, written by preprocess): for each split
(``train``, ``val``, ``test``) two NumPy files, ``<split>_images.npy`` (uint8,
N x 28 x 28, 4x smaller on disk than float32) and ``<split>_labels.npy``
(int64, N). Plain ``.npy``: preprocess and plot need no torch to write or
read them (a second and a half less start-up each), and ``np.load`` with
``allow_pickle=False`` can only ever return arrays. ``load_split`` turns the
images into a float32 tensor in [0, 1] once, in memory, so the training
loops never do per-sample work.

torch is imported inside ``load_split`` only: the download stage imports
this module for ``RAW_FILES`` and must start without it.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from mnist_dvc.stage import StageError, atomic_file

RAW_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IMAGE_SIDE = 28
N_CLASSES = 10
# IDX magic numbers: two zero bytes, 0x08 for unsigned bytes, then the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_idx(path: Path, kind: str) -> np.ndarray:
    """Read a gzipped IDX file of ``kind`` 'images' or 'labels' and validate its header.

    Raises StageError naming the file for a bad gzip stream, a wrong magic
    number, a wrong image size or a length that does not match the header.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise StageError(f"{path}: file not found (run the download stage first)") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise StageError(f"{path}: not a complete gzip file ({exc})") from None
    magic, ndim = (IMAGES_MAGIC, 3) if kind == "images" else (LABELS_MAGIC, 1)
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise StageError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    found_magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header_size])
    if found_magic != magic:
        raise StageError(
            f"{path}: wrong magic number 0x{found_magic:08x}, expected 0x{magic:08x} "
            f"(an IDX {kind} file)"
        )
    if kind == "images" and dims[1:] != [IMAGE_SIDE, IMAGE_SIDE]:
        raise StageError(f"{path}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
    expected = int(np.prod(dims)) + header_size
    if len(raw) != expected:
        raise StageError(
            f"{path}: {len(raw)} bytes after decompression, the header promises {expected} "
            f"({' x '.join(map(str, dims))}): the file is truncated or padded"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims).copy()


def read_raw_pair(raw_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check the images and labels of ``split`` ('train' or 'test')."""
    images_path = raw_dir / RAW_FILES[f"{split}_images"]
    labels_path = raw_dir / RAW_FILES[f"{split}_labels"]
    images = read_idx(images_path, "images")
    labels = read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise StageError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= N_CLASSES:
        bad = int(np.argmax(labels >= N_CLASSES))
        raise StageError(f"{labels_path}: label {labels[bad]} at index {bad} is outside 0..9")
    return images, labels


def split_paths(processed_dir: Path | str, split: str) -> tuple[Path, Path]:
    """The images and labels files of ``split`` in ``processed_dir``."""
    folder = Path(processed_dir)
    return folder / f"{split}_images.npy", folder / f"{split}_labels.npy"


def save_split(processed_dir: Path | str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Save one split as uint8 images and int64 labels, each file atomically."""
    images_path, labels_path = split_paths(processed_dir, split)
    for path, array in ((images_path, np.ascontiguousarray(images, dtype=np.uint8)),
                        (labels_path, np.ascontiguousarray(labels, dtype=np.int64))):
        with atomic_file(path) as f:
            np.save(f, array, allow_pickle=False)


RERUN_PREPROCESS = "rerun the preprocess stage (`dvc repro preprocess`)"


def load_stored_split(processed_dir: Path | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of a split as stored: uint8 N x 28 x 28, integer N in 0..9.

    Raises StageError naming the file for one that is missing, not an
    ``.npy`` array, of the wrong dtype or shape, with a label outside 0..9,
    or with a count that differs from the other file's.
    """
    paths, arrays = split_paths(processed_dir, split), []
    for path in paths:
        try:
            arrays.append(np.load(path, allow_pickle=False))
        except FileNotFoundError:
            raise StageError(f"{path}: not found (run the preprocess stage first)") from None
        except ValueError as exc:  # not an .npy file, a truncated one, or one holding pickled objects
            raise StageError(f"{path}: not a NumPy array file ({exc}); {RERUN_PREPROCESS}") from None
    (images_path, labels_path), (images, labels) = paths, arrays
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise StageError(f"{images_path}: {images.dtype} array of shape {images.shape}, expected uint8 "
                         f"N x {IMAGE_SIDE} x {IMAGE_SIDE}; {RERUN_PREPROCESS}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise StageError(f"{labels_path}: {labels.dtype} array of shape {labels.shape}, expected integer "
                         f"labels of shape (N,); {RERUN_PREPROCESS}")
    if len(images) != len(labels):
        raise StageError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                         f"{RERUN_PREPROCESS}")
    bad = label_outside(labels)
    if bad is not None:
        raise StageError(f"{labels_path}: label {labels[bad]} at index {bad} is outside 0..9; {RERUN_PREPROCESS}")
    return images, labels


def label_outside(labels: np.ndarray) -> int | None:
    """The index of the first of ``labels`` outside 0..9, or None."""
    outside = (labels < 0) | (labels >= N_CLASSES)
    return int(np.argmax(outside)) if outside.any() else None


def load_split(processed_dir: Path | str, split: str):
    """Return ``(images, labels)`` of a split as tensors: float32 N x 28 x 28 in [0, 1], int64 N."""
    import torch

    images, labels = load_stored_split(processed_dir, split)
    return torch.from_numpy(images).float().div_(255), torch.from_numpy(labels.astype(np.int64, copy=False))
