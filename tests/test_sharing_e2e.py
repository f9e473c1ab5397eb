"""End to end: share results through a real S3 remote and a git remote, and run queued experiments.

The S3 remote is a SeaweedFS server on 127.0.0.1 (tests/s3server.py); the git
remote is a bare repository on disk. Every command is the real `git` / `dvc`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import DVC, dvc, md5_of, ran_stages, sh, tool_env

pytestmark = pytest.mark.e2e
QUEUE_TIMEOUT = 8 * 60  # seconds for the queued grid to finish


@pytest.fixture(autouse=True)
def no_studio(monkeypatch):
    """`dvc exp push` and dvclive would notify DVC Studio if a token were set: nothing leaves this host."""
    for name in ("DVC_STUDIO_TOKEN", "STUDIO_TOKEN", "DVC_STUDIO_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_STUDIO_OFFLINE", "true")


# --- helpers --------------------------------------------------------------------

def lock_outs(repo: Path) -> dict[str, dict]:
    """Every output in ``dvc.lock``, by path: {path: the lock entry (md5, size...)}."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            outs[out["path"]] = out
    return outs


def tree(path: Path) -> dict[str, str]:
    """md5 of each file at or under ``path``, by path relative to it ("" for a file)."""
    if path.is_file():
        return {"": md5_of(path)}
    return {str(p.relative_to(path)): md5_of(p)
            for p in sorted(path.rglob("*")) if p.is_file()}


def git_tracked(repo: Path, path: str) -> bool:
    return bool(sh("git", "ls-files", "--", path, cwd=repo, timeout=60).stdout.strip())


def remote_key(md5: str) -> str:
    """Where DVC 3 stores an object in a remote, below the remote's URL."""
    return f"files/md5/{md5[:2]}/{md5[2:]}"


def add_s3_remote(repo: Path, remote, commit: bool = True) -> None:
    """Make ``remote`` the repo's default remote, committed to .dvc/config (keys stay in the env);
    with ``commit=False``, in this copy's .dvc/config.local only (the commits stay as they are)."""
    where = [] if commit else ["--local"]
    dvc("remote", "add", *where, "-d", "storage", remote.url, cwd=repo, timeout=60)
    dvc("remote", "modify", *where, "storage", "endpointurl", remote.endpoint, cwd=repo, timeout=60)
    config = (repo / ".dvc" / ("config" if commit else "config.local")).read_text()
    assert remote.url in config
    assert remote.server.secret_key not in config and remote.server.access_key not in config
    if commit:
        sh("git", "add", ".dvc/config", cwd=repo, timeout=60)
        sh("git", "commit", "-q", "-m", "S3 remote", cwd=repo, timeout=60)


def listed_experiments(repo: Path) -> list[dict]:
    """The experiments `dvc exp show --json` lists (every baseline, every range)."""
    rows = json.loads(dvc("exp", "show", "--json", cwd=repo, timeout=120).stdout)
    return [exp for row in rows for exp_range in (row.get("experiments") or []) for exp in exp_range["revs"]]


def assert_clean_and_nothing_to_run(repo: Path) -> None:
    status = json.loads(dvc("status", "--json", cwd=repo, timeout=120).stdout)
    assert status == {}, status
    repro = dvc("repro", cwd=repo, timeout=300)
    assert ran_stages(repro.stdout) == set(), repro.stdout


# --- a clone pulls every output and retrains nothing ------------------------------

def test_push_to_s3_then_a_fresh_clone_pulls_every_output_and_reproduces_nothing(
        copy_project, s3_remote, tmp_path):
    repo = copy_project()
    add_s3_remote(repo, s3_remote)
    push = dvc("push", cwd=repo, timeout=300)
    keys = s3_remote.keys()
    assert keys and f"{len(keys)} files pushed" in push.stdout, (push.stdout, sorted(keys))

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path, timeout=120)
    assert not (clone / ".dvc" / "cache").exists(), "the clone starts with no cache: data must come from S3"
    pull = dvc("pull", cwd=clone, timeout=300)
    assert "fetched" in pull.stdout or "added" in pull.stdout, pull.stdout
    assert_clean_and_nothing_to_run(clone)

    outs = lock_outs(repo)
    assert outs == lock_outs(clone)
    for path, entry in outs.items():
        # Every output of every stage is back in the clone, byte for byte...
        assert (clone / path).exists(), f"{path} (in dvc.lock) is missing after dvc pull"
        assert tree(clone / path) == tree(repo / path) and tree(repo / path), path
        # ...either from git (cache: false) or from the S3 remote.
        if not git_tracked(clone, path):
            assert f"cache/{remote_key(entry['md5'])}" in keys, f"{path} ({entry['md5']}) is not in the remote"


# --- experiments travel through a git remote and the S3 remote ------------------------

