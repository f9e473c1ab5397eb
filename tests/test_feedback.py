"""Corrections from the web app: the store (mnist_dvc/apps/feedback.py), the feedback
stage, and what preprocess and the trainings make of the collected pictures. The
web app's ``/api/feedback`` is tested with its other routes, in test_serve.py.

The pictures here are seeded random 28x28 arrays: the store, the hold-out and
the splits care about bytes and hashes, not about what the digits look like.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import write_params
from mnist_dvc.apps.feedback import FeedbackStore, StoreFull
from mnist_dvc.apps.images import to_png
from mnist_dvc.data import (FEEDBACK_LABELS, feedback_held_out, format_feedback_labels, load_feedback,
                            load_stored_split, read_feedback_labels, split_paths)
from mnist_dvc.stage import StageError

PICTURES = "data/feedback/pictures"  # where the web app collects, in the project (dvc.yaml)


def pictures(count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` different 28x28 float pictures in [0, 1], as to_mnist returns them."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (28, 28)).astype(np.float32) / 255 for _ in range(count)]


def collect(folder, count: int, seed: int = 0) -> dict[str, int]:
    """Store ``count`` pictures with labels 0, 1, 2, ... in turn; ``{file: label}``."""
    store = FeedbackStore(folder)
    return {store.add(image, i % 10).file: i % 10 for i, image in enumerate(pictures(count, seed))}


def labels_csv(folder) -> str:
    return (folder / FEEDBACK_LABELS).read_text()


# --- the store ---------------------------------------------------------------------------

def test_a_correction_is_stored_as_the_png_of_the_input_named_by_its_hash_with_a_sorted_row(tmp_path):
    folder = tmp_path / "feedback"
    images = pictures(3)
    store = FeedbackStore(folder)
    assert labels_csv(folder) == "file,label\n"  # a new store holds its header
    stored = [store.add(image, label) for image, label in zip(images, (7, 3, 9))]
    assert [s.created for s in stored] == [True] * 3 and [s.total for s in stored] == [1, 2, 3]
    for image, entry in zip(images, stored):
        data = (folder / entry.file).read_bytes()
        assert data == to_png(image) and entry.file == hashlib.sha256(data).hexdigest() + ".png"
        with Image.open(io.BytesIO(data)) as picture:
            assert (picture.format, picture.mode, picture.size) == ("PNG", "L", (28, 28))
    rows = sorted(f"{s.file},{s.label}" for s in stored)
    assert labels_csv(folder) == "file,label\n" + "\n".join(rows) + "\n"
    assert sorted(p.name for p in folder.iterdir()) == sorted([FEEDBACK_LABELS] + [s.file for s in stored])


def test_correcting_a_picture_again_replaces_its_label_and_keeps_one_row(tmp_path):
    store = FeedbackStore(tmp_path)
    image = pictures(1)[0]
    first, again, relabelled = store.add(image, 4), store.add(image, 4), store.add(image, 9)
    assert (first.created, again.created, relabelled.created) == (True, False, False)
    assert first.file == again.file == relabelled.file and relabelled.total == 1
    assert read_feedback_labels(tmp_path) == {first.file: 9}


def test_concurrent_corrections_from_many_threads_and_two_servers_are_each_stored_once(tmp_path):
    # Two stores on one folder stand for two server processes (an flock each);
    # 8 threads send 20 pictures each, every picture twice, the second time relabelled.
    stores = [FeedbackStore(tmp_path), FeedbackStore(tmp_path)]
    images = pictures(160)
    start = threading.Barrier(8)
    errors = []

    def client(k: int) -> None:
        start.wait()
        try:
            for i in range(k, 160, 8):
                stores[k % 2].add(images[i], 0)
                stores[(k + 1) % 2].add(images[i], i % 10)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    expected = {hashlib.sha256(to_png(image)).hexdigest() + ".png": i % 10 for i, image in enumerate(images)}
    assert read_feedback_labels(tmp_path) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([FEEDBACK_LABELS, *expected])  # no temp file left


def test_a_full_store_refuses_new_pictures_but_takes_relabels(tmp_path):
    store = FeedbackStore(tmp_path, limit=2)
    first, second, third = pictures(3)
    store.add(first, 1)
    store.add(second, 2)
    with pytest.raises(StoreFull, match=r"full \(2 pictures\).*--collect-limit"):
        store.add(third, 3)
    assert store.add(first, 5).label == 5
    assert sorted(read_feedback_labels(tmp_path).values()) == [2, 5]


@pytest.mark.parametrize("text, reason", [
    ("name,digit\n", "the first line must be the header 'file,label'"),
    ("file,label\n../../etc/passwd,1\n", "line 2: expected '<sha256>.png,<digit>'"),
    (f"file,label\n{'a' * 64}.png,10\n", "line 2: label '10' is not a digit 0..9"),
    (f"file,label\n{'a' * 64}.png,1\n{'a' * 64}.png,2\n", "line 3: " + "a" * 64 + ".png is listed twice"),
])
def test_a_damaged_labels_csv_is_refused_in_one_line_naming_the_line(tmp_path, text, reason):
    (tmp_path / FEEDBACK_LABELS).write_text(text)
    with pytest.raises(StageError, match=str(tmp_path / FEEDBACK_LABELS)) as caught:
        read_feedback_labels(tmp_path)
    assert reason in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(StageError):  # a server does not start on it either
        FeedbackStore(tmp_path)


def test_a_picture_changed_after_collection_is_refused_naming_it(tmp_path):
    name = next(iter(collect(tmp_path, 1)))
    (tmp_path / name).write_bytes(to_png(np.zeros((28, 28))))
    with pytest.raises(StageError, match=f"{name}: its bytes do not match the sha256 in its name"):
        load_feedback(tmp_path)


# --- the hold-out -----------------------------------------------------------------------

def test_the_hold_out_depends_on_the_hash_alone_and_adding_pictures_moves_none(workdir):
    from stages import download, preprocess

    download.main([])
    first = collect(workdir / PICTURES, 150, seed=1)
    preprocess.main([])
    held_before = load_stored_split("data/processed", "feedback")
    collect(workdir / PICTURES, 150, seed=2)  # 150 more
    preprocess.main([])
    held_after = load_stored_split("data/processed", "feedback")
    before = {image.tobytes() for image in held_before[0]}
    after = {image.tobytes() for image in held_after[0]}
    assert before < after  # every picture held out before still is; some new ones joined
    # The rule: the first 32 bits of the hash below holdout * 2**32 (about 20% at 0.2).
    assert len(before) == sum(feedback_held_out(name, 0.2) for name in first)
    assert 0.1 < len(after) / 300 < 0.3
    assert [feedback_held_out(n, 0.0) for n in first] == [False] * 150
    assert all(feedback_held_out(n, 0.5) for n in first if feedback_held_out(n, 0.2))


# --- preprocess: the byte-identical default, and the splits with feedback -----------------

def processed_bytes() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(Path("data/processed").iterdir())}


def test_with_no_or_an_empty_feedback_folder_preprocess_writes_exactly_the_files_of_before(prepared):
    from stages import feedback, preprocess

    # `prepared` ran preprocess with no collection at all: today's outputs.
    without = processed_bytes(), (prepared / "metrics/data.json").read_bytes()
    assert sorted(without[0]) == sorted(f"{s}_{p}.npy" for s in ("train", "val", "test") for p in ("images", "labels"))
    assert set(json.loads(without[1])) == {"train", "val", "test"}
    feedback.main([])  # a fresh clone's repro: nothing collected, no folder made
    assert not (prepared / PICTURES).exists()
    empty = json.loads((prepared / "metrics/feedback.json").read_text())
    assert empty == {"pictures": 0, "held_out": 0}
    FeedbackStore(prepared / PICTURES)  # a server with --collect starts an empty collection
    feedback.main([])
    assert not (prepared / "data/.gitignore").exists()  # the stage writes its record, nothing else
    assert json.loads((prepared / "metrics/feedback.json").read_text()) == empty
    preprocess.main([])
    assert (processed_bytes(), (prepared / "metrics/data.json").read_bytes()) == without


def test_preprocess_writes_the_corrections_repeat_times_with_as_many_mnist_images_and_holds_out_the_rest(prepared):
    from stages import preprocess

    train_before = load_stored_split("data/processed", "train")
    collected = collect(prepared / PICTURES, 40)
    preprocess.main([])
    names, images, labels = load_feedback(prepared / PICTURES)
    held = np.array([feedback_held_out(name, 0.2) for name in names])
    assert 0 < held.sum() < 40 and sorted(collected) == names
    repeat = 10  # params.yaml's preprocess.feedback.repeat
    # The training split is the one of a project without corrections.
    train_images, train_labels = load_stored_split("data/processed", "train")
    assert np.array_equal(train_images, train_before[0]) and np.array_equal(train_labels, train_before[1])
    # feedback_train: the corrections repeat times, then as many distinct training images.
    tuning_images, tuning_labels = load_stored_split("data/processed", "feedback_train")
    copies = (~held).sum() * repeat
    assert len(tuning_labels) == 2 * copies
    assert np.array_equal(tuning_images[:copies], np.tile(images[~held], (repeat, 1, 1)))
    assert np.array_equal(tuning_labels[:copies], np.tile(labels[~held], repeat))
    replay = {image.tobytes(): label for image, label in zip(train_images, train_labels)}
    assert len({image.tobytes() for image in tuning_images[copies:]}) == copies
    assert all(replay.get(image.tobytes()) == label for image, label in zip(tuning_images[copies:],
                                                                            tuning_labels[copies:]))
    test_images, test_labels = load_stored_split("data/processed", "feedback")
    assert np.array_equal(test_images, images[held]) and np.array_equal(test_labels, labels[held])
    summary = json.loads((prepared / "metrics/data.json").read_text())
    assert summary["feedback"]["count"] == held.sum() and summary["feedback_train"]["repeat"] == repeat
    assert summary["feedback_train"]["count"] == (~held).sum() and summary["feedback_train"]["images"] == 2 * copies

    # All collected pictures removed again: both feedback splits go with them.
    for path in (prepared / PICTURES).glob("*.png"):
        path.unlink()
    (prepared / PICTURES / FEEDBACK_LABELS).write_text("file,label\n")
    preprocess.main([])
    assert not any(path.exists() for split in ("feedback", "feedback_train")
                   for path in split_paths("data/processed", split))


@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_train_and_fit_learn_bit_identical_weights_with_feedback(prepared, mirror, schedule):
    import torch

    from stages import fit as fit_stage
    from stages import preprocess
    from stages import train as train_stage

    folder, md5 = mirror
    write_params(prepared, folder.as_uri() + "/", md5, train__schedule=schedule, train__warmup=0.3)
    train_stage.main(["--model", "before.pt", "--live", "metrics/before"])
    collect(prepared / PICTURES, 30)
    preprocess.main([])
    train_stage.main([])
    fit_stage.main([])
    manual = torch.load(prepared / "models/mlp.pt", weights_only=True)
    skorch = torch.load(prepared / "models/skorch_params.pt", weights_only=True)
    before = torch.load(prepared / "before.pt", weights_only=True)
    assert all(torch.equal(manual[k], skorch[k]) for k in manual)
    assert not all(torch.equal(manual[k], before[k]) for k in manual)  # the corrections were learnt
    # Both logged the epochs on MNIST, then the epochs on the corrections, as the same steps.
    epochs = [len(read_tsv(prepared / f"metrics/{stage}/plots/metrics/train/loss.tsv")) for stage in ("train", "fit")]
    assert epochs == [2 + 3, 2 + 3]  # FAST_PARAMS' train.epochs, params.yaml's train.feedback.epochs
    first = read_tsv(prepared / "metrics/before/plots/metrics/train/loss.tsv")
    assert read_tsv(prepared / "metrics/train/plots/metrics/train/loss.tsv")[:2] == first  # the same first epochs
    assert len(read_tsv(prepared / "metrics/fit/plots/metrics/val/accuracy.tsv")) == 5


def read_tsv(path):
    """A DVCLive metric's rows after the header: [step, value] each."""
    return [line.split("\t") for line in path.read_text().splitlines()[1:]]


