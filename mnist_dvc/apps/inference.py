"""Both trained models behind one call: 28x28 inputs in, each model's probabilities out.

Used by the ``predict`` command and the web app. Two back ends, one answer:

- PyTorch (default): ``models/mlp.pt`` (train) and ``models/skorch_params.pt``
  (fit), state_dicts loaded with ``weights_only=True`` into the MLP that
  params.yaml's ``model`` section describes;
- ONNX Runtime (``onnx=True``): ``models/mlp.onnx`` and ``models/skorch.onnx``
  from the export stage. This path never imports torch.

The keys, ``manual`` and ``skorch``, are those of ``metrics/evaluate.json``.
Probabilities are the softmax of the logits, computed in float64 so that
each row sums to 1.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from scipy.special import softmax

from mnist_dvc.data import IMAGE_SIDE
from mnist_dvc.onnx_runtime import check_contract, onnx_session
from mnist_dvc.stage import StageError

MODELS = {
    # name: (state_dict file, ONNX file)
    "manual": ("models/mlp.pt", "models/mlp.onnx"),
    "skorch": ("models/skorch_params.pt", "models/skorch.onnx"),
}
METRICS = Path("metrics/evaluate.json")
GET_MODELS = "run `dvc repro` to train them, or `dvc pull` if a DVC remote holds them"


class Predictor:
    """Loaded models; ``probabilities(images)`` -> {name: float64 (N, 10)}."""

    def __init__(self, root: Path | str = ".", onnx: bool = False, threads: int = 1):
        self.root, self.onnx = Path(root), onnx
        self.files = {name: files[1 if onnx else 0] for name, files in MODELS.items()}  # relative to root
        self.paths = {name: self.root / file for name, file in self.files.items()}
        missing = [str(path) for path in self.paths.values() if not path.is_file()]
        if missing:
            raise StageError(f"{', '.join(missing)}: not found; {GET_MODELS}")
        self._run = {name: (self._onnx_session if onnx else self._torch_model)(name, path, threads)
                     for name, path in self.paths.items()}

    def _torch_model(self, name: str, path: Path, threads: int):
        import torch

        from mnist_dvc.model import load_trained
        from mnist_dvc.params import load_section

        torch.set_num_threads(threads)
        try:
            model = load_trained(name, load_section("model", self.root / "params.yaml"), path)
        except StageError as exc:
            raise StageError(f"{exc}; {GET_MODELS}") from None

        def run(images: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(images)).numpy()
        return run

    def _onnx_session(self, name: str, path: Path, threads: int):
        try:
            session = onnx_session(str(path), threads)
        except Exception as exc:  # onnxruntime raises its own exception types for a bad file
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StageError(f"{path}: not a usable ONNX model ({reason}); {GET_MODELS}") from None
        check_contract(session, path)
        return lambda images: session.run(None, {"images": images})[0]

    def probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (N, 28, 28) in [0, 1], white on black -> {name: softmax probabilities (N, 10)}."""
        images = np.ascontiguousarray(images, dtype=np.float32).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
        # float64, so that each row sums to 1 to ~1e-15 (scipy is loaded anyway: images.py uses it)
        return {name: softmax(np.asarray(run(images), dtype=np.float64), axis=1) for name, run in self._run.items()}

    def file_hashes(self) -> dict[str, str]:
        """sha256 of each loaded model file, to say exactly which models answer."""
        return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in self.paths.items()}

    def test_accuracy(self) -> dict[str, float | None]:
        """Each model's test accuracy from metrics/evaluate.json, None where unknown."""
        try:
            metrics = json.loads((self.root / METRICS).read_text())
        except (OSError, ValueError):
            metrics = {}
        return {name: (metrics.get(name) or {}).get("accuracy") for name in MODELS}


def describe(probabilities: np.ndarray) -> dict:
    """One model's answer for one image: ``{"digit": int, "probabilities": [10 floats]}``."""
    return {"digit": int(np.argmax(probabilities)), "probabilities": [float(p) for p in probabilities]}
