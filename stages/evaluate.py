"""evaluate: both trained models on the 10,000 test images.

In:  data/processed/test.pt; models/mlp.pt; models/skorch_params.pt;
     params.yaml ``model`` and ``evaluate``.
Out: metrics/evaluate.json   {"manual": {accuracy, loss, macro_f1}, "skorch": {...}}
     metrics/classification_report.json   per-class precision/recall/F1 of each model
     metrics/predictions/{manual,skorch}.csv   actual,predicted per test image, in
     test-set order (DVC's confusion-matrix data; plot reads it for the digit grid)
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from sklearn.metrics import accuracy_score, classification_report, f1_score

from mnist_dvc.data import load_split
from mnist_dvc.model import build_mlp, loss_and_accuracy, predict_logits
from mnist_dvc.params import load_section
from mnist_dvc.skorch_net import load_net
from mnist_dvc.stage import StageError, run_stage, write_csv, write_json


def manual_logits(model_params, path: Path, images, batch_size) -> torch.Tensor:
    """Logits of the explicit loop's model, loaded as a state_dict with weights_only=True."""
    model = build_mlp(model_params, seed=0)
    model.load_state_dict(torch.load(path, weights_only=True))
    return predict_logits(model, images, batch_size)


def skorch_logits(model_params, path: Path, images, batch_size) -> torch.Tensor:
    """Logits of the skorch model: ``forward`` returns the module's raw output."""
    return load_net(model_params, path, batch_size).forward(images)


def scores(logits, labels) -> tuple[dict, dict]:
    """The headline metrics and the per-class report of one model."""
    predicted = logits.argmax(dim=1).numpy()
    loss, _ = loss_and_accuracy(logits, labels)
    headline = {
        "accuracy": accuracy_score(labels, predicted),
        "loss": loss,
        "macro_f1": f1_score(labels, predicted, average="macro"),
    }
    return headline, classification_report(labels, predicted, output_dict=True, zero_division=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--manual", type=Path, default=Path("models/mlp.pt"))
    parser.add_argument("--skorch", type=Path, default=Path("models/skorch_params.pt"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"))
    parser.add_argument("--report", type=Path, default=Path("metrics/classification_report.json"))
    parser.add_argument("--predictions", type=Path, default=Path("metrics/predictions"))
    args = parser.parse_args(argv)
    model_params, params = load_section("model"), load_section("evaluate")
    images, labels = load_split(args.data, "test")
    loaders = {"manual": (manual_logits, args.manual), "skorch": (skorch_logits, args.skorch)}
    metrics, reports = {}, {}
    for name, (logits_of, path) in loaders.items():
        if not path.exists():
            raise StageError(f"{path}: model not found (run the {'train' if name == 'manual' else 'fit'} stage)")
        try:
            logits = logits_of(model_params, path, images, params.batch_size)
        except (pickle.UnpicklingError, RuntimeError) as exc:
            # weights_only=True refuses anything but tensors; a size mismatch
            # means the model section changed since the model was trained.
            reason = str(exc).strip().splitlines()[0]
            raise StageError(f"{path}: refused to load as {name} model weights: {reason}") from None
        metrics[name], reports[name] = scores(logits, labels)
        # actual,predicted per test image, in test-set order: DVC's confusion template.
        predicted = logits.argmax(dim=1)
        write_csv(args.predictions / f"{name}.csv", ["actual", "predicted"],
                  zip(labels.tolist(), predicted.tolist()))
        print(f"{name}: " + "  ".join(f"test/{k} {v:.4f}" for k, v in metrics[name].items()))
    write_json(args.report, reports)
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
