"""Fixtures the tests make themselves: a tiny, learnable MNIST and project copies.

The tiny MNIST is scikit-learn's bundled ``load_digits`` (1,797 real
handwritten digits, 8x8), drawn the way MNIST's digits were (20 px box,
centred by centre of mass in 28x28) and written as the four gzipped IDX files, so every stage runs on real-looking data in a second or two and
no test needs the network or ../shared.

``make test`` runs the suite in parallel (pytest-xdist, one worker per core).
The fixture mirror and the reproduced project are built once per run, by the
first worker that needs them, under a file lock; tests that change the
project work on their own copy.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock

from mnist_dvc.data import RAW_FILES

REPO = Path(__file__).resolve().parent.parent
N_TRAIN = 1500  # of load_digits' 1,797; the other 297 are the test set
# What a project copy needs to run the pipeline: tracked sources, no data.
PROJECT_FILES = ["stages", "mnist_dvc", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore",
                 ".dvcignore", ".gitignore"]
# Small settings so a whole pipeline runs in seconds on the fixture data.
FAST_PARAMS = {
    "download.retries": 2,
    "download.timeout": 5.0,
    "download.backoff": 0.01,
    "preprocess.val_size": 200,
    "train.epochs": 2,
    "tune.subset_size": 300,
    "tune.cv": 2,
    "tune.grid.lr": [0.001, 0.01],
    "tune.grid.hidden": [[32]],
    "tune.grid.max_epochs": [2],
}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8, 1-D labels or N x H x W images) as a gzipped IDX file."""
    magic = 0x800 + array.ndim
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def mnist_style(digit: np.ndarray) -> np.ndarray:
    """One small digit (floats, ink > 0) drawn the way MNIST's were: the ink's longer side
    scaled to 20 px (aspect ratio kept, smooth), centred by centre of mass in 28x28."""
    from PIL import Image
    from scipy import ndimage

    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    ink = digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    height, width = ink.shape
    scale = 20 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(ink, mode="F").resize(size, Image.BILINEAR)).clip(0, None)
    out = np.zeros((28, 28), np.float32)
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    out[top:top + size[1], left:left + size[0]] = small
    dy, dx = np.round(np.array([14.0, 14.0]) - ndimage.center_of_mass(out)).astype(int)
    out = np.roll(out, (dy, dx), axis=(0, 1))
    return out / out.max()


