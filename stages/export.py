"""export: an ONNX copy of each trained model, checked against PyTorch before it is kept.

In:  models/mlp.pt; models/skorch_params.pt; data/processed/test_*.npy; params.yaml ``model``.
Out: models/mlp.onnx, models/skorch.onnx   one self-contained file each (the contract: docs/use-the-model.md)
     metrics/export.json   per model: onnx_bytes, and the parity it passed: test_images,
                           max_abs_diff_allowed, argmax_agreement

Unless ONNX Runtime's logits are within ``MAX_ABS_DIFF`` of PyTorch's and every argmax
agrees, on all test images, the stage fails and keeps no file. The measured difference
and speed are printed, not recorded: both depend on the CPU, and dvc.lock hashes the file.
"""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import torch

from mnist_dvc.data import IMAGE_SIDE, load_split
from mnist_dvc.onnx_runtime import check_contract, onnx_session
from mnist_dvc.model import TRAINED_BY, configure_torch, load_trained, predict_logits
from mnist_dvc.params import load_section
from mnist_dvc.stage import StageError, atomic_file, parse_paths, run_stage, write_json

MAX_ABS_DIFF = 1e-4
OPSET = 18
TIMING_BATCH = 1000


def to_onnx(model: torch.nn.Module) -> bytes:
    """The model as one self-contained ONNX file: ``images`` (N, 28, 28) -> ``logits`` (N, 10)."""
    example = torch.zeros(2, IMAGE_SIDE, IMAGE_SIDE)
    # The exporter reports its progress on stdout and stderr: keep the stage's output to its results.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=OPSET, input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("N")},), verbose=False)
    proto = program.model_proto
    # Each node records the Python stack that made it, with absolute file
    # paths: the same model exported from another folder would get other bytes.
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        kept = [prop for prop in node.metadata_props if prop.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    # The weights inside the file (the proto, not .save(external_data=...)): one file, nothing beside it.
    return proto.SerializeToString()


def check(name: str, data: bytes, model: torch.nn.Module, images: torch.Tensor) -> dict:
    """Run the ONNX model on ``images`` and compare with PyTorch; raise StageError on a mismatch."""
    session = onnx_session(data)
    check_contract(session, name)  # what predict and serve check when they load the file
    if session.get_outputs()[0].name != "logits":  # and the name the README's snippet reads
        raise StageError(f"{name}: the ONNX model's output is {session.get_outputs()[0].name!r}, not 'logits'")
    expected = predict_logits(model, images, TIMING_BATCH).numpy()
    array = images.numpy()
    got, seconds = [], []
    for start in range(0, len(array), TIMING_BATCH):
        started = time.perf_counter()
        got.append(session.run(["logits"], {"images": array[start:start + TIMING_BATCH]})[0])
        seconds.append(time.perf_counter() - started)
    got = np.concatenate(got)
    max_abs_diff = float(np.abs(got - expected).max())
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    if not (max_abs_diff <= MAX_ABS_DIFF and agreement == 1.0):
        raise StageError(f"{name}: ONNX Runtime and PyTorch disagree on the {len(array)} test images "
                         f"(max abs logit difference {max_abs_diff:.3g}, allowed {MAX_ABS_DIFF:g}; "
                         f"argmax agreement {agreement:.4f}, required 1): no ONNX file was written")
    print(f"{name}: max abs logit difference {max_abs_diff:.2g}, "
          f"{1000 * float(np.median(seconds)) * 1000 / TIMING_BATCH:.2f} ms per 1,000 images in ONNX Runtime")
    return {"onnx_bytes": len(data), "test_images": len(array), "max_abs_diff_allowed": MAX_ABS_DIFF,
            "argmax_agreement": agreement}


def main(argv: list[str] | None = None) -> None:
    args = parse_paths(__doc__, argv, data="data/processed", manual="models/mlp.pt",
                       skorch="models/skorch_params.pt", manual_onnx="models/mlp.onnx",
                       skorch_onnx="models/skorch.onnx", metrics="metrics/export.json")
    model_params = load_section("model")
    configure_torch(1, "cpu", load_section("numerics").cpu)
    # Both loaded, or refused, before the first (slow) export.
    models = {name: load_trained(name, model_params, getattr(args, name)) for name in TRAINED_BY}
    targets = {"manual": args.manual_onnx, "skorch": args.skorch_onnx}
    images, _ = load_split(args.data, "test")
    exports, metrics = {}, {}
    for name, model in models.items():
        target = targets[name]
        exports[target] = to_onnx(model)
        metrics[name] = check(name, exports[target], model, images)
        print(f"{name}: {target} ({len(exports[target]):,} bytes) agrees with PyTorch on {len(images):,} test images")
    # Both checked: only now is anything written.
    for target, data in exports.items():
        with atomic_file(target) as f:
            f.write(data)
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
