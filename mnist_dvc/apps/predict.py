"""predict: classify your own pictures of digits with both trained models.

    python -m mnist_dvc.apps.predict IMAGE [IMAGE ...] [--json] [--save-input DIR] [--onnx] [--stage prod]
    make predict IMAGES="a.png b.jpg"

Each picture becomes the 28x28 input the models were trained on
(mnist_dvc/apps/images.py), then both models classify it; one line each
(``my7.jpg: 7  (manual 0.98, skorch 0.98)``) or, with ``--json``, one array.
With ``--stage``, the version is printed to stderr first and is each answer's
``model_version``. Exit status: 0 when every picture was classified, 1 when
any was not (the others still are), 2 for a usage error. Options and output:
docs/use-the-model.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import numpy as np

from mnist_dvc.apps.images import ImageError, load_image, to_png
from mnist_dvc.apps.inference import Predictor, answer_of, load_stage
from mnist_dvc.stage import StageError, atomic_path


def summary(path: str, answer: dict) -> str:
    """``my7.jpg: 7  (manual 0.98, skorch 0.98)``; both digits when the models disagree."""
    models = {name: answer[name] for name in ("manual", "skorch")}
    digits = {m["digit"] for m in models.values()}
    if len(digits) == 1:
        details = ", ".join(f"{name} {m['probabilities'][m['digit']]:.2f}" for name, m in models.items())
        return f"{path}: {digits.pop()}  ({details})"
    details = ", ".join(f"{name} {m['digit']} ({m['probabilities'][m['digit']]:.2f})" for name, m in models.items())
    return f"{path}: the models disagree: {details}"


# Of a picture's name in --save-input's file names: with the number and the temporary
# suffix, a file name must stay under the usual 255-byte limit.
MAX_STEM_BYTES = 120


def writable_folder(value: str) -> Path:
    """argparse ``type`` of ``--save-input``: the folder, created now, before any work (exit 2 if it cannot be)."""
    folder = Path(value)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise argparse.ArgumentTypeError(f"{folder} exists and is not a folder") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create the folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in the folder {folder}: permission denied")
    return folder


def save_inputs(folder: Path, inputs: dict[int, np.ndarray], paths: list[str]) -> list[str]:
    """Write each 28x28 input as ``<n>-<stem>.png``, numbered in the order given (a long stem shortened);
    returns one line per input that could not be written (the others are)."""
    failed = []
    for index, image in inputs.items():
        stem = Path(paths[index]).stem
        while len(os.fsencode(stem)) > MAX_STEM_BYTES:
            stem = stem[:-1]
        target = folder / f"{index + 1:0{len(str(len(paths)))}d}-{stem}.png"
        try:
            with atomic_path(target) as tmp:
                tmp.write_bytes(to_png(image))
        except OSError as exc:
            failed.append(f"{target}: cannot write the 28x28 input: {exc.strerror or exc}")
    return failed


def classify(paths: list[str], predictor: Predictor,
             version: str | None = None) -> tuple[list[dict], dict[int, np.ndarray]]:
    """One answer per path, in order (naming ``version``, if given); and each usable picture's 28x28 input."""
    answers: list[dict] = [{"path": path} for path in paths]
    inputs: dict[int, np.ndarray] = {}
    for index, path in enumerate(paths):
        try:
            inputs[index] = load_image(path)
        except ImageError as exc:
            answers[index]["error"] = str(exc)
    if inputs:
        probabilities = predictor.probabilities(np.stack(list(inputs.values())))
        for row, index in enumerate(inputs):
            for name, probs in probabilities.items():
                answers[index][name] = answer_of(probs[row])
            if version:
                answers[index]["model_version"] = version
    return answers, inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_dvc.apps.predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="picture files (PNG, JPEG, GIF, BMP, WebP, TIFF...)")
    parser.add_argument("--json", action="store_true", help="print one JSON array instead of one line per picture")
    parser.add_argument("--save-input", type=writable_folder, metavar="DIR",
                        help="write the 28x28 input each picture became")
    parser.add_argument("--onnx", action="store_true", help="use models/*.onnx with ONNX Runtime instead of PyTorch")
    parser.add_argument("--models-root", type=Path, default=Path("."), metavar="DIR",
                        help="the project folder holding models/ and params.yaml (default: the current one)")
    parser.add_argument("--stage", metavar="STAGE",
                        help="use the version this registry stage names (e.g. prod), fetched by DVC at its "
                             "commit, instead of models/ (docs/registry.md)")
    args = parser.parse_args(argv)
    # A file name that is not valid UTF-8 is printed with \x escapes, not a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    version = None
    try:
        if args.stage:
            served = load_stage(args.models_root, args.stage, onnx=args.onnx)
            predictor, version = served.predictor, served.release.version
            print(f"models: {version} ({served.release.commit[:7]}), stage {args.stage}", file=sys.stderr)
        else:
            predictor = Predictor(args.models_root, onnx=args.onnx)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    answers, inputs = classify(args.images, predictor, version)
    failed = save_inputs(args.save_input, inputs, args.images) if args.save_input else []
    try:
        if args.json:
            print(json.dumps(answers, indent=2))
        else:
            for answer in answers:
                if "error" in answer:
                    print(f"{answer['path']}: error: {answer['error']}", file=sys.stderr)
                else:
                    print(summary(answer["path"], answer))
        sys.stdout.flush()
    except BrokenPipeError:  # `predict ... | head`: the reader is gone; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failed or any("error" in answer for answer in answers) else 0


if __name__ == "__main__":
    status = main()
    gc.freeze()  # exit without collecting torch's objects: 0.5 s (mnist_dvc/stage.py says why)
    sys.exit(status)
