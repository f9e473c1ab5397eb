"""MNIST on disk: the raw gzipped IDX files, the processed splits, the collected corrections.

Raw: ``data/raw/``, the four files of ``RAW_FILES`` (keyed as ``download.md5``).
Processed: ``data/processed/<split>_{images,labels}.npy``, uint8 N x 28 x 28 and
int64 N; ``load_split`` makes float32 tensors in [0, 1] of them (docs/design.md,
"Data on disk and in memory"). Corrections: ``data/feedback/pictures/``
(docs/feedback.md, "The dataset on disk"). torch is imported inside
``load_split`` only: download, preprocess and plot start without it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
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
DIGITS = range(N_CLASSES)  # the labels: a digit 0..9
# IDX magic numbers: two zero bytes, 0x08 for unsigned bytes, then the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_idx(path: Path, kind: str) -> np.ndarray:
    """Read a gzipped IDX file of ``kind`` 'images' or 'labels'; StageError naming the file where it is not one."""
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
        raise StageError(f"{path}: wrong magic number 0x{found_magic:08x}, expected 0x{magic:08x} (an IDX {kind} file)")
    if kind == "images" and dims[1:] != [IMAGE_SIDE, IMAGE_SIDE]:
        raise StageError(f"{path}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
    expected = int(np.prod(dims)) + header_size
    if len(raw) != expected:
        raise StageError(f"{path}: {len(raw)} bytes after decompression, the header promises {expected} "
                         f"({' x '.join(map(str, dims))}): the file is truncated or padded")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims).copy()


def read_raw_pair(raw_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check the images and labels of ``split`` ('train' or 'test')."""
    images_path = raw_dir / RAW_FILES[f"{split}_images"]
    labels_path = raw_dir / RAW_FILES[f"{split}_labels"]
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    check_pair((images_path, labels_path), images, labels)
    return images, labels


def check_pair(paths: tuple[Path, Path], images: np.ndarray, labels: np.ndarray, advice: str = "") -> None:
    """StageError unless there are as many images as labels, each in 0..9; ``advice`` ends the message."""
    images_path, labels_path = paths
    if len(images) != len(labels):
        raise StageError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels{advice}")
    bad = label_outside(labels)
    if bad is not None:
        raise StageError(f"{labels_path}: label {labels[bad]} at index {bad} is outside 0..9{advice}")


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
    """``(images, labels)`` of a split as stored, uint8 N x 28 x 28 and integer N in 0..9; StageError naming
    the file that is missing, not an ``.npy`` array, of the wrong dtype or shape or count, or a bad label."""
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
    check_pair(paths, images, labels, f"; {RERUN_PREPROCESS}")
    return images, labels


def label_outside(labels: np.ndarray) -> int | None:
    """The index of the first of ``labels`` outside 0..9, or None."""
    outside = (labels < 0) | (labels >= N_CLASSES)
    return int(np.argmax(outside)) if outside.any() else None