# --- the feedback stage -------------------------------------------------------------------

def dvc_add_record(folder, nfiles: int) -> None:
    """data/feedback/pictures.dvc as `dvc add data/feedback/pictures` writes it (the md5 plays no part here)."""
    folder.with_name("pictures.dvc").write_text(
        f"outs:\n- md5: {'0' * 32}.dir\n  size: 1000\n  nfiles: {nfiles}\n  hash: md5\n  path: pictures\n")


@pytest.mark.parametrize("state", ["folder absent", "labels.csv only", "a picture absent"])
def test_a_committed_but_not_pulled_collection_stops_the_feedback_stage_in_one_line(workdir, state, capsys):
    from stages import feedback

    folder = workdir / PICTURES
    collected = collect(folder, 3)
    dvc_add_record(folder, 4)
    if state == "folder absent":
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    elif state == "labels.csv only":
        for name in collected:
            (folder / name).unlink()
        (folder / FEEDBACK_LABELS).write_text("file,label\n")
    else:
        (folder / next(iter(collected))).unlink()
    with pytest.raises(StageError) as caught:
        feedback.main([])
    assert str(caught.value) == (f"{PICTURES}.dvc is committed but its data is not here: "
                                 f"run `git checkout {PICTURES}.dvc && dvc pull {PICTURES}.dvc`")
    assert not (workdir / "metrics/feedback.json").exists()