def tiny_mnist_arrays() -> dict[str, np.ndarray]:
    """load_digits (1,797 handwritten 8x8 digits) drawn like MNIST: 28x28 uint8 images, 0..9 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([mnist_style(d) for d in digits.images])
    images = np.round(images * 255).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    return {
        "train_images": images[:N_TRAIN],
        "train_labels": labels[:N_TRAIN],
        "test_images": images[N_TRAIN:],
        "test_labels": labels[N_TRAIN:],
    }


def write_mirror(folder: Path, arrays: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """Write the four gzipped IDX files into ``folder``; return their md5s by params key."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = arrays if arrays is not None else tiny_mnist_arrays()
    for key, name in RAW_FILES.items():
        write_idx(folder / name, arrays[key])
    return {key: md5_of(folder / name) for key, name in RAW_FILES.items()}


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run once per test run, whichever xdist worker asks first; the folder.

    Under pytest-xdist every worker has its own basetemp below one shared
    parent: the folder lives in that parent, and a lock makes the others wait
    for the first build instead of repeating it.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (root / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """In-process training uses one torch thread, as every stage does (``train.threads: 1``):
    two xdist workers on two cores must not each start a pool of two threads."""
    from mnist_dvc.model import configure_torch

    configure_torch(1)


@pytest.fixture(scope="session")
def mirror(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder holding the tiny MNIST as the four official file names, and their md5s."""
    folder = shared_once(tmp_path_factory, "mirror", write_mirror)
    return folder, {key: md5_of(folder / name) for key, name in RAW_FILES.items()}


def set_key(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[last] = value


def sections_with(changes: dict, path: Path | str = "params.yaml"):
    """The model and train sections of ``path`` (default: the cwd's params.yaml) with ``changes``
    applied, e.g. ``{"train": {"schedule": "cosine", "augment": {"shift": 2}}}``."""
    from mnist_dvc.params import load_section

    sections = {name: load_section(name, path) for name in ("model", "train")}
    for name, update in changes.items():
        update = dict(update)
        if "augment" in update:
            update["augment"] = sections[name].augment.model_copy(update=update["augment"])
        sections[name] = sections[name].model_copy(update=update)
    return sections["model"], sections["train"]


def write_params(folder: Path, mirror_url: str, md5: dict[str, str], **overrides) -> Path:
    """The project's params.yaml, pointed at ``mirror_url`` with FAST_PARAMS and ``overrides``.

    Override keys use ``__`` for dots: ``train__lr=0.01``.
    """
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["download"]["mirrors"] = [mirror_url]
    params["download"]["md5"] = dict(md5)
    for key, value in {**FAST_PARAMS, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        set_key(params, key, value)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def workdir(tmp_path, mirror, monkeypatch) -> Path:
    """A folder with a fast params.yaml pointing at the file:// fixture mirror; the cwd."""
    folder, md5 = mirror
    write_params(tmp_path, folder.as_uri() + "/", md5)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def stage_command(name: str) -> list[str]:
    """The command dvc.yaml runs for a stage, ``python -m stages.<name>``."""
    return [sys.executable, "-m", f"stages.{name}"]


def stage_env() -> dict[str, str]:
    """DVC runs stages from the repository root; elsewhere, put this checkout on the path."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_stage_script(name: str, *args: str, cwd: Path, check: bool = True, **kwargs):
    """Run the stage ``name`` of this checkout as DVC would, with ``cwd`` as the project folder."""
    result = subprocess.run(
        [*stage_command(name), *args], cwd=cwd, env=stage_env(), capture_output=True, text=True, **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"stage {name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def prepared(workdir) -> Path:
    """``workdir`` after the download and preprocess stages (run in-process): data/processed exists."""
    from stages import download, preprocess

    download.main([])
    preprocess.main([])
    return workdir


# --- end-to-end: real git and dvc commands in a temporary repository ------------

def tool_env() -> dict[str, str]:
    """The environment for git/dvc: this venv's bin first, so dvc.yaml's `python` is ours."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid",
               DVC_NO_ANALYTICS="1", PYTHONPATH="")
    return env


DVC = str(Path(sys.executable).parent / "dvc")  # this venv's dvc


def sh(*cmd, cwd: Path, check: bool = True, timeout: float = 600,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command (git, dvc) in ``cwd`` with ``env`` (default: ``tool_env()``); on failure show its output."""
    cmd = [str(part) for part in cmd]
    result = subprocess.run(cmd, cwd=cwd, env=tool_env() if env is None else env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def dvc(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return sh(DVC, *args, cwd=cwd, **kwargs)


def make_project(dest: Path, mirror: tuple[Path, dict[str, str]], **overrides) -> Path:
    """A git repository with the project's sources and a fast params.yaml, committed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    folder, md5 = mirror
    write_params(dest, folder.as_uri() + "/", md5, **overrides)
    sh("git", "init", "-q", "-b", "main", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-q", "-m", "project", cwd=dest)
    return dest


def ran_stages(output: str) -> set[str]:
    """Stage names that `dvc repro` / `dvc exp run` says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


# The reproduced project trains at the defaults (5 epochs, batch 64, the
# tutorial's MLP) on all training images, like `make repro`: no validation split.
REPRODUCED_OVERRIDES = {"preprocess__val_size": 0, "train__epochs": 5}


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, mirror) -> Path:
    """A project repository after one full `dvc repro` and a commit of its results.

    Built once per test run and shared by every worker: tests that change it
    copy it first (``copy_project``).
    """
    def build(folder: Path) -> None:
        repo = make_project(folder / "repo", mirror, **REPRODUCED_OVERRIDES)
        result = dvc("repro", cwd=repo)
        folder.joinpath("repro-output.txt").write_text(result.stdout)
        sh("git", "add", "-A", cwd=repo)
        sh("git", "commit", "-q", "-m", "results", cwd=repo)

    return shared_once(tmp_path_factory, "reproduced", build) / "repo"


@pytest.fixture
def copy_project(tmp_path, reproduced):
    """A fresh copy of the ``reproduced`` repository (with its DVC cache) to change."""
    def _copy() -> Path:
        dest = tmp_path / "repo"
        shutil.copytree(reproduced, dest, symlinks=True)
        return dest
    return _copy


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, start the shared `dvc repro` (the ``reproduced`` fixture) first.

    One test that needs it goes first, so that one worker builds it while
    the others run the tests that do not; the rest of the tests that need it
    go last, when it is ready, instead of making a worker wait for it.
    """
    needs = [item for item in items if "reproduced" in getattr(item, "fixturenames", ())]
    if needs:
        others = [item for item in items if item not in needs]
        items[:] = needs[:1] + others + needs[1:]
