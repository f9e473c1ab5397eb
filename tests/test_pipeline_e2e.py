"""End to end: the real `dvc` commands on the fixture data, in temporary git repositories."""

from __future__ import annotations

import json

import pytest

from conftest import dvc, ran_stages, sh

pytestmark = pytest.mark.e2e
ALL_STAGES = {"download", "preprocess", "train", "fit", "evaluate", "plot"}


def test_repro_from_scratch_runs_every_stage_and_a_second_repro_runs_none(reproduced):
    first = (reproduced.parent / "repro-output.txt").read_text()
    assert ran_stages(first) >= ALL_STAGES
    metrics = json.loads((reproduced / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"manual", "skorch"}
    for scores in metrics.values():
        assert set(scores) == {"accuracy", "loss", "macro_f1"}
        assert scores["accuracy"] > 0.8  # load_digits is easy; chance is 0.1
    second = dvc("repro", cwd=reproduced)
    assert ran_stages(second.stdout) == set(), second.stdout
    assert "is up to date" in second.stdout or "Data and pipelines are up to date" in second.stdout
