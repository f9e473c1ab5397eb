"""The tutorial notebook (notebooks/mlp_tutorial.ipynb) runs top to bottom on the tiny fixture MNIST.

nbclient executes it in a fresh kernel against the ``reproduced`` project
(conftest.py): any cell that raises fails the test. Only the figures that hold
on any data are checked here; CI checks the real-data ones (.ci/run).
"""

from __future__ import annotations

import nbformat
import pytest

from notebooks.run_tutorial import NOTEBOOK, compare, execute, key_figures, missing_data


@pytest.mark.e2e
def test_tutorial_runs_without_an_error_and_shows_the_lesson(reproduced):
    executed = execute(nbformat.read(NOTEBOOK, as_version=4), reproduced)
    figures = key_figures(executed)
    assert figures["parameters_784_128_64_10"] == 109_386
    # skorch's default NLLLoss takes the log of raw logits: nan on any data.
    assert figures["skorch_nllloss_train_loss"] == "nan"
    # The train stage's code, run in the notebook, gives the project's metrics/evaluate.json exactly.
    assert figures["train_stage_matches_metrics"] is True


def test_stale_or_broken_key_figures_are_reported():
    committed = {"parameters_784_128_64_10": 109_386, "skorch_nllloss_train_loss": "nan",
                 "skorch_crossentropy_test_accuracy": 0.9746, "train_stage_matches_metrics": True,
                 "cpu_capability": "AVX2"}
    assert compare(committed, dict(committed)) == []
    moved = {**committed, "skorch_crossentropy_test_accuracy": 0.9747}
    assert compare(committed, moved) == ["skorch_crossentropy_test_accuracy: committed 0.9746, now 0.9747"]
    # On another kind of CPU an accuracy may move in its last digits, but no further.
    assert compare(committed, {**moved, "cpu_capability": "AVX512"}) == []
    far = {**committed, "skorch_crossentropy_test_accuracy": 0.9600, "cpu_capability": "AVX512"}
    assert compare(committed, far) == [
        "skorch_crossentropy_test_accuracy: committed 0.9746, now 0.96",
        "skorch_crossentropy_test_accuracy: 0.96 is not what the tutorial promises",
    ]


def test_missing_data_says_to_run_the_pipeline_first(tmp_path):
    assert "run `make repro` (or `dvc pull`)" in missing_data(tmp_path)
