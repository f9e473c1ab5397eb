"""preprocess: validated raw IDX files in, seeded stratified train/val/test tensors out.

Runs the stage in-process on the tiny fixture MNIST (conftest.tiny_mnist_arrays:
1,500 training and 297 test images), and on copies of it broken in one way each.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import N_TRAIN, tiny_mnist_arrays, write_idx, write_mirror, write_params
from mnist_dvc.data import RAW_FILES, load_split, load_stored_split, split_paths
from mnist_dvc.stage import StageError
from stages import preprocess

ARRAYS = tiny_mnist_arrays()
N_TEST = len(ARRAYS["test_labels"])


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A cwd holding data/raw (the fixture MNIST); returns a function that writes params and runs the stage."""
    raw = tmp_path / "data" / "raw"
    md5 = write_mirror(raw)
    monkeypatch.chdir(tmp_path)

    def run(out: str = "data/processed", metrics: str = "metrics/data.json", **overrides) -> Path:
        write_params(tmp_path, raw.as_uri() + "/", md5, **overrides)
        preprocess.main(["--raw", "data/raw", "--out", out, "--metrics", metrics])
        return tmp_path / out

    run.root = tmp_path
    run.raw = raw
    return run


SPLIT_FILES = sorted(f"{split}_{part}.npy" for split in ("train", "val", "test") for part in ("images", "labels"))


def load(out: Path, split: str) -> dict[str, np.ndarray]:
    images, labels = load_stored_split(out, split)
    return {"images": images, "labels": labels}


def digest(out: Path, split: str) -> str:
    return hashlib.md5(b"".join(path.read_bytes() for path in split_paths(out, split))).hexdigest()


