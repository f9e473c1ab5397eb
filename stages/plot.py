"""plot: the pictures people would rather look at than read, as PNGs.

In:  metrics/{train,fit}/plots/ (per-epoch curves); metrics/evaluate.json;
     metrics/predictions/{manual,skorch}.csv; data/processed/test_images.npy; params.yaml ``plot``.
Out: plots/loss_curves.png         training loss (and validation accuracy) per epoch, both trainings
     plots/confusion_matrices.png  a heatmap per model
     plots/misclassified.png       test digits the explicit loop's model got wrong
     plots/accuracy.png            test accuracy, explicit loop vs skorch

Drawn through mnist_dvc/figures.py: the same inputs give the same bytes. No torch import.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from mnist_dvc.data import N_CLASSES, confusion_counts, label_outside, load_stored_split
from mnist_dvc.figures import plt, save_png
from mnist_dvc.params import load_section
from mnist_dvc.stage import StageError, parse_paths, run_stage

TRAININGS = {"manual": "explicit loop (train)", "skorch": "skorch (fit)"}
RERUN_EVALUATE = "rerun `dvc repro evaluate`"


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    """(epochs, values) from a DVCLive .tsv; empty when the file does not exist."""
    if not path.exists():
        return [], []
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    value = [k for k in rows[0] if k not in ("step", "timestamp")][0] if rows else None
    return [int(r["step"]) + 1 for r in rows], [float(r[value]) for r in rows]


def read_evaluation(path: Path) -> dict:
    """evaluate.json, with a test accuracy in [0, 1] for each training; StageError naming the file if not."""
    try:
        evaluation = json.loads(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run `dvc repro evaluate`") from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise StageError(f"{path}: not valid JSON ({exc}); {RERUN_EVALUATE}") from None
    for name in TRAININGS:
        entry = evaluation.get(name) if isinstance(evaluation, dict) else None
        accuracy = entry.get("accuracy") if isinstance(entry, dict) else None
        if not (isinstance(accuracy, (int, float)) and 0 <= accuracy <= 1):
            raise StageError(f"{path}: no test accuracy in 0..1 at {name}.accuracy; {RERUN_EVALUATE}")
    return evaluation


def read_predictions(path: Path, labels: np.ndarray) -> np.ndarray:
    """The predictions in evaluate's CSV, whose rows are (actual: ``labels``, predicted in 0..9)."""
    try:
        with warnings.catch_warnings():  # an empty file: refused below, not warned about
            warnings.simplefilter("ignore", UserWarning)
            data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run `dvc repro evaluate`") from None
    except ValueError as exc:  # a value that is not an integer, a row without two columns
        raise StageError(f"{path}: not a CSV of integer labels ({exc}); {RERUN_EVALUATE}") from None
    if data.shape != (len(labels), 2) or not len(labels):
        raise StageError(f"{path}: {len(data)} rows of {data.shape[1]} columns, expected {len(labels)} rows (one per "
                         f"test image) of 2 columns (actual,predicted); {RERUN_EVALUATE}")
    actual, predicted = data[:, 0], data[:, 1]
    if not np.array_equal(actual, labels):
        row = int(np.argmax(actual != labels))
        raise StageError(f"{path}: row {row + 2} has the actual label {actual[row]}, but test image {row} is a "
                         f"{labels[row]} (predictions for other test data); {RERUN_EVALUATE}")
    bad = label_outside(predicted)
    if bad is not None:
        raise StageError(f"{path}: label {predicted[bad]} in row {bad + 2} is outside 0..9; {RERUN_EVALUATE}")
    return predicted


def loss_curves(live_dirs: dict[str, Path]):
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    # Distinct line styles: with the same seed both trainings often coincide exactly.
    styles = {"manual": {"marker": "o", "linestyle": "-"}, "skorch": {"marker": "x", "linestyle": "--"}}
    for name, live in live_dirs.items():
        loss_ax.plot(*read_curve(live / "plots/metrics/train/loss.tsv"), label=TRAININGS[name], **styles[name])
        acc_ax.plot(*read_curve(live / "plots/metrics/val/accuracy.tsv"), label=TRAININGS[name], **styles[name])
    loss_ax.set(title="Training loss", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.legend()
    if any(len(line.get_xdata()) for line in acc_ax.lines):
        acc_ax.legend()
    else:
        acc_ax.set(xticks=[], yticks=[])
        acc_ax.text(0.5, 0.5, "no validation split\n(set preprocess.val_size, e.g. 5000)",
                    ha="center", va="center", transform=acc_ax.transAxes)
    fig.tight_layout()
    return fig


def confusion_matrices(predictions: dict[str, tuple[np.ndarray, np.ndarray]]):
    # matplotlib alone: scikit-learn's ConfusionMatrixDisplay costs more in imports (docs/performance.md).
    fig, axes = plt.subplots(1, len(predictions), figsize=(6 * len(predictions), 5.5))
    for ax, (name, (actual, predicted)) in zip(axes, predictions.items()):
        counts = confusion_counts(actual, predicted)
        ax.imshow(counts, cmap="Blues")
        for (true, guess), count in np.ndenumerate(counts):
            ax.text(guess, true, count, ha="center", va="center", fontsize=8,
                    color="white" if count > counts.max() / 2 else "black")
        ax.set(xticks=range(N_CLASSES), yticks=range(N_CLASSES), xlabel="Predicted label", ylabel="True label")
        ax.set_title(f"{TRAININGS[name]}: {int((actual != predicted).sum())} errors")
    fig.tight_layout()
    return fig


def misclassified(images, actual, predicted, other_predicted, count: int):
    wrong = np.flatnonzero(actual != predicted)[:count]
    cols = min(10, max(1, len(wrong)))
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.6 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"#{i} true {actual[i]}\nloop {predicted[i]} skorch {other_predicted[i]}", fontsize=7)
    fig.suptitle(f"Misclassified test digits (explicit loop): first {len(wrong)} of {int((actual != predicted).sum())}")
    fig.tight_layout()
    return fig


def accuracy_bars(metrics: dict):
    fig, ax = plt.subplots(figsize=(5, 4))
    values = [metrics[n]["accuracy"] for n in TRAININGS]
    bars = ax.bar(list(TRAININGS.values()), values, color=["tab:blue", "tab:orange"])
    ax.bar_label(bars, labels=[f"{v:.4f}" for v in values])
    ax.set_ylim(max(0.0, min(values) - 0.05), 1.0)
    ax.set(title="Test accuracy", ylabel="accuracy")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    args = parse_paths(__doc__, argv, data="data/processed", metrics="metrics", out="plots")
    params = load_section("plot")
    evaluation = read_evaluation(args.metrics / "evaluate.json")
    images, labels = load_stored_split(args.data, "test")
    predictions = {n: (labels, read_predictions(args.metrics / "predictions" / f"{n}.csv", labels))
                   for n in TRAININGS}
    live_dirs = {"manual": args.metrics / "train", "skorch": args.metrics / "fit"}

    save_png(loss_curves(live_dirs), args.out / "loss_curves.png", params.dpi)
    save_png(confusion_matrices(predictions), args.out / "confusion_matrices.png", params.dpi)
    grid = misclassified(np.divide(images, 255, dtype=np.float32), *predictions["manual"], predictions["skorch"][1],
                         params.misclassified)
    save_png(grid, args.out / "misclassified.png", params.dpi)
    save_png(accuracy_bars(evaluation), args.out / "accuracy.png", params.dpi)


if __name__ == "__main__":
    run_stage(main)
