"""The model registry and the promotion gate (mnist_dvc/apps/registry.py, promote.py): real git, real gto.

Every test works on a copy of the ``reproduced`` project (one `dvc repro`, built
once per run). A candidate version is that project's commit with a changed
metrics file, and dvc.lock's record of it updated as `dvc repro` would: the
models stay the same files, so no test trains. The experiment case promotes
the ``experiments`` fixture's exp-a, from a copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import DVC, REPO, sh

from mnist_dvc.apps import promote, registry

pytestmark = pytest.mark.e2e

GTO = str(Path(DVC).parent / "gto")


def run_promote(repo: Path, *args: str, capsys) -> tuple[int, str, str]:
    """``promote.main`` in this process on ``repo``: (status, stdout, stderr)."""
    status = promote.main([*args, "--root", str(repo)])
    out = capsys.readouterr()
    return status, out.out, out.err


def commit_metrics(repo: Path, change: dict[str, dict], message: str, update_lock: bool = True) -> str:
    """Change metrics/evaluate.json (``{"manual": {"accuracy": 0.9}}``) and commit; the new commit.

    ``update_lock``: record the new file in dvc.lock as `dvc repro` would (its md5 and size).
    """
    path = repo / "metrics/evaluate.json"
    metrics = json.loads(path.read_text())
    for model, values in change.items():
        metrics[model].update(values)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    if update_lock:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        for entry in lock["stages"]["evaluate"]["outs"]:
            if entry["path"] == "metrics/evaluate.json":
                entry["md5"] = hashlib.md5(path.read_bytes()).hexdigest()
                entry["size"] = path.stat().st_size
        (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    sh("git", "commit", "-q", "-am", message, cwd=repo)
    return sh("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()


def accuracy(repo: Path) -> float:
    return json.loads((repo / "metrics/evaluate.json").read_text())["manual"]["accuracy"]


def stage_tags(repo: Path) -> list[str]:
    return sh("git", "tag", "--list", "*#prod#*", cwd=repo).stdout.split()


def gto_show(repo: Path) -> str:
    return sh(GTO, "show", cwd=repo).stdout


@pytest.fixture
def project(copy_project) -> Path:
    return copy_project()


def test_dvc_yaml_declares_exactly_the_registry_artifacts():
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    assert {name: spec["path"] for name, spec in declared.items()} == registry.ARTIFACTS


def test_two_versions_promoted_in_order_then_rolled_back_and_forth_at_once(project, capsys):
    status, out, err = run_promote(project, "HEAD", capsys=capsys)
    assert status == 0, err
    assert "prod: v1.0.0" in out
    better = commit_metrics(project, {"manual": {"accuracy": accuracy(project) + 0.001}}, "better")
    status, out, err = run_promote(project, better, capsys=capsys)
    assert status == 0, err
    assert "prod: v1.1.0" in out and "was v1.0.0" in out

    shown = gto_show(project)
    for name in registry.ARTIFACTS:
        line = next(line for line in shown.splitlines() if f" {name} " in f" {line} ")
        assert "v1.1.0" in line
    assert registry.release_in_stage(project, "prod").commit == better
    report = project / "reports/promote-mlp-pytorch-v1.1.0/report.html"
    assert report.is_file() and "mlp-pytorch@v1.0.0" in report.read_text()
    # The registration records each file's sha256, as the files are.
    release = registry.release_of(project, "v1.1.0")
    assert release.sha256 == {path: registry.sha256_of(project / path) for path in registry.ARTIFACTS.values()}

    # Back, right after the promotion, then forth again at once: each within a second of the one before,
    # and each must be what gto show names (GTO orders by tag time, to the second).
    status, out, err = run_promote(project, "--rollback", "--message", "users report bad 7s", capsys=capsys)
    assert status == 0, err
    assert out.strip() == f"prod: v1.0.0 ({registry.release_of(project, 'v1.0.0').commit[:7]}), was v1.1.0"
    assert registry.release_in_stage(project, "prod").version == "v1.0.0"
    assert all("v1.0.0" in line for line in gto_show(project).splitlines() if "mlp-" in line)
    assert "users report bad 7s" in sh("git", "tag", "--list", "--format=%(contents)", "mlp-onnx#prod#3",
                                       cwd=project).stdout
    status, out, err = run_promote(project, "--rollback", capsys=capsys)  # the one held before: v1.1.0
    assert status == 0, err
    assert registry.release_in_stage(project, "prod").version == "v1.1.0"
    times = sh("git", "for-each-ref", "--format=%(taggerdate:unix)", "refs/tags/mlp-pytorch#prod#*",
               cwd=project).stdout.split()
    assert len(times) == 4 and len(set(times)) == 4


def test_worse_candidates_are_refused_one_line_per_check_with_no_stage_tag_and_force_is_recorded(project, capsys):
    with_feedback = commit_metrics(project, {"manual": {"feedback_accuracy": 0.9, "feedback_count": 10},
                                            "skorch": {"feedback_accuracy": 0.9, "feedback_count": 10}}, "fb")
    assert run_promote(project, with_feedback, capsys=capsys)[0] == 0
    tags = stage_tags(project)

    def refused(commit: str) -> list[str]:
        status, _, err = run_promote(project, commit, capsys=capsys)
        assert status == 1, err
        assert stage_tags(project) == tags and registry.release_in_stage(project, "prod").commit == with_feedback
        return [line for line in err.splitlines() if line.startswith("failed: ")]

    worse = commit_metrics(project, {"skorch": {"accuracy": accuracy(project) - 0.01}}, "worse")
    failed = refused(worse)
    assert len(failed) == 1 and failed[0].startswith("failed: accuracy: skorch ") and "max_drop 0.003" in failed[0]
    assert (project / "reports/promote-mlp-pytorch-v1.1.0/report.md").is_file()

    sh("git", "reset", "-q", "--hard", with_feedback, cwd=project)
    lower = commit_metrics(project, {"manual": {"feedback_accuracy": 0.8}}, "lower feedback")
    assert refused(lower) == ["failed: feedback: manual feedback_accuracy 0.8000 is below v1.0.0's 0.9000"]

    sh("git", "reset", "-q", "--hard", with_feedback, cwd=project)
    stale = commit_metrics(project, {"manual": {"accuracy": accuracy(project) + 0.001}}, "by hand", update_lock=False)
    failed = refused(stale)
    assert len(failed) == 1 and failed[0].startswith("failed: lock: evaluate in dvc.lock")
    assert "metrics/evaluate.json" in failed[0]

    status, out, err = run_promote(project, worse, "--force", "--message", "hotfix for a crash", capsys=capsys)
    assert status == 0, err
    assert registry.release_in_stage(project, "prod").commit == worse
    note = sh("git", "tag", "--list", "--format=%(contents)", "mlp-skorch#prod#2", cwd=project).stdout
    assert "forced: hotfix for a crash" in note and "failed: accuracy: skorch" in note


def test_a_candidate_whose_files_are_in_no_cache_is_refused_and_usage_errors_are_one_line(project, capsys):
    status, _, err = run_promote(project, "no-such-rev", capsys=capsys)
    assert status == 2 and err.strip().startswith("error: 'no-such-rev' is neither")
    status, _, err = run_promote(project, "--rollback", capsys=capsys)
    assert status == 2 and "has held no other version" in err
    with pytest.raises(SystemExit) as exit_:
        promote.main(["HEAD", "--force", "--root", str(project)])
    assert exit_.value.code == 2 and "--force needs --message" in capsys.readouterr().err

    shutil.rmtree(project / ".dvc/cache")
    status, _, err = run_promote(project, "HEAD", capsys=capsys)
    assert status == 1
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and failed[0].startswith("failed: fetch: models/")
    assert stage_tags(project) == []


def test_with_a_remote_the_candidate_must_have_been_pushed(project, tmp_path, capsys):
    remote = tmp_path / "remote"
    sh(DVC, "remote", "add", "-d", "store", str(remote), cwd=project)
    sh("git", "commit", "-qam", "remote", cwd=project)
    status, _, err = run_promote(project, "HEAD", capsys=capsys)
    assert status == 1
    assert "failed: push: not on the DVC remote 'store'" in err
    sh(DVC, "push", cwd=project)
    status, out, err = run_promote(project, "HEAD", capsys=capsys)
    assert status == 0, err


def test_an_experiment_becomes_a_branch_then_a_version(experiments, tmp_path, capsys):
    project = tmp_path / "repo"
    shutil.copytree(experiments, project, symlinks=True)
    status, out, err = run_promote(project, "exp-a", capsys=capsys)
    assert status == 0, err
    assert "experiment exp-a is now the branch promote/exp-a" in out
    branch = sh("git", "rev-parse", "promote/exp-a", cwd=project).stdout.strip()
    assert registry.release_in_stage(project, "prod").commit == branch
