"""predict --onnx and serve --onnx check an ONNX file's inputs and outputs when they load it.

Tiny hand-built ONNX models (Flatten -> MatMul), so no pipeline run is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mnist_dvc.apps.inference import Predictor
from mnist_dvc.stage import StageError


def tiny_onnx(input_name="images", dtype=TensorProto.FLOAT, shape=("N", 28, 28), classes=10, outputs=1) -> bytes:
    """``input_name`` (``shape``, ``dtype``) -> Flatten -> MatMul -> ``outputs`` copies of (N, ``classes``)."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    weights = numpy_helper.from_array(np.full((int(np.prod(shape[1:])), classes), 0.01, np_type), "w")
    names = [f"out{i}" for i in range(outputs)]
    nodes = [helper.make_node("Flatten", [input_name], ["flat"], axis=1)]
    nodes += [helper.make_node("MatMul", ["flat", "w"], [name]) for name in names]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(input_name, dtype, list(shape))],
        [helper.make_tensor_value_info(name, dtype, ["N", classes]) for name in names], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_models(root: Path, manual: bytes, skorch: bytes | None = None) -> None:
    (root / "models").mkdir(exist_ok=True)
    (root / "models/mlp.onnx").write_bytes(manual)
    (root / "models/skorch.onnx").write_bytes(tiny_onnx() if skorch is None else skorch)


def test_a_model_that_follows_the_contract_answers_whatever_its_output_is_named(tmp_path):
    write_models(tmp_path, tiny_onnx())
    answers = Predictor(tmp_path, onnx=True).probabilities(np.zeros((3, 28, 28), np.float32))
    assert {name: p.shape for name, p in answers.items()} == {"manual": (3, 10), "skorch": (3, 10)}
    np.testing.assert_allclose(answers["manual"], 0.1)


CONTRACT_BREAKS = {
    # Before the check: "ValueError: Required inputs (['x']) are missing" or a TypeError, with a traceback.
    "input-named-x": (tiny_onnx(input_name="x"), "x tensor(float) ['N', 28, 28] -> out0 tensor(float) ['N', 10]"),
    "5-classes": (tiny_onnx(classes=5), "-> out0 tensor(float) ['N', 5]"),
    "flat-input": (tiny_onnx(shape=("N", 784)), "images tensor(float) ['N', 784] ->"),
    "27x27": (tiny_onnx(shape=("N", 27, 27)), "images tensor(float) ['N', 27, 27] ->"),
    "double": (tiny_onnx(dtype=TensorProto.DOUBLE), "images tensor(double) ['N', 28, 28] ->"),
    "two-outputs": (tiny_onnx(outputs=2), "-> out0 tensor(float) ['N', 10], out1 tensor(float) ['N', 10]"),
}


@pytest.mark.parametrize("bad", CONTRACT_BREAKS)
def test_a_valid_onnx_model_that_breaks_the_contract_is_one_line_saying_to_rerun_export(tmp_path, bad):
    data, found = CONTRACT_BREAKS[bad]
    write_models(tmp_path, tiny_onnx(), data)
    with pytest.raises(StageError) as info:
        Predictor(tmp_path, onnx=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'models/skorch.onnx'}: the ONNX model maps ")
    assert found in message
    assert message.endswith(", expected images tensor(float) [N, 28, 28] -> one tensor(float) [N, 10] (logits); "
                            "rerun `dvc repro export`")


@pytest.mark.parametrize("data", [b"", b"not an onnx file", tiny_onnx()[:100]], ids=["empty", "garbage", "truncated"])
def test_an_unreadable_onnx_file_is_still_one_line(tmp_path, data):
    write_models(tmp_path, data)
    with pytest.raises(StageError, match=r"mlp\.onnx: not a usable ONNX model \(") as info:
        Predictor(tmp_path, onnx=True)
    assert "\n" not in str(info.value)
