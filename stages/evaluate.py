"""evaluate: both trained models on the 10,000 test images.

In:  data/processed/test_*.npy (and feedback_*.npy, the held-out corrections, where
     preprocess wrote them); models/mlp.pt; models/skorch_params.pt; params.yaml ``model``, ``evaluate``.
Out: metrics/evaluate.json   {"manual": {accuracy, loss, macro_f1}, "skorch": {...}}, and
                             feedback_accuracy and feedback_count with a feedback split
     metrics/classification_report.json   per-class precision/recall/F1 of each model
     metrics/predictions/{manual,skorch}.csv   actual,predicted per test image, in test-set order

Both files are state_dicts of the same MLP, loaded without skorch (``load_trained``),
and both are loaded and checked before anything is written.
"""

from __future__ import annotations

from sklearn.metrics import accuracy_score, classification_report, f1_score

from mnist_dvc.data import load_optional_split, load_split
from mnist_dvc.model import TRAINED_BY, configure_torch, load_trained, loss_and_accuracy, predict_logits
from mnist_dvc.params import load_section
from mnist_dvc.stage import parse_paths, run_stage, write_csv, write_json


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
    args = parse_paths(__doc__, argv, data="data/processed", manual="models/mlp.pt",
                       skorch="models/skorch_params.pt", metrics="metrics/evaluate.json",
                       report="metrics/classification_report.json", predictions="metrics/predictions")
    model_params, params = load_section("model"), load_section("evaluate")
    configure_torch(1, "cpu", load_section("numerics").cpu)  # the test loss is a float sum: one thread, pinned kernels
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
