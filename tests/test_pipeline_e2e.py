"""End to end: the real `dvc` commands on the fixture data, in temporary git repositories."""

from __future__ import annotations

import json

import pytest

from conftest import dvc, ran_stages, sh

pytestmark = pytest.mark.e2e
ALL_STAGES = {"download", "preprocess", "train", "fit", "evaluate", "plot", "tune"}


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


def test_changing_a_train_param_reruns_both_trainings_and_what_follows_only(copy_project):
    repo = copy_project()
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("lr: 0.001", "lr: 0.002", 1))
    ran = ran_stages(dvc("repro", cwd=repo).stdout)
    assert {"train", "fit", "evaluate", "plot"} <= ran
    assert not ran & {"download", "preprocess"}


def test_changing_a_plot_option_reruns_only_plot(copy_project):
    repo = copy_project()
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("misclassified: 25", "misclassified: 10", 1))
    assert ran_stages(dvc("repro", cwd=repo).stdout) == {"plot"}


def test_metrics_params_and_plots_diff_across_two_commits(copy_project, tmp_path):
    repo = copy_project()
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("lr: 0.001", "lr: 0.003", 1))
    dvc("repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", "lr 0.003", cwd=repo)

    metrics = json.loads(dvc("metrics", "diff", "HEAD~1", "--json", cwd=repo).stdout)
    changed = metrics["metrics/evaluate.json"]
    assert {"manual.accuracy", "skorch.accuracy", "manual.loss", "skorch.macro_f1"} <= set(changed)
    assert changed["manual.loss"]["old"] != changed["manual.loss"]["new"]

    params_diff = json.loads(dvc("params", "diff", "HEAD~1", "--json", cwd=repo).stdout)
    lr = params_diff["params.yaml"]["train.lr"]
    assert (lr["old"], lr["new"]) == (0.001, 0.003)

    out = tmp_path / "plots-diff"
    dvc("plots", "diff", "HEAD~1", "-o", str(out), cwd=repo)
    html = (out / "index.html").read_text()
    assert "Training loss per epoch" in html and "Confusion matrix" in html
    assert list(out.rglob("*.png")), "the PNG plots of both revisions are in the report"


def test_exp_run_with_set_param_is_listed_by_exp_show_with_its_metrics(copy_project):
    repo = copy_project()
    result = dvc("exp", "run", "-S", "train.lr=0.005", "-n", "lr-0.005", cwd=repo)
    ran = ran_stages(result.stdout)
    assert {"train", "fit", "evaluate", "plot"} <= ran
    assert not ran & {"download", "preprocess"}
    rows = json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)
    experiments = [
        exp for row in rows for exp_range in (row.get("experiments") or []) for exp in exp_range["revs"]
    ]
    named = [exp for exp in experiments if exp.get("name") == "lr-0.005"]
    assert named, experiments
    data = named[0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == 0.005
    evaluation = data["metrics"]["metrics/evaluate.json"]["data"]
    assert 0 < evaluation["manual"]["accuracy"] <= 1 and 0 < evaluation["skorch"]["accuracy"] <= 1


def test_forced_rerun_of_every_stage_reproduces_every_committed_result_bit_for_bit(copy_project):
    repo = copy_project()
    result = dvc("repro", "--force", cwd=repo)
    assert ran_stages(result.stdout) == ALL_STAGES
    # Metrics, plot data, PNGs and dvc.lock (which holds the md5 of the models
    # and data) are all unchanged: same params and seed, same bytes.
    assert sh("git", "status", "--porcelain", cwd=repo).stdout == ""


def test_bad_values_set_through_exp_run_fail_with_the_key_and_what_is_allowed(copy_project):
    repo = copy_project()
    cases = {
        "train.lr=-1": "train.lr = -1: Input should be greater than 0",
        "train.optimizer=adagrad": "train.optimizer = 'adagrad': Input should be 'adam', 'adamw' or 'sgd'",
        "model.hidden=[]": "model.hidden = []: List should have at least 1 item",
    }
    for setting, message in cases.items():
        result = dvc("exp", "run", "-S", setting, cwd=repo, check=False)
        assert result.returncode != 0, setting
        output = result.stdout + result.stderr
        assert f"error: params.yaml: {message}" in output, output
        assert "Traceback" not in output
        sh("git", "checkout", "--", "params.yaml", cwd=repo)
