"""End to end: the real `dvc` commands on the fixture data, in temporary git repositories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, committed_params, dvc, edit_params, ran_stages, sh, tool_env

REPO_PARAMS = committed_params()

pytestmark = pytest.mark.e2e
ALL_STAGES = {"download", "feedback", "preprocess", "train", "fit", "evaluate", "export", "plot", "tune"}
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
    assert "Stage 'preprocess' didn't change, skipping" in second.stdout


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


def set_param(repo: Path, dotted: str, value) -> None:
    before = edit_params(repo / "params.yaml", {dotted: value})
    assert before[dotted] != value, f"{dotted} is already {value!r}"


def output_paths(stage: dict) -> set[str]:
    """The paths a dvc.yaml stage writes: its outs, metrics and plots."""
    return {out if isinstance(out, str) else next(iter(out))
            for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])}


def and_what_follows(stages: set[str], pipeline: dict) -> set[str]:
    """``stages`` and every stage that reads, directly or not, what one of them writes: what
    `dvc repro` reruns after them (a dep is an output, or a file in an output folder)."""
    reruns, todo = set(), list(stages)
    while todo:
        name = todo.pop()
        if name in reruns:
            continue
        reruns.add(name)
        written = output_paths(pipeline[name])
        todo.extend(other for other, stage in pipeline.items()
                    if any(dep == out or dep.startswith(out + "/") for dep in stage.get("deps", []) for out in written))
    return reruns


def test_what_follows_a_stage_is_read_from_the_outputs_it_writes():
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert and_what_follows({"train"}, pipeline) == {"train", "evaluate", "export", "plot"}
    assert and_what_follows({"preprocess"}, pipeline) == ALL_STAGES - {"download", "feedback"}
    assert and_what_follows({"plot"}, pipeline) == {"plot"}


# What the README says reruns after each kind of change ("What reruns what"):
# the stages that read the param, from `dvc status` (no run needed), and what
# follows them through dvc.yaml's outputs and deps. Real runs show that DVC
# does rerun what follows: the train.lr test and the forced rerun below.
RERUN_RULES = [
    # tune reads model.activation and model.dropout (and part of train): it reruns too.
    ("model.dropout", 0.1, {"train", "fit", "evaluate", "export", "tune"}, AFTER_TRAINING | {"tune"}),
    ("plot.misclassified", 10, {"plot"}, {"plot"}),
    ("tune.cv", 3, {"tune"}, {"tune"}),
    ("preprocess.val_size", 100, {"preprocess"}, ALL_STAGES - {"download", "feedback"}),
    ("train.schedule", "cosine", {"train", "fit"}, AFTER_TRAINING),
    ("train.warmup", 0.1, {"train", "fit"}, AFTER_TRAINING),
    ("train.augment", {"shift": 1, "rotate": 5.0}, {"train", "fit"}, AFTER_TRAINING),
    ("train.weight_decay", 0.01, {"train", "fit", "tune"}, AFTER_TRAINING | {"tune"}),
    ("train.cuda_graph", "off", {"train", "fit"}, AFTER_TRAINING),
    ("model.hidden", [64], {"train", "fit", "evaluate", "export"}, AFTER_TRAINING),
]


@pytest.mark.parametrize("key, value, readers, reruns", RERUN_RULES, ids=[rule[0] for rule in RERUN_RULES])
def test_changing_a_param_reruns_exactly_the_stages_that_read_it_and_what_follows(
        copy_project, key, value, readers, reruns):
    repo = copy_project()
    set_param(repo, key, value)
    status = json.loads(dvc("status", "--json", cwd=repo).stdout)
    assert status.keys() == readers, status
    for stage in readers:
        tracked = key if stage == "tune" else key.split(".")[0]  # tune lists keys; the others whole sections
        assert status[stage] == [{"changed deps": {"params.yaml": {tracked: "modified"}}}], status[stage]
    assert and_what_follows(readers, yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]) == reruns


def test_editing_a_shared_module_reruns_exactly_the_stages_that_import_it(copy_project):
    repo = copy_project()
    with (repo / "mnist_dvc/figures.py").open("a") as f:
        f.write("# an edit\n")
    status = json.loads(dvc("status", "--json", cwd=repo).stdout)
    importers = {stage: [{"changed deps": {"mnist_dvc/figures.py": "modified"}}] for stage in ("plot", "tune")}
    assert status == importers, status
    assert and_what_follows(set(importers), yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]) == {"plot", "tune"}


def experiment_commit(repo: Path, name: str) -> str:
    """The commit `dvc exp run -n <name>` made (under refs/exps)."""
    refs = sh("git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps", cwd=repo).stdout.split("\n")
    (commit,) = [line.split()[1] for line in refs if line.split(" ")[0].endswith(f"/{name}")]
    return commit


def test_a_train_param_reruns_exactly_the_trainings_and_what_follows_and_diffs_show_it(experiments, tmp_path):
    # exp-a of the shared `experiments` project is `dvc exp run -S train.lr=0.003` on the reproduced one.
    assert ran_stages((experiments.parent / "exp-a-output.txt").read_text()) == AFTER_TRAINING
    revisions = ("HEAD", experiment_commit(experiments, "exp-a"))

    metrics = json.loads(dvc("metrics", "diff", *revisions, "--json", cwd=experiments).stdout)
    changed = metrics["metrics/evaluate.json"]
    assert {"manual.accuracy", "skorch.accuracy", "manual.loss", "skorch.macro_f1"} <= set(changed)
    assert changed["manual.loss"]["old"] != changed["manual.loss"]["new"]

    params_diff = json.loads(dvc("params", "diff", *revisions, "--json", cwd=experiments).stdout)
    lr = params_diff["params.yaml"]["train.lr"]
    assert (lr["old"], lr["new"]) == (0.001, 0.003)

    out = tmp_path / "plots-diff"
    dvc("plots", "diff", *revisions, "-o", str(out), cwd=experiments)
    html = (out / "index.html").read_text()
    assert "Training loss per epoch" in html and "Confusion matrix" in html
    assert list(out.rglob("*.png")), "the PNG plots of both revisions are in the report"


# What a caller's environment may say about torch's CPU numerics; every stage pins its own (mnist_dvc/numerics.py).
FOREIGN_NUMERICS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "SSE41",
                    "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MKL_DYNAMIC": "TRUE"}


def test_forced_rerun_with_foreign_numeric_settings_reproduces_every_committed_result_bit_for_bit(copy_project):
    repo = copy_project()
    result = dvc("repro", "--force", cwd=repo, env={**tool_env(), **FOREIGN_NUMERICS})
    assert ran_stages(result.stdout) == ALL_STAGES
    # Models, data, metrics, plot data, PNGs, ONNX files and dvc.lock (which
    # holds the md5 of every output) are all unchanged: no timing, no path,
    # nothing the caller's environment or the CPU's vector unit decides.
    assert sh("git", "status", "--porcelain", cwd=repo).stdout == ""
    # Then the pipeline is up to date, and a repro starts no stage at all.
    assert dvc("status", cwd=repo).stdout.strip() == "Data and pipelines are up to date."
    assert ran_stages(dvc("repro", cwd=repo).stdout) == set()


def test_bad_values_set_through_exp_run_fail_with_the_key_and_what_is_allowed(copy_project):
    repo = copy_project()
    # Two bad values of one section come on one line, as params.yaml's check reports them.
    cases = [
        (["train.lr=-1", "train.optimizer=adagrad"],
         ["train.lr = -1: Input should be greater than 0",
          "train.optimizer = 'adagrad': Input should be 'adam', 'adamw' or 'sgd'"]),
        (["model.hidden=[]"], ["model.hidden = []: List should have at least 1 item"]),
    ]
    for settings, messages in cases:
        result = dvc("exp", "run", *(arg for setting in settings for arg in ("-S", setting)), cwd=repo, check=False)
        assert result.returncode != 0, settings
        output = result.stdout + result.stderr
        errors = [line for line in output.splitlines() if line.startswith("error: params.yaml: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: params.yaml: {messages[0]}"), output
        assert all(message in errors[0] for message in messages), output
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
