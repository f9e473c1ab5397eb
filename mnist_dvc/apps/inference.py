"""Both trained models behind one call: 28x28 inputs in, each model's probabilities out.

Used by ``predict`` and the web app. PyTorch (default) loads the state_dicts
with ``weights_only=True`` into the MLP that params.yaml describes; ONNX
Runtime (``onnx=True``) runs the export stage's files and never imports torch.
``load_release``/``load_stage`` load a registry version's models instead,
fetched by DVC at its commit and checked against its sha256 (docs/registry.md).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import softmax

from mnist_dvc.apps.registry import (ARTIFACTS, Release, RegistryError, fetch_release, one_line, release_in_stage,
                                     sha256_of)
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

    def __init__(self, root: Path | str = ".", onnx: bool = False):
        self.root, self.onnx = Path(root), onnx
        self.files = {name: files[1 if onnx else 0] for name, files in MODELS.items()}  # relative to root
        paths = {name: self.root / file for name, file in self.files.items()}
        missing = [str(path) for path in paths.values() if not path.is_file()]
        if missing:
            raise StageError(f"{', '.join(missing)}: not found; {GET_MODELS}")
        self._run = {name: (self._onnx_session if onnx else self._torch_model)(name, path)
                     for name, path in paths.items()}

    def _torch_model(self, name: str, path: Path):
        import torch

        from mnist_dvc.model import load_trained
        from mnist_dvc.params import load_section

        torch.set_num_threads(1)
        try:
            model = load_trained(name, load_section("model", self.root / "params.yaml"), path)
        except StageError as exc:
            raise StageError(f"{exc}; {GET_MODELS}") from None

        def run(images: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(images)).numpy()
        return run

    def _onnx_session(self, name: str, path: Path):
        try:
            session = onnx_session(str(path))
        except Exception as exc:  # onnxruntime raises its own exception types for a bad file
            raise StageError(f"{path}: not a usable ONNX model ({one_line(exc)}); {GET_MODELS}") from None
        check_contract(session, path)
        return lambda images: session.run(None, {"images": images})[0]

    def probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (N, 28, 28) in [0, 1], white on black -> {name: softmax probabilities (N, 10)}."""
        images = np.ascontiguousarray(images, dtype=np.float32).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
        # float64, so that each row sums to 1 to ~1e-15 (scipy is loaded anyway: images.py uses it)
        return {name: softmax(np.asarray(run(images), dtype=np.float64), axis=1) for name, run in self._run.items()}

    def test_accuracy(self) -> dict[str, float | None]:
        """Each model's test accuracy from metrics/evaluate.json, None where unknown."""
        try:
            metrics = json.loads((self.root / METRICS).read_text())
        except (OSError, ValueError):
            metrics = {}
        return {name: (metrics.get(name) or {}).get("accuracy") for name in MODELS}


def answer_of(probabilities: np.ndarray) -> dict:
    """One model's answer for one image: ``{"digit": int, "probabilities": [10 floats]}``."""
    return {"digit": int(np.argmax(probabilities)), "probabilities": probabilities.tolist()}


@dataclass(frozen=True)
class Served:
    """Loaded models and what to say about them (``/api/health``, ``/api/model``).

    A registry version's, or the workspace's, which has no release and no stage.
    """

    release: Release | None
    stage: str | None
    predictor: Predictor
    sha256: dict[str, str | None]  # each of the four artifacts' files, by path; None where there is none
    accuracy: dict[str, float | None]


def load_release(root: Path | str, release: Release, stage: str, onnx: bool = False) -> Served:
    """The models of a registry version, fetched by DVC at its commit (cache, else remote). Raises StageError.

    The files, in a temporary folder until they are loaded, must have the
    sha256 the version's registration recorded.
    """
    with tempfile.TemporaryDirectory(prefix="mnist-dvc-release-") as tmp:
        try:
            fetch_release(Path(root), release.commit, Path(tmp))
        except RegistryError as exc:
            raise StageError(str(exc)) from None
        sha256 = {path: sha256_of(Path(tmp) / path) for path in ARTIFACTS.values()}
        wrong = [path for path, digest in release.sha256.items() if sha256.get(path, digest) != digest]
        if wrong:
            raise StageError(f"{', '.join(wrong)}: sha256 differs from the one recorded at registration")
        predictor = Predictor(tmp, onnx=onnx)
        accuracy = predictor.test_accuracy()
    return Served(release, stage, predictor, sha256, accuracy)


def load_stage(root: Path | str, stage: str, onnx: bool = False) -> Served:
    """The models of the version a GTO stage names (``predict --stage``). Raises StageError."""
    try:
        release = release_in_stage(Path(root), stage)
    except RegistryError as exc:
        raise StageError(str(exc)) from None
    if release is None:
        raise StageError(f"no version is in stage {stage!r} of {root}: promote one first "
                         "(python -m mnist_dvc.apps.promote REV, docs/registry.md)")
    try:
        return load_release(root, release, stage, onnx=onnx)
    except StageError as exc:
        raise StageError(f"{release.version} ({release.commit[:7]}): {exc}") from None
