"""Fixtures the tests make themselves: a tiny, learnable MNIST and project copies.

The tiny MNIST is scikit-learn's bundled ``load_digits`` (1,797 real
handwritten digits, 8x8), drawn the way MNIST's digits were (20 px box,
centred by centre of mass in 28x28) and written as the four gzipped IDX files, so every stage runs on real-looking data in a second or two and
no test needs the network or ../shared.

``make test`` runs the suite in parallel (pytest-xdist, one worker per core).
The fixture mirror and the reproduced project are built once per run, by the
first worker that needs them, under a file lock; tests that change the
project work on their own copy.

Plain helpers (no fixtures) are in ``helpers.py``; the S3 server's fixtures
are the ``s3server`` plugin.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mnist_dvc import numerics

# Before any test module imports torch: stages run in-process compute with the
# kernels `python -m stages.<name>` pins (mnist_dvc/numerics.py), and the test
# processes' children (dvc, servers) inherit them.
numerics.pin(numerics.DEFAULT)

from helpers import (REPRODUCED_OVERRIDES, chromium, dvc, make_project, md5_of, missing_browser, sh, shared_once,
                     write_mirror, write_params)
from mnist_dvc.data import RAW_FILES

pytest_plugins = ["s3server"]


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


@pytest.fixture
def workdir(tmp_path, mirror, monkeypatch) -> Path:
    """A folder with a fast params.yaml pointing at the file:// fixture mirror; the cwd."""
    folder, md5 = mirror
    write_params(tmp_path, folder.as_uri() + "/", md5)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def prepared(workdir) -> Path:
    """``workdir`` after the download and preprocess stages (run in-process): data/processed exists."""
    from stages import download, preprocess

    download.main([])
    preprocess.main([])
    return workdir


# --- end-to-end: real git and dvc commands in a temporary repository ------------

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


@pytest.fixture(scope="session")
def experiments(tmp_path_factory, reproduced) -> Path:
    """A copy of ``reproduced`` with two DVC experiments, made once per test run and shared: read it only.

    exp-a sets train.lr=0.003; exp-b sets model.hidden=[64] and a validation split
    (preprocess.val_size=200, so it has validation curves), from HEAD's params. The
    workspace holds exp-b's results. What each `dvc exp run` printed is in
    exp-a-output.txt and exp-b-output.txt beside the repository.
    """
    def build(folder: Path) -> None:
        repo = folder / "repo"
        shutil.copytree(reproduced, repo, symlinks=True)
        run = dvc("exp", "run", "-n", "exp-a", "-S", "train.lr=0.003", cwd=repo)
        folder.joinpath("exp-a-output.txt").write_text(run.stdout)
        sh("git", "checkout", "HEAD", "--", "params.yaml", cwd=repo)  # exp-b starts from HEAD's params
        run = dvc("exp", "run", "-n", "exp-b", "-S", "model.hidden=[64]", "-S", "preprocess.val_size=200", cwd=repo)
        folder.joinpath("exp-b-output.txt").write_text(run.stdout)

    return shared_once(tmp_path_factory, "experiments", build) / "repo"


@pytest.fixture
def offline_browser(tmp_path):
    """Headless Chromium that reaches no host: a page shows only what it carries."""
    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    driver = chromium(tmp_path, offline=True)
    yield driver
    driver.quit()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(items):
    """The readers of the shared ``experiments`` project are one xdist group: ``make test``
    (``--dist loadgroup``) sends them to one worker, which builds it, and no other waits on its lock.

    The other tests go in file order to whichever worker is free: the first
    that needs ``reproduced`` starts its build, while the other workers run
    the independent tests that follow. The group keeps the place of its first
    test (``--no-loadscope-reorder``) instead of going first, where its worker
    would build ``reproduced`` while the next worker to need it waited.
    (pyproject.toml keeps pytest below 9.2, under which xdist ignores groups.)
    """
    for item in items:
        if "experiments" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("experiments"))
