"""`make check` (mnist_dvc/apps/check.py): the rebuilt outputs against the committed dvc.lock, stage by stage."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import REPO, tool_env

pytestmark = pytest.mark.e2e


def check(repo, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnist_dvc.apps.check", *args], cwd=repo,
                          env={**tool_env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True)


def edit_lock(repo, stage: str, edit) -> None:
    """Change the workspace's dvc.lock entry of ``stage``, as a rebuild that gave other bytes would."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    edit(lock["stages"][stage])
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def other_model_hash(stage: dict) -> None:
    (model,) = [out for out in stage["outs"] if out["path"] == "models/mlp.pt"]
    model["md5"] = "0" * 32


def test_a_rebuild_that_equals_the_commit_is_the_same_at_every_stage(copy_project):
    result = check(copy_project())
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == sorted(yaml.safe_load(
        (REPO / "dvc.yaml").read_text())["stages"])
    assert all(": same (" in line for line in lines[:-1]), result.stdout
    assert lines[-1].startswith("| ") and lines[-1].endswith(" | portable | match |")  # a row for the docs' table


def test_an_output_that_differs_with_the_same_inputs_fails_and_says_by_how_much(copy_project):
    repo = copy_project()
    edit_lock(repo, "train", other_model_hash)
    result = check(repo)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("train: DIFFERENT models/mlp.pt; likely cause: the same inputs and portable numerics: "
            "this should not differ (please report it)") in result.stdout
    assert "  manual: test accuracy " in result.stdout and "; 0 of 297 test predictions differ" in result.stdout
    assert result.stdout.splitlines()[-1].endswith(" | portable | differs (train) |")


def test_an_output_that_differs_after_a_param_change_names_the_param_and_fails_only_with_strict(copy_project):
    repo = copy_project()

    def changed_lr(stage: dict) -> None:
        other_model_hash(stage)
        stage["params"]["params.yaml"]["train"]["lr"] = 0.01

    edit_lock(repo, "train", changed_lr)
    result = check(repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train: DIFFERENT models/mlp.pt; likely cause: inputs changed since the commit: params train" in result.stdout
    assert check(repo, "--strict").returncode == 1


def test_a_revision_without_a_dvc_lock_is_one_line_and_exit_2(copy_project):
    repo = copy_project()
    first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=repo, capture_output=True,
                           text=True, check=True).stdout.strip()  # the sources alone, before `dvc repro`
    for rev, reason in ((first, "does not exist"), ("no-such-rev", "unknown Git revision 'no-such-rev'")):
        result = check(repo, "--rev", rev)
        assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
        assert result.stderr.startswith(f"error: cannot compare dvc.lock at {rev} with the workspace's: "), result.stderr
        assert reason in result.stderr and result.stderr.count("\n") == 1, result.stderr
