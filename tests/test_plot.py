"""plot: its inputs from evaluate are checked before any picture is drawn.

A small fixture (20 test images, hand-written metrics) in a temporary folder;
the stage runs in-process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import committed_params_file
from mnist_dvc.data import save_split
from mnist_dvc.stage import StageError, write_csv
from stages import plot

N_TEST = 20
EVALUATION = {name: {"accuracy": 0.9, "loss": 0.3, "macro_f1": 0.9} for name in ("manual", "skorch")}


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A cwd with params.yaml, a test split, evaluate.json and both predictions CSVs."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(committed_params_file(), tmp_path / "params.yaml")
    labels = np.arange(N_TEST) % 10
    save_split(tmp_path / "data/processed", "test", np.zeros((N_TEST, 28, 28), np.uint8), labels)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps(EVALUATION))
    for name in ("manual", "skorch"):
        write_csv(tmp_path / f"metrics/predictions/{name}.csv", ["actual", "predicted"],
                  zip(labels.tolist(), (labels[::-1]).tolist()))
    return tmp_path


def run_plot(folder: Path) -> None:
    plot.main(["--data", str(folder / "data/processed"), "--metrics", str(folder / "metrics"),
               "--out", str(folder / "plots")])


def test_good_inputs_are_plotted(folder):
    run_plot(folder)
    assert sorted(p.name for p in (folder / "plots").iterdir()) == [
        "accuracy.png", "confusion_matrices.png", "loss_curves.png", "misclassified.png"]


CSV_ROWS = "".join(f"{i % 10},{i % 10}\n" for i in range(N_TEST))
BAD_INPUTS = {
    # Before these checks: a JSONDecodeError or numpy traceback, or a silently wrong picture.
    "json-truncated": ("evaluate.json", json.dumps(EVALUATION)[:30], r"evaluate\.json: not valid JSON \(Unterminated"),
    "json-no-accuracy": ("evaluate.json", json.dumps({"manual": {}, "skorch": {}}),
                         r"evaluate\.json: no test accuracy in 0\.\.1 at manual\.accuracy"),
    "csv-header-only": ("predictions/manual.csv", "actual,predicted\n",
                        r"manual\.csv: 0 rows of 1 columns, expected 20 rows \(one per test image\) of 2 columns"),
    "csv-abc": ("predictions/skorch.csv", "actual,predicted\n" + CSV_ROWS.replace("3,3", "3,abc"),
                r"skorch\.csv: not a CSV of integer labels \(.*abc"),
    "csv-12": ("predictions/manual.csv", "actual,predicted\n" + CSV_ROWS.replace("4,4", "4,12", 1),
               r"manual\.csv: label 12 in row 6 is outside 0\.\.9"),
    "csv-minus-1": ("predictions/manual.csv", "actual,predicted\n" + CSV_ROWS.replace("0,0", "0,-1", 1),
                    r"manual\.csv: label -1 in row 2 is outside 0\.\.9"),
    "csv-other-test-data": ("predictions/manual.csv", "actual,predicted\n" + CSV_ROWS.replace("5,5", "6,5", 1),
                            r"manual\.csv: row 7 has the actual label 6, but test image 5 is a 5 \(predictions for "
                            r"other test data\)"),
    "csv-truncated-row": ("predictions/skorch.csv", "actual,predicted\n" + CSV_ROWS[:-3],
                          r"skorch\.csv: not a CSV of integer labels"),
    "csv-truncated-lines": ("predictions/skorch.csv", "actual,predicted\n" + CSV_ROWS[:40],
                            r"skorch\.csv: 10 rows of 2 columns, expected 20 rows"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_a_bad_evaluate_output_is_one_line_saying_to_rerun_evaluate_and_nothing_is_drawn(folder, bad):
    file, text, message = BAD_INPUTS[bad]
    (folder / "metrics" / file).write_text(text)
    with pytest.raises(StageError, match=message) as info:
        run_plot(folder)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(str(folder / "metrics" / file))
    assert str(info.value).endswith("; rerun `dvc repro evaluate`")
    assert not (folder / "plots").exists()


def test_confusion_matrices_count_true_labels_by_row_and_predictions_by_column():
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(0)
    actual = rng.integers(0, 10, 500)
    predicted = np.where(rng.random(500) < 0.7, actual, rng.integers(0, 10, 500))
    predicted[actual == 3] = 8  # not symmetric: a transposed matrix would differ
    fig = plot.confusion_matrices({"manual": (actual, predicted), "skorch": (actual, actual)})
    drawn = [np.asarray(ax.images[0].get_array()) for ax in fig.axes]
    np.testing.assert_array_equal(drawn[0], confusion_matrix(actual, predicted, labels=range(10)))
    np.testing.assert_array_equal(drawn[1], np.diag(np.bincount(actual, minlength=10)))
    assert fig.axes[0].get_title().endswith(f": {int((actual != predicted).sum())} errors")


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])  # IDX labels (uint8), stored ones (int64)
def test_confusion_counts_match_sklearn_whatever_the_label_dtype(dtype):
    from sklearn.metrics import confusion_matrix

    from mnist_dvc.data import confusion_counts

    rng = np.random.default_rng(1)
    actual = rng.integers(0, 10, 2000).astype(dtype)
    predicted = np.where(rng.random(2000) < 0.5, actual, 9).astype(dtype)
    counts = confusion_counts(actual, predicted)
    assert counts.dtype == np.int64 and counts.shape == (10, 10)
    np.testing.assert_array_equal(counts, confusion_matrix(actual, predicted, labels=range(10)))
