"""The ONNX Runtime session both the export stage (its parity check) and ``predict --onnx`` run.

A module of its own, so that the export stage depends on this, not on the
web app's and predict's code: an edit there reruns nothing.
"""

from __future__ import annotations


def onnx_session(model: str | bytes, threads: int = 1):
    """An ONNX Runtime session on the CPU, from a file's path or an ONNX model's bytes."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
