"""The schema of params.yaml, one pydantic model per section, and its loader ``load_section``.

A wrong value, or an unknown key (a typo), ends the stage with one line that
names the full key, the bad value and what is allowed, e.g.
``params.yaml: train.lr = -0.1: Input should be greater than 0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from ruamel.yaml import YAML, YAMLError

from mnist_dvc.stage import StageError

PARAMS_FILE = Path("params.yaml")
MNIST_TRAIN_SIZE = 60_000
MD5 = Field(pattern=r"^[0-9a-f]{32}$")
# Constrained types shared by several keys: pydantic checks each item and
# names it in the error (``tune.grid.lr[1] = -0.1: Input should be greater than 0``).
# At most 65,536 units a layer: 784 x 65,536 floats is already 200 MB of weights.
LayerSize = Annotated[int, Field(ge=1, le=65_536)]
# NumPy's and scikit-learn's seed range (torch takes up to 2**64 - 1, offsets included).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
LearningRate = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]
Hidden = Annotated[list[LayerSize], Field(min_length=1)]
Epochs = Annotated[int, Field(ge=1, le=1000)]


class Section(BaseModel):
    # strict: a YAML string "0.1" or a bool is not silently taken as a number.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Md5Sums(Section):
    train_images: str = MD5
    train_labels: str = MD5
    test_images: str = MD5
    test_labels: str = MD5


class DownloadParams(Section):
    mirrors: list[str] = Field(min_length=1)
    md5: Md5Sums
    retries: int = Field(ge=1, le=20)
    timeout: float = Field(gt=0, le=600)
    backoff: float = Field(ge=0, le=60)

    @field_validator("mirrors")
    @classmethod
    def _urls(cls, mirrors: list[str]) -> list[str]:
        for url in mirrors:
            parsed = urlparse(url)
            # http(s) needs a host; file:///folder/ has none, only a path.
            where = parsed.path if parsed.scheme == "file" else parsed.netloc
            if parsed.scheme not in ("http", "https", "file") or not where:
                raise ValueError(f"{url!r} is not an http://, https:// or file:// URL")
        return mirrors


class FeedbackParams(Section):
    # How the corrected pictures in data/feedback/pictures join the data (stages/preprocess.py).
    repeat: int = Field(ge=1, le=1000)  # copies of each training picture in the feedback_train split
    holdout: float = Field(ge=0, lt=1)  # the fraction, chosen by content hash, kept as the feedback test split


class PreprocessParams(Section):
    # A fraction of the 60,000 training images in [0, 1), or a count below 60,000.
    val_size: float | int = Field(ge=0)
    seed: Seed
    feedback: FeedbackParams

    @field_validator("val_size")
    @classmethod
    def _fraction_or_count(cls, v: float | int) -> float | int:
        if isinstance(v, float) and not v < 1:
            raise ValueError("a fraction must be in [0, 1); use an integer for a count")
        if isinstance(v, int) and v >= MNIST_TRAIN_SIZE:
            raise ValueError(f"a count must be below {MNIST_TRAIN_SIZE}")
        return v


class NumericsParams(Section):
    # mnist_dvc/numerics.py: "portable" pins kernels that give the same bits on every x86-64 CPU.
    cpu: Literal["portable", "native"]


class ModelParams(Section):
    hidden: Hidden
    activation: Literal["relu", "tanh", "gelu", "sigmoid"]
    dropout: float = Field(ge=0, lt=1)


class AugmentParams(Section):
    shift: int = Field(ge=0, le=8)  # pixels, each direction
    rotate: float = Field(ge=0, le=45)  # degrees, either way


class TrainFeedbackParams(Section):
    # The trainings' last epochs, on the feedback_train split (corrections and MNIST replay).
    epochs: int = Field(ge=0, le=100)  # 0: never learn from the corrections
    lr_scale: float = Field(gt=0, le=10)  # the learning rate of those epochs: train.lr times this


class TrainParams(Section):
    epochs: Epochs
    batch_size: int = Field(ge=1)
    lr: LearningRate
    optimizer: Literal["adam", "adamw", "sgd"]
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0, le=1)
    schedule: Literal["constant", "onecycle", "cosine"]
    warmup: float = Field(ge=0, lt=1)  # a fraction of all steps
    augment: AugmentParams
    feedback: TrainFeedbackParams
    seed: Seed
    threads: int = Field(ge=1, le=256)
    device: Literal["auto", "cpu", "cuda"]
    # The explicit loop's step captured as a CUDA graph (mnist_dvc/cuda_graph.py):
    # "auto" where the device and settings allow, "on" always (an error where
    # they do not), "off" never.
    cuda_graph: Literal["auto", "on", "off"]

    @field_validator("warmup")
    @classmethod
    def _onecycle_warms_up(cls, warmup: float, info: ValidationInfo) -> float:
        if info.data.get("schedule") == "onecycle" and warmup == 0:
            raise ValueError("the onecycle schedule needs a warm-up fraction above 0 (its rising phase, e.g. 0.3)")
        return warmup


class EvaluateParams(Section):
    batch_size: int = Field(ge=1)


class PlotParams(Section):
    dpi: int = Field(ge=30, le=600)
    misclassified: int = Field(ge=1, le=100)


class TuneGrid(Section):
    # The bounds of model.hidden, train.lr and train.epochs, item by item.
    lr: list[LearningRate] = Field(min_length=1)
    hidden: list[Hidden] = Field(min_length=1)
    max_epochs: list[Epochs] = Field(min_length=1)


class TuneParams(Section):
    subset_size: int = Field(ge=100, le=MNIST_TRAIN_SIZE)
    cv: int = Field(ge=2, le=10)
    n_jobs: int = Field(ge=1, le=64)
    batch_size: int = Field(ge=1)
    seed: Seed
    grid: TuneGrid


class PromoteParams(Section):
    # The promotion gate (mnist_dvc/apps/promote.py, docs/registry.md): how far each model's MNIST
    # test accuracy may fall from the version in the stage. 0.003 is the seed-to-seed spread.
    max_drop: float = Field(ge=0, le=1)


SECTIONS: dict[str, type[Section]] = {
    "download": DownloadParams,
    "preprocess": PreprocessParams,
    "numerics": NumericsParams,
    "model": ModelParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "plot": PlotParams,
    "tune": TuneParams,
    "promote": PromoteParams,
}


def _key_and_parent(section: str, loc: tuple, model: type[Section]) -> tuple[str, type[Section]]:
    """A pydantic error location as ``train.lr`` / ``model.hidden[1]`` (union tags such as ``float`` dropped),
    and the innermost section model, to list its keys."""
    key, parent = section, model
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif parent is not None and part in parent.model_fields:
            key += f".{part}"
            annotation = parent.model_fields[part].annotation
            parent = annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None
    return key, parent


def _error_line(section: str, error: dict, model: type[Section]) -> str:
    """One readable line for one pydantic error: full key, bad value, what is allowed."""
    if error["type"] == "extra_forbidden":
        key, parent = _key_and_parent(section, error["loc"][:-1], model)
        allowed = ", ".join(parent.model_fields)
        return f"{key}.{error['loc'][-1]}: unknown key (allowed keys: {allowed})"
    key, _ = _key_and_parent(section, error["loc"], model)
    if error["type"] == "missing":
        return f"{key}: missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key} = {error['input']!r}: {message}"


def load_section(section: str, path: Path | str = PARAMS_FILE) -> Section:
    """Read ``params.yaml`` and return its ``section`` validated, or raise StageError."""
    path = Path(path)
    try:
        # YAML 1.2, as DVC reads params.yaml: `lr: 1e-3` is a number, `yes` a string.
        document = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path} not found: run the stage from the repository root") from None
    except IsADirectoryError:
        raise StageError(f"{path} is a directory, not a file: put the YAML params file there") from None
    except OSError as exc:
        raise StageError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise StageError(f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start}): save it as UTF-8") from None
    except YAMLError as exc:
        raise StageError(f"{path} is not valid YAML: {exc}".replace("\n", " ")) from None
    except ValueError as exc:  # a value YAML cannot convert, e.g. an integer of over 4,300 digits
        raise StageError(f"{path}: a value cannot be read: {str(exc).split(';')[0]}") from None
    if not isinstance(document, dict) or section not in document:
        raise StageError(f"{path}: section '{section}' is missing")
    model = SECTIONS[section]
    try:
        return model.model_validate(document[section])
    except ValidationError as exc:
        lines = dict.fromkeys(_error_line(section, err, model) for err in exc.errors())
        raise StageError(f"{path}: " + "; ".join(lines)) from None
