"""The ONNX Runtime session of the export stage and ``predict --onnx``; apart from the apps, so that
an edit there reruns no stage."""

from __future__ import annotations

from mnist_dvc.data import IMAGE_SIDE, N_CLASSES
from mnist_dvc.stage import StageError

# What predict and serve feed and read: float32 images (N, 28, 28) in, one output of (N, 10) logits.
CONTRACT = f"images tensor(float) [N, {IMAGE_SIDE}, {IMAGE_SIDE}] -> one tensor(float) [N, {N_CLASSES}] (logits)"


def onnx_session(model: str | bytes, threads: int = 1):
    """An ONNX Runtime session on the CPU, from a file's path or an ONNX model's bytes."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def check_contract(session, path) -> None:
    """Raise StageError naming ``path`` unless ``session``'s model follows ``CONTRACT``, instead of failing
    on the first picture. A symbolic (dynamic) image side is accepted; the batch dimension is not checked."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    image = inputs[0] if len(inputs) == 1 else None
    logits = outputs[0] if len(outputs) == 1 else None
    if not (image and image.name == "images" and image.type == "tensor(float)" and len(image.shape) == 3
            and all(side == IMAGE_SIDE or not isinstance(side, int) for side in image.shape[1:])
            and logits and logits.type == "tensor(float)" and len(logits.shape) == 2
            and logits.shape[1] == N_CLASSES):
        found = " -> ".join(", ".join(f"{arg.name} {arg.type} {arg.shape}" for arg in args) or "nothing"
                            for args in (inputs, outputs))
        raise StageError(f"{path}: the ONNX model maps {found}, expected {CONTRACT}; rerun `dvc repro export`")