def test_exp_run_is_listed_by_exp_show_and_exp_push_and_pull_share_it_without_retraining(
        experiments, s3_remote, tmp_path):
    # The shared `experiments` project: exp-a is `dvc exp run -n exp-a -S train.lr=0.003` on
    # the reproduced one, which retrained (test_pipeline_e2e checks what it ran).
    repo = tmp_path / "repo"
    shutil.copytree(experiments, repo, symlinks=True)
    # The shared workspace holds exp-b's results, validation curves included: start from a
    # clean HEAD, as a person would, so that none of exp-b's files are taken for exp-a's.
    sh("git", "checkout", "-q", "-f", "HEAD", cwd=repo, timeout=60)
    sh("git", "clean", "-fdq", "--", "metrics", "plots", cwd=repo, timeout=60)
    dvc("exp", "apply", "exp-a", cwd=repo, timeout=300)  # the workspace as exp-a's run left it
    add_s3_remote(repo, s3_remote, commit=False)  # exp-a's baseline stays HEAD
    origin = tmp_path / "origin.git"
    sh("git", "init", "-q", "--bare", "-b", "main", str(origin), cwd=tmp_path, timeout=60)
    sh("git", "remote", "add", "origin", str(origin), cwd=repo, timeout=60)
    sh("git", "push", "-q", "origin", "main", cwd=repo, timeout=120)

    # `dvc exp show` lists the experiment with its params and metrics...
    listed = [exp for exp in listed_experiments(repo) if exp.get("name") == "exp-a"]
    assert listed, listed_experiments(repo)
    assert listed[0]["data"]["params"]["params.yaml"]["data"]["train"]["lr"] == 0.003
    evaluation = listed[0]["data"]["metrics"]["metrics/evaluate.json"]["data"]
    assert evaluation == json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0 < evaluation["manual"]["accuracy"] <= 1 and 0 < evaluation["skorch"]["accuracy"] <= 1
    expected = {path: tree(repo / path) for path in lock_outs(repo)}
    assert not s3_remote.keys(), "nothing was pushed before `dvc exp push`"
    push = dvc("exp", "push", "origin", "exp-a", cwd=repo, timeout=300)
    assert "Pushed experiment exp-a" in push.stdout, push.stdout
    keys = s3_remote.keys()
    # `dvc exp push` pushes the experiment's cached outputs to the default remote too.
    for path, entry in lock_outs(repo).items():
        if not git_tracked(repo, path):
            assert f"cache/{remote_key(entry['md5'])}" in keys, f"{path} was not pushed by exp push"

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path, timeout=120)
    assert [exp.get("name") for exp in listed_experiments(clone) if exp.get("name")] == []
    add_s3_remote(clone, s3_remote, commit=False)
    pull = dvc("exp", "pull", "origin", "exp-a", cwd=clone, timeout=300)
    assert "exp-a" in pull.stdout, pull.stdout
    shared = [exp for exp in listed_experiments(clone) if exp.get("name") == "exp-a"]
    assert shared, listed_experiments(clone)
    data = shared[0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == 0.003
    assert data["metrics"]["metrics/evaluate.json"]["data"] == json.loads(
        (repo / "metrics/evaluate.json").read_text())

    dvc("exp", "apply", "exp-a", cwd=clone, timeout=300)
    assert yaml.safe_load((clone / "params.yaml").read_text())["train"]["lr"] == 0.003
    # `dvc exp pull` fetched every cached output of the experiment (the baseline's data
    # included), so no `dvc pull` is needed.
    assert_clean_and_nothing_to_run(clone)
    assert {path: tree(clone / path) for path in lock_outs(clone)} == expected


# --- a queued grid runs in parallel workers ---------------------------------------

def queue_pids(repo: Path) -> set[int]:
    """Processes the repository's experiment queue started: its workers, their `exec-run`s
    and the stage commands, whose cwd is the repo or a temporary copy below .dvc/tmp/exps."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if cwd == repo or repo in cwd.parents:
            pids.add(int(proc.name))
    return pids


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    running = set()
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            running.add(pid)
    return running


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive(pids)


@pytest.fixture
def queue_repo(copy_project):
    """A project copy whose experiment queue is stopped, and every process it started gone, after the test."""
    repo = copy_project()
    yield repo
    dvc("queue", "stop", "--kill", cwd=repo, timeout=120, check=False)
    # `queue stop --kill` ends the workers but leaves a running stage command orphaned.
    left = wait_gone(queue_pids(repo), timeout=10)
    for sig in (signal.SIGTERM, signal.SIGKILL):  # only processes working in this test's repository
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        left = wait_gone(left, timeout=5)
    assert not left, f"processes of the experiment queue outlived the test: {sorted(left)}"


def test_a_queued_grid_runs_in_two_workers_and_every_experiment_has_metrics(queue_repo):
    repo = queue_repo
    # A grid over a cheap option (only `plot` reruns): the queue's machinery is
    # what is tested here; docs/experiments.md has a real queued training sweep.
    queued = dvc("exp", "run", "--queue", "-S", "plot.misclassified=5,10", "-S", "train.threads=1",
                 cwd=repo, timeout=120)
    assert queued.stdout.count("Queued experiment") == 2, queued.stdout
    started = time.monotonic()
    # Not through a pipe: the detached workers inherit it, and reading it to its end
    # would wait for them to exit.
    log = repo.parent / "queue-start.log"
    with log.open("w") as out:
        subprocess.run([DVC, "queue", "start", "-j", "2"], cwd=repo,
                       env=tool_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                       timeout=120, check=True)
    assert "Started '2' new experiments task queue workers" in log.read_text(), log.read_text()
    while True:
        status = dvc("queue", "status", cwd=repo, timeout=120).stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() - started < QUEUE_TIMEOUT, f"the queue did not finish:\n{status}"
        time.sleep(1)
    assert status.count("Success") == 2, status

    def misclassified(exp: dict):
        return (((exp.get("data") or {}).get("params") or {}).get("params.yaml") or {}).get(
            "data", {}).get("plot", {}).get("misclassified")

    finished = [exp for exp in listed_experiments(repo) if misclassified(exp) in (5, 10)]
    assert sorted(misclassified(exp) for exp in finished) == [5, 10], finished
    for exp in finished:
        evaluation = exp["data"]["metrics"]["metrics/evaluate.json"]["data"]
        assert 0 < evaluation["manual"]["accuracy"] <= 1 and 0 < evaluation["skorch"]["accuracy"] <= 1