def row_keys(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """One sortable key per (image, label) pair, to compare sets of samples."""
    return sorted(image.tobytes() + bytes([label]) for image, label in zip(images, labels))


# --- outputs -------------------------------------------------------------------

def test_writes_three_splits_as_uint8_images_and_int64_labels(project):
    out = project(preprocess__val_size=200)
    sizes = {"train": N_TRAIN - 200, "val": 200, "test": N_TEST}
    for split, size in sizes.items():
        tensors = load(out, split)
        assert tensors["images"].dtype == np.uint8
        assert tensors["images"].shape == (size, 28, 28)
        assert tensors["labels"].dtype == np.int64
        assert tensors["labels"].shape == (size,)
        assert 0 <= int(tensors["labels"].min()) and int(tensors["labels"].max()) <= 9
    assert sorted(p.name for p in out.iterdir()) == SPLIT_FILES  # no temporary files


def test_train_and_val_partition_the_training_set_and_test_is_unchanged(project):
    out = project(preprocess__val_size=200)
    train, val, test = (load(out, s) for s in ("train", "val", "test"))
    together_x = np.concatenate([train["images"], val["images"]])
    together_y = np.concatenate([train["labels"], val["labels"]])
    assert row_keys(together_x, together_y) == row_keys(ARRAYS["train_images"], ARRAYS["train_labels"])
    assert np.array_equal(test["images"], ARRAYS["test_images"])
    assert np.array_equal(test["labels"], ARRAYS["test_labels"])


@pytest.mark.parametrize("val_size, expected", [(200, 200), (0.1, 150), (0.25, 375)])
def test_val_split_has_the_configured_size_and_is_stratified(project, val_size, expected):
    out = project(preprocess__val_size=val_size)
    val_labels = load(out, "val")["labels"]
    train_labels = load(out, "train")["labels"]
    assert len(val_labels) == expected and len(train_labels) == N_TRAIN - expected
    all_counts = np.bincount(ARRAYS["train_labels"], minlength=10)
    val_counts = np.bincount(val_labels, minlength=10)
    # Each class's share is kept: its val count is its share of the val size, to within one image.
    assert np.all(np.abs(val_counts - all_counts * expected / N_TRAIN) <= 1), val_counts
    assert np.array_equal(np.bincount(train_labels, minlength=10) + val_counts, all_counts)


def test_same_seed_gives_byte_identical_outputs(project):
    first = project(out="a", metrics="a.json", preprocess__val_size=200, preprocess__seed=7)
    second = project(out="b", metrics="b.json", preprocess__val_size=200, preprocess__seed=7)
    for split in ("train", "val", "test"):
        assert digest(first, split) == digest(second, split)
    assert (project.root / "a.json").read_bytes() == (project.root / "b.json").read_bytes()


def test_different_seed_gives_a_different_split(project):
    first = project(out="a", preprocess__val_size=200, preprocess__seed=7)
    second = project(out="b", preprocess__val_size=200, preprocess__seed=8)
    val_a, val_b = load(first, "val"), load(second, "val")
    keys_a = set(row_keys(val_a["images"], val_a["labels"]))
    keys_b = set(row_keys(val_b["images"], val_b["labels"]))
    assert keys_a != keys_b
    # Both are still stratified: the per-class counts are the same.
    assert np.array_equal(np.bincount(val_a["labels"], minlength=10),
                          np.bincount(val_b["labels"], minlength=10))


def test_val_size_zero_writes_an_empty_val_split_and_keeps_all_training_images(project):
    out = project(preprocess__val_size=0)
    val = load(out, "val")
    assert val["images"].shape == (0, 28, 28) and val["images"].dtype == np.uint8
    assert val["labels"].shape == (0,) and val["labels"].dtype == np.int64
    train = load(out, "train")
    assert np.array_equal(train["images"], ARRAYS["train_images"])
    assert np.array_equal(train["labels"], ARRAYS["train_labels"])
    images, labels = load_split(out, "val")
    assert images.shape == (0, 28, 28) and labels.shape == (0,)


def test_metrics_json_counts_images_per_split_and_per_class(project):
    out = project(preprocess__val_size=200)
    metrics = json.loads((project.root / "metrics" / "data.json").read_text())
    assert set(metrics) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        labels = load(out, split)["labels"]
        expected = {str(c): int(n) for c, n in enumerate(np.bincount(labels, minlength=10))}
        assert metrics[split] == {"count": len(labels), "per_class": expected}
    assert metrics["train"]["count"] + metrics["val"]["count"] == N_TRAIN
    assert metrics["test"]["count"] == N_TEST


def test_load_split_returns_float32_in_0_1_and_int64_labels(project):
    out = project(preprocess__val_size=200)
    images, labels = load_split(out, "train")
    raw = torch.from_numpy(load(out, "train")["images"])
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape == raw.shape
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert torch.allclose(images * 255, raw.float())


def test_load_split_of_a_missing_split_says_to_run_preprocess(tmp_path):
    with pytest.raises(StageError, match=r"train_images\.npy: not found \(run the preprocess stage first\)"):
        load_split(tmp_path, "train")


def test_a_split_file_holding_pickled_objects_is_refused_without_unpickling(tmp_path):
    images_path, labels_path = split_paths(tmp_path, "train")
    np.save(images_path, np.zeros((2, 28, 28), np.uint8))
    np.save(labels_path, np.array([{"not": "an array"}, 1], dtype=object), allow_pickle=True)
    with pytest.raises(StageError, match=r"train_labels\.npy: not a NumPy array file .*rerun the preprocess stage"):
        load_split(tmp_path, "train")


def good_split() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((20, 28, 28), np.uint8), np.arange(20, dtype=np.int64) % 10


@pytest.mark.parametrize(("break_it", "message"), [
    # Before these checks: IndexError in train/evaluate, or a long RuntimeError traceback.
    (lambda i, l: (i, np.where(np.arange(20) == 3, 10, l)), r"test_labels\.npy: label 10 at index 3 is outside 0\.\.9"),
    (lambda i, l: (i, np.where(np.arange(20) == 7, -1, l)), r"test_labels\.npy: label -1 at index 7 is outside 0\.\.9"),
    (lambda i, l: (i, l[:15]), r"test_images\.npy has 20 images but \S*test_labels\.npy has 15 labels"),
    (lambda i, l: (i[:, :27, :27], l),
     r"test_images\.npy: uint8 array of shape \(20, 27, 27\), expected uint8 N x 28 x 28"),
    (lambda i, l: (i.reshape(20, 784), l), r"test_images\.npy: uint8 array of shape \(20, 784\)"),
    (lambda i, l: (i.astype(np.float32), l),
     r"test_images\.npy: float32 array of shape \(20, 28, 28\), expected uint8"),
    (lambda i, l: (i, l.astype(np.float64)), r"test_labels\.npy: float64 array of shape \(20,\), expected integer"),
    (lambda i, l: (i, l.reshape(20, 1)), r"test_labels\.npy: int64 array of shape \(20, 1\), expected integer"),
], ids=["label-10", "label-minus-1", "labels-short", "images-27x27", "images-flat", "images-float", "labels-float",
        "labels-2d"])
def test_a_split_with_wrong_dtype_shape_length_or_labels_is_one_line_saying_to_rerun_preprocess(
        tmp_path, break_it, message):
    images, labels = break_it(*good_split())
    images_path, labels_path = split_paths(tmp_path, "test")
    np.save(images_path, images)
    np.save(labels_path, labels)
    with pytest.raises(StageError, match=message) as info:
        load_split(tmp_path, "test")
    assert "\n" not in str(info.value)
    assert str(info.value).endswith("; rerun the preprocess stage (`dvc repro preprocess`)")


def test_a_split_with_other_integer_labels_loads_as_int64(tmp_path):
    images, labels = good_split()
    images_path, labels_path = split_paths(tmp_path, "val")
    np.save(images_path, images)
    np.save(labels_path, labels.astype(">i4"))
    assert torch.equal(load_split(tmp_path, "val")[1], torch.from_numpy(labels))
    np.save(images_path, images[:0])  # an empty split (preprocess.val_size: 0) is fine
    np.save(labels_path, labels[:0])
    assert load_split(tmp_path, "val")[0].shape == (0, 28, 28)


@pytest.mark.parametrize("val_size", [5, 1499])
def test_val_size_that_cannot_be_split_stratified_is_a_clear_error(project, val_size):
    # 5 < 10 classes; 1499 leaves a 1-image train set: neither can be stratified.
    with pytest.raises(StageError, match=rf"preprocess\.val_size = {val_size} cannot split {N_TRAIN} images"):
        project(preprocess__val_size=val_size)
    assert not (project.root / "data" / "processed").exists()


# --- corrupt inputs --------------------------------------------------------------

def gz(path: Path, payload: bytes) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(payload)


def idx_bytes(array: np.ndarray, magic: int | None = None, dims: tuple | None = None) -> bytes:
    dims = array.shape if dims is None else dims
    magic = 0x800 + len(dims) if magic is None else magic
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + array.astype(np.uint8).tobytes()


def wrong_magic(raw: Path) -> None:  # a labels header where images are expected
    gz(raw / RAW_FILES["train_images"], idx_bytes(ARRAYS["train_images"], magic=0x00000801))


def labels_as_images(raw: Path) -> None:  # images file swapped with the labels file
    write_idx(raw / RAW_FILES["train_images"], ARRAYS["train_labels"])


def cut_gzip_stream(raw: Path) -> None:
    path = raw / RAW_FILES["train_images"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def not_gzip(raw: Path) -> None:
    (raw / RAW_FILES["test_labels"]).write_bytes(b"<html>404 Not Found</html>")


def short_payload(raw: Path) -> None:  # header promises 1500 images, payload holds 1499
    images = ARRAYS["train_images"]
    gz(raw / RAW_FILES["train_images"], idx_bytes(images[:-1], dims=images.shape))


def padded_payload(raw: Path) -> None:
    gz(raw / RAW_FILES["test_labels"], idx_bytes(ARRAYS["test_labels"]) + b"\0\0\0")


def header_only_fragment(raw: Path) -> None:
    gz(raw / RAW_FILES["train_labels"], b"\x00\x00\x08")


def count_mismatch(raw: Path) -> None:
    write_idx(raw / RAW_FILES["train_labels"], ARRAYS["train_labels"][:-1])


def label_out_of_range(raw: Path) -> None:
    labels = ARRAYS["train_labels"].copy()
    labels[7] = 10
    write_idx(raw / RAW_FILES["train_labels"], labels)


def label_255(raw: Path) -> None:
    labels = ARRAYS["test_labels"].copy()
    labels[-1] = 255
    write_idx(raw / RAW_FILES["test_labels"], labels)


def wrong_image_size(raw: Path) -> None:
    write_idx(raw / RAW_FILES["test_images"], ARRAYS["test_images"][:, :27, :27])


def missing_file(raw: Path) -> None:
    (raw / RAW_FILES["test_images"]).unlink()


TRAIN_IMAGES, TRAIN_LABELS = RAW_FILES["train_images"], RAW_FILES["train_labels"]
TEST_IMAGES, TEST_LABELS = RAW_FILES["test_images"], RAW_FILES["test_labels"]
CORRUPTIONS = [
    (wrong_magic, TRAIN_IMAGES, "wrong magic number 0x00000801, expected 0x00000803 (an IDX images file)"),
    (labels_as_images, TRAIN_IMAGES, "wrong magic number 0x00000801, expected 0x00000803"),
    (cut_gzip_stream, TRAIN_IMAGES, "not a complete gzip file"),
    (not_gzip, TEST_LABELS, "not a complete gzip file"),
    (short_payload, TRAIN_IMAGES,
     f"{N_TRAIN * 784 - 784 + 16} bytes after decompression, the header promises {N_TRAIN * 784 + 16} "
     f"({N_TRAIN} x 28 x 28): the file is truncated or padded"),
    (padded_payload, TEST_LABELS, "the file is truncated or padded"),
    (header_only_fragment, TRAIN_LABELS, "too short for an IDX header (3 bytes)"),
    (count_mismatch, TRAIN_IMAGES, f"has {N_TRAIN} images but"),
    (label_out_of_range, TRAIN_LABELS, "label 10 at index 7 is outside 0..9"),
    (label_255, TEST_LABELS, f"label 255 at index {N_TEST - 1} is outside 0..9"),
    (wrong_image_size, TEST_IMAGES, "images are 27x27, expected 28x28"),
    (missing_file, TEST_IMAGES, "file not found (run the download stage first)"),
]


@pytest.mark.parametrize("corrupt, file_name, problem", CORRUPTIONS, ids=[c[0].__name__ for c in CORRUPTIONS])
def test_corrupt_input_is_a_stage_error_naming_the_file_and_the_problem(project, corrupt, file_name, problem):
    corrupt(project.raw)
    with pytest.raises(StageError) as info:
        project(preprocess__val_size=200)
    message = str(info.value)
    assert f"data/raw/{file_name}" in message
    assert problem in message
    assert "\n" not in message
    # Nothing was written: no split, no metrics, no temporary file.
    assert not (project.root / "data" / "processed").exists()
    assert not (project.root / "metrics").exists()


def test_count_mismatch_names_both_files(project):
    count_mismatch(project.raw)
    with pytest.raises(StageError) as info:
        project(preprocess__val_size=200)
    assert str(info.value) == (
        f"data/raw/{TRAIN_IMAGES} has {N_TRAIN} images but data/raw/{TRAIN_LABELS} has {N_TRAIN - 1} labels"
    )


def test_failed_run_keeps_the_previous_good_outputs(project):
    out = project(preprocess__val_size=200)
    before = {split: digest(out, split) for split in ("train", "val", "test")}
    label_out_of_range(project.raw)
    with pytest.raises(StageError):
        project(preprocess__val_size=200)
    assert {split: digest(out, split) for split in ("train", "val", "test")} == before
    assert sorted(p.name for p in out.iterdir()) == SPLIT_FILES