def confusion_counts(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The (10, 10) int64 confusion counts of two label arrays, rows the true digit: sklearn's
    ``confusion_matrix`` without its import, which would double plot's start-up."""
    cells = np.asarray(actual, np.int64) * N_CLASSES + np.asarray(predicted, np.int64)
    return np.bincount(cells, minlength=N_CLASSES**2).reshape(N_CLASSES, N_CLASSES)


def load_split(processed_dir: Path | str, split: str):
    """Return ``(images, labels)`` of a split as tensors: float32 N x 28 x 28 in [0, 1], int64 N."""
    import torch

    images, labels = load_stored_split(processed_dir, split)
    return torch.from_numpy(images).float().div_(255), torch.from_numpy(labels.astype(np.int64, copy=False))


def load_optional_split(processed_dir: Path | str, split: str):
    """``load_split`` of a split preprocess writes only with corrections (``feedback``,
    ``feedback_train``); None where it did not."""
    return load_split(processed_dir, split) if split_paths(processed_dir, split)[0].exists() else None


# --- feedback: pictures people corrected in the web app; the format: docs/feedback.md, "The dataset on disk" ---

FEEDBACK_LABELS = "labels.csv"
FEEDBACK_HEADER = ("file", "label")
FEEDBACK_NAME = re.compile(r"^[0-9a-f]{64}\.png$")
PULL_FEEDBACK = "run `git checkout data/feedback/pictures.dvc && dvc pull data/feedback/pictures.dvc`"


def read_feedback_labels(folder: Path | str) -> dict[str, int]:
    """``{file name: label}`` from ``folder``/labels.csv ({} where absent); StageError naming the line that
    is not the header, a sha256 ``.png`` name and a digit, or that lists a file twice."""
    path = Path(folder) / FEEDBACK_LABELS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise StageError(f"{path} cannot be read: {exc}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(rows[0]) != FEEDBACK_HEADER:
        raise StageError(f"{path}: the first line must be the header {','.join(FEEDBACK_HEADER)!r}")
    labels: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not FEEDBACK_NAME.match(row[0]):
            raise StageError(f"{path}, line {number}: expected '<sha256>.png,<digit>', got {','.join(row)!r}")
        name, label = row
        if label not in [str(digit) for digit in DIGITS]:
            raise StageError(f"{path}, line {number}: label {label!r} is not a digit 0..9")
        if name in labels:
            raise StageError(f"{path}, line {number}: {name} is listed twice")
        labels[name] = int(label)
    return labels


def format_feedback_labels(labels: dict[str, int]) -> str:
    """labels.csv's text for ``labels``: the header, then one row per file, sorted."""
    lines = [",".join(FEEDBACK_HEADER)] + [f"{name},{labels[name]}" for name in sorted(labels)]
    return "\n".join(lines) + "\n"


def missing_feedback(folder: Path | str, labels: dict[str, int]) -> list[str]:
    """The files of ``labels`` that are not in ``folder``."""
    return [name for name in sorted(labels) if not (Path(folder) / name).is_file()]


def load_feedback(folder: Path | str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(file names, uint8 images, int64 labels)`` of the collected pictures, sorted by name; StageError
    naming a PNG that is absent, not named by the sha256 of its bytes, or not a 28x28 greyscale picture."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    labels = read_feedback_labels(folder)
    missing = missing_feedback(folder, labels)
    if missing:
        raise StageError(f"{folder / missing[0]} is listed in {folder / FEEDBACK_LABELS} but absent "
                         f"({len(missing)} of {len(labels)} missing): {PULL_FEEDBACK}")
    names = sorted(labels)
    images = np.zeros((len(names), IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    for i, name in enumerate(names):
        data = (folder / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != name.removesuffix(".png"):
            raise StageError(f"{folder / name}: its bytes do not match the sha256 in its name (changed or corrupt); "
                             f"remove it and its line in {FEEDBACK_LABELS}, or {PULL_FEEDBACK}")
        try:
            with Image.open(io.BytesIO(data)) as picture:
                if picture.format != "PNG" or picture.mode != "L" or picture.size != (IMAGE_SIDE, IMAGE_SIDE):
                    raise StageError(f"{folder / name}: a {picture.format} {picture.mode} picture of "
                                     f"{picture.size[0]}x{picture.size[1]}, expected a 28x28 greyscale (L) PNG")
                images[i] = np.asarray(picture)
        except (UnidentifiedImageError, OSError) as exc:
            raise StageError(f"{folder / name}: not a readable PNG ({exc})") from None
    return names, images, np.array([labels[name] for name in names], dtype=np.int64)


def feedback_held_out(name: str, holdout: float) -> bool:
    """Whether the picture ``name`` belongs to the feedback test split: by its content hash alone, so
    adding pictures never moves one, and a larger ``holdout`` only moves pictures into the test part."""
    return int(name[:8], 16) < holdout * 2**32
