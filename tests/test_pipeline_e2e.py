"""End to end: the real `dvc` commands on the fixture data, in temporary git repositories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, dvc, ran_stages, sh

REPO_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())

pytestmark = pytest.mark.e2e
ALL_STAGES = {"download", "preprocess", "train", "fit", "evaluate", "export", "plot", "tune"}
# What a change to the models reruns: both trainings and every stage that reads a model.
AFTER_TRAINING = {"train", "fit", "evaluate", "export", "plot"}


def test_repro_from_scratch_runs_every_stage_and_a_second_repro_runs_none(reproduced, copy_project):
    first = (reproduced.parent / "repro-output.txt").read_text()
    assert ran_stages(first) == ALL_STAGES
    metrics = json.loads((reproduced / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"manual", "skorch"}
    for scores in metrics.values():
        assert set(scores) == {"accuracy", "loss", "macro_f1"}
        assert scores["accuracy"] > 0.8  # load_digits is easy; chance is 0.1
    second = dvc("repro", cwd=copy_project())
    assert ran_stages(second.stdout) == set(), second.stdout
    assert "Data and pipelines are up to date" in second.stdout


def test_after_a_real_repro_at_the_defaults_both_trainings_saved_identical_tensors(reproduced):
    # The reproduced project trains at the defaults with all training images
    # (preprocess.val_size: 0), as `make repro` does: the explicit loop and
    # skorch must have saved the very same weights, and scored the same.
    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    assert params["preprocess"]["val_size"] == 0
    assert {k: params[k] for k in ("model", "train")} == {k: REPO_PARAMS[k] for k in ("model", "train")}
    manual = torch.load(reproduced / "models/mlp.pt", weights_only=True)
    skorch = torch.load(reproduced / "models/skorch_params.pt", weights_only=True)
    assert list(manual) == list(skorch)
    for name in manual:
        assert torch.equal(manual[name], skorch[name]), name
    metrics = json.loads((reproduced / "metrics/evaluate.json").read_text())
    assert metrics["manual"] == metrics["skorch"]


# What the README says reruns after each kind of change ("What reruns what").
RERUN_RULES = [
    # train.* (train.lr): test_a_train_param_reruns_exactly_the_trainings_and_what_follows_and_diffs_show_it
    # tune reads model.activation and model.dropout (and part of train): it reruns too.
    ("model.dropout", 0.1, AFTER_TRAINING | {"tune"}),
    ("plot.misclassified", 10, {"plot"}),
    ("tune.cv", 3, {"tune"}),
    ("preprocess.val_size", 100, ALL_STAGES - {"download"}),
]


def set_param(repo: Path, dotted: str, value) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, last = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    assert node[last] != value, f"{dotted} is already {value!r}"
    node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("key, value, expected", RERUN_RULES, ids=[rule[0] for rule in RERUN_RULES])
def test_changing_a_param_reruns_exactly_the_stages_that_read_it(copy_project, key, value, expected):
    repo = copy_project()
    set_param(repo, key, value)
    assert ran_stages(dvc("repro", cwd=repo).stdout) == expected


# The other training options: which stages read them, from `dvc status` (no run
# needed: a stage reruns when a param it reads changed, and what follows a
# training reruns because the model changed, as the real runs above show).
OPTION_READERS = [
    ("train.schedule", "cosine", {"train", "fit"}),
    ("train.warmup", 0.1, {"train", "fit"}),
    ("train.augment", {"shift": 1, "rotate": 5.0}, {"train", "fit"}),
    ("train.weight_decay", 0.01, {"train", "fit", "tune"}),
    ("train.cuda_graph", "off", {"train", "fit"}),
    ("model.hidden", [64], {"train", "fit", "evaluate", "export"}),
]


@pytest.mark.parametrize("key, value, readers", OPTION_READERS, ids=[rule[0] for rule in OPTION_READERS])
def test_dvc_status_shows_exactly_the_stages_that_read_each_option(copy_project, key, value, readers):
    repo = copy_project()
    set_param(repo, key, value)
    status = json.loads(dvc("status", "--json", cwd=repo).stdout)
    assert set(status) == readers, status
    for stage in readers:
        tracked = key if stage == "tune" else key.split(".")[0]  # tune lists keys; the others whole sections
        assert status[stage] == [{"changed deps": {"params.yaml": {tracked: "modified"}}}], status[stage]


def test_editing_a_shared_module_reruns_exactly_the_stages_that_import_it(copy_project):
    repo = copy_project()
    with (repo / "mnist_dvc/figures.py").open("a") as f:
        f.write("# an edit\n")
    assert ran_stages(dvc("repro", cwd=repo).stdout) == {"plot", "tune"}


def test_a_train_param_reruns_exactly_the_trainings_and_what_follows_and_diffs_show_it(copy_project, tmp_path):
    repo = copy_project()
    set_param(repo, "train.lr", 0.003)
    assert ran_stages(dvc("repro", cwd=repo).stdout) == AFTER_TRAINING
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


def test_forced_rerun_of_every_stage_reproduces_every_committed_result_bit_for_bit(copy_project):
    repo = copy_project()
    before = {path: (repo / path).read_text() for path in ("dvc.lock", EXPORT_METRICS)}
    result = dvc("repro", "--force", cwd=repo)
    assert ran_stages(result.stdout) == ALL_STAGES
    # Metrics, plot data, PNGs, ONNX files and dvc.lock (which holds the md5 of
    # the models and data) are all unchanged: same params and seed, same bytes.
    # The one exception is a timing: export's ms_per_1000_images, and so the
    # md5 of metrics/export.json in dvc.lock.
    changed = {line[3:] for line in sh("git", "status", "--porcelain", cwd=repo).stdout.splitlines()}
    assert changed <= {"dvc.lock", EXPORT_METRICS}, changed
    assert without_timing(json.loads((repo / EXPORT_METRICS).read_text())) == without_timing(
        json.loads(before[EXPORT_METRICS]))
    assert lock_without_export_metrics((repo / "dvc.lock").read_text()) == lock_without_export_metrics(
        before["dvc.lock"])


EXPORT_METRICS = "metrics/export.json"


def without_timing(export_metrics: dict) -> dict:
    return {name: {k: v for k, v in entry.items() if k != "ms_per_1000_images"}
            for name, entry in export_metrics.items()}


def lock_without_export_metrics(text: str) -> dict:
    lock = yaml.safe_load(text)
    outs = lock["stages"]["export"]["outs"]
    lock["stages"]["export"]["outs"] = [out for out in outs if out["path"] != EXPORT_METRICS]
    assert len(outs) == 3  # the two ONNX files are still compared
    return lock


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


@pytest.mark.parametrize("stage", ["download", "preprocess", "plot"])
def test_stages_that_need_no_tensors_never_import_torch(copy_project, stage):
    """download, preprocess and plot run their dvc.yaml command and finish without importing torch."""
    repo = copy_project()
    cmd = " ".join(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["cmd"].split())
    assert cmd.startswith("python -m "), cmd
    result = subprocess.run([sys.executable, "-X", "importtime", *cmd.split()[1:]], cwd=repo,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "numpy" in imported  # the import log is really there
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}
    # Nothing changed: the stage wrote the same outputs as the shared run.
    assert sh("git", "status", "--porcelain", cwd=repo).stdout == ""
