"""evaluate: both trained models on the 10,000 test images.

In:  data/processed/test_*.npy (and feedback_*.npy, the held-out corrected
     pictures, where preprocess wrote them); models/mlp.pt;
     models/skorch_params.pt; params.yaml ``model`` and ``evaluate``.
Out: metrics/evaluate.json   {"manual": {accuracy, loss, macro_f1}, "skorch": {...}};
     with a feedback split, each model also has feedback_accuracy and feedback_count
     metrics/classification_report.json   per-class precision/recall/F1 of each model
     metrics/predictions/{manual,skorch}.csv   actual,predicted per test image, in
     test-set order (DVC's confusion-matrix data; plot reads it for the digit grid)

Both files are state_dicts of the same MLP (skorch's ``save_params`` writes
``module_.state_dict()``), so both load through ``load_mlp`` without importing
skorch (``load_trained``); ``tests/test_training.py`` checks that skorch's
own ``load_params`` gives the same logits. Both models are loaded and checked
before anything is written: a refused file leaves the previous outputs untouched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sklearn.metrics import accuracy_score, classification_report, f1_score

from mnist_dvc.data import load_optional_split, load_split
from mnist_dvc.model import TRAINED_BY, configure_torch, load_trained, loss_and_accuracy, predict_logits
from mnist_dvc.params import load_section
from mnist_dvc.stage import run_stage, write_csv, write_json

def scores(logits, labels, predicted) -> tuple[dict, dict]:
    """The headline metrics and the per-class report of one model; ``predicted`` is ``logits``' argmax."""
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
    configure_torch(1, "cpu", load_section("numerics").cpu)  # the test loss is a float sum: one thread, pinned kernels
    # Both loaded, or refused, before anything is written.
    models = {name: load_trained(name, model_params, getattr(args, name)) for name in TRAINED_BY}
    images, labels = load_split(args.data, "test")
    metrics, reports, predicted = {}, {}, {}
    for name, model in models.items():
        logits = predict_logits(model, images, params.batch_size)
        predicted[name] = logits.argmax(dim=1).numpy()
        metrics[name], reports[name] = scores(logits, labels, predicted[name])
        print(f"{name}: " + "  ".join(f"test/{k} {v:.4f}" for k, v in metrics[name].items()))
    for name in models:
        # actual,predicted per test image, in test-set order: DVC's confusion template.
        write_csv(args.predictions / f"{name}.csv", ["actual", "predicted"],
                  zip(labels.tolist(), predicted[name].tolist()))
    feedback = load_optional_split(args.data, "feedback")
    if feedback is not None:
        feedback_images, feedback_labels = feedback
        for name, model in models.items():
            feedback_predicted = predict_logits(model, feedback_images, params.batch_size).argmax(dim=1).numpy()
            metrics[name]["feedback_accuracy"] = accuracy_score(feedback_labels, feedback_predicted)
            metrics[name]["feedback_count"] = len(feedback_labels)
            print(f"{name}: feedback/accuracy {metrics[name]['feedback_accuracy']:.4f} "
                  f"on {len(feedback_labels)} held-out corrected pictures")
    write_json(args.report, reports)
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