def test_the_feedback_stage_counts_the_pictures_and_the_held_out_ones_and_says_why_there_is_no_metric_yet(
        workdir, capsys):
    from stages import feedback

    names = collect(workdir / PICTURES, 12)
    feedback.main([])
    held = sum(feedback_held_out(name, 0.2) for name in names)
    assert json.loads((workdir / "metrics/feedback.json").read_text()) == {"pictures": 12, "held_out": held}
    out = capsys.readouterr().out
    assert f"{PICTURES}: 12 corrected pictures, {held} held out as the feedback test split" in out
    assert f"{PICTURES} is not versioned yet: `dvc add {PICTURES}`" in out
    dvc_add_record(workdir / PICTURES, 13)
    feedback.main([])
    assert "not versioned yet" not in capsys.readouterr().out


def test_with_none_held_out_the_feedback_stage_says_when_feedback_accuracy_appears(workdir, capsys):
    from stages import feedback

    names = [name for name in collect(workdir / PICTURES, 12) if not feedback_held_out(name, 0.2)]
    labels = read_feedback_labels(workdir / PICTURES)
    (workdir / PICTURES / FEEDBACK_LABELS).write_text(format_feedback_labels({n: labels[n] for n in names[:3]}))
    feedback.main([])
    assert json.loads((workdir / "metrics/feedback.json").read_text()) == {"pictures": 3, "held_out": 0}
    assert ("3 corrected pictures, 0 held out as the feedback test split (a picture is held out where its "
            "content hash falls in the first 20%: feedback_accuracy appears once one does, usually within "
            "the first 15)") in capsys.readouterr().out
