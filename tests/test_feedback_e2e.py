"""End to end: collected corrections versioned with `dvc add` and folded in by `dvc repro`,
on the fixture data in a copy of the reproduced project; and a clone that did not pull them.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import dvc, ran_stages, sh

from mnist_dvc.apps.feedback import FeedbackStore

pytestmark = pytest.mark.e2e
PICTURES = "data/feedback/pictures"
NOT_PULLED = (f"error: {PICTURES}.dvc is committed but its data is not here: run "
              f"`git checkout {PICTURES}.dvc && dvc pull {PICTURES}.dvc`")


def collect_fixture_corrections(repo, count: int = 60) -> None:
    """``count`` of the project's test digits, shifted so they are new pictures, with their labels."""
    from mnist_dvc.data import load_stored_split

    images, labels = load_stored_split(repo / "data/processed", "test")
    store = FeedbackStore(repo / PICTURES)
    for image, label in zip(images[:count], labels[:count]):
        store.add(np.roll(image, 2, axis=1).astype(np.float32) / 255, int(label))


def test_dvc_add_then_repro_trains_on_the_corrections_and_reports_their_accuracy(copy_project):
    repo = copy_project()
    assert not (repo / PICTURES).exists()  # nothing collected
    collect_fixture_corrections(repo)
    # The README's commands.
    dvc("add", PICTURES, cwd=repo)
    sh("git", "add", f"{PICTURES}.dvc", cwd=repo)
    sh("git", "commit", "-q", "-m", "corrections", cwd=repo)
    result = dvc("repro", cwd=repo)
    # tune reads only the training split, which corrections never change: it does not rerun.
    assert ran_stages(result.stdout) == {"feedback", "preprocess", "train", "fit", "evaluate", "export", "plot"}

    data = json.loads((repo / "metrics/data.json").read_text())
    assert data["feedback"]["count"] + data["feedback_train"]["count"] == 60
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    for name in ("manual", "skorch"):
        assert metrics[name]["feedback_count"] == data["feedback"]["count"] > 0
        assert 0 <= metrics[name]["feedback_accuracy"] <= 1
    assert metrics["manual"] == metrics["skorch"]  # still the same weights
    manual = torch.load(repo / "models/mlp.pt", weights_only=True)
    skorch = torch.load(repo / "models/skorch_params.pt", weights_only=True)
    assert all(torch.equal(manual[k], skorch[k]) for k in manual)
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo).stdout)
    assert "feedback_accuracy" in json.dumps(shown) and '"pictures": 60' in json.dumps(shown)
    assert ran_stages(dvc("repro", cwd=repo).stdout) == set()

    # A clone that has the .dvc file but did not pull the data: stopped (by DVC itself), not trained without it.
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", "results with corrections", cwd=repo)
    shutil.rmtree(repo / PICTURES)
    missing = dvc("repro", cwd=repo, check=False)
    assert missing.returncode != 0 and f"missing data 'source': {PICTURES}" in missing.stderr, missing.stderr
    assert sh("git", "status", "--porcelain", cwd=repo).stdout == ""  # the .dvc file untouched

    # Half pulled (a picture missing): the feedback stage stops, with what to do.
    dvc("checkout", f"{PICTURES}.dvc", cwd=repo)
    next((repo / PICTURES).glob("*.png")).unlink()
    partial = dvc("repro", cwd=repo, check=False)
    assert partial.returncode != 0 and NOT_PULLED in partial.stderr, partial.stdout + partial.stderr
    assert (repo / "metrics/feedback.json").exists()  # the last good record kept
    sh("git", "checkout", f"{PICTURES}.dvc", cwd=repo)  # what the message says (dvc checkout: the cache has it)
    dvc("checkout", f"{PICTURES}.dvc", cwd=repo)
    assert ran_stages(dvc("repro", cwd=repo).stdout) == set()
    assert sh("git", "status", "--porcelain", cwd=repo).stdout == ""
