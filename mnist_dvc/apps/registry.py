"""The model registry: GTO's git tags over dvc.yaml's four ``artifacts:``, moved as one group.

The four model files (both trainings' state_dicts and their ONNX copies) are
written by one ``dvc repro`` and served together, so they are registered and
assigned together: the same version (``mlp-pytorch@v1.2.0``, ``mlp-skorch@v1.2.0``,
...) at the same commit, and the same stage tags (GTO's full notation,
``mlp-pytorch#prod#3``: every assignment is a new annotated tag, so the tags
themselves are the history, and a rollback is one more tag, not a moved one).
A release is "the version all four have in the stage"; where they disagree
(someone assigned one by hand), ``release_in_stage`` says so instead of
guessing.

The stage a version is in is the one ``gto show`` shows: the latest assignment
by its tag's time. Git keeps that time to the second, so two assignments of a
stage within one second would be ordered by chance (measured with gto 1.10.1:
``gto show`` then names the older one). ``assign_group`` therefore waits, when
needed, until the clock has passed the second of the group's newest tag.

The files of a version are read at its commit through ``dvc.api.DVCFileSystem``:
the local DVC cache, or the DVC remote where the cache lacks them. The
registration tag's message records each file's sha256 (``sha256 <path> <hex>``
lines), so that what is served can be checked against what was promoted.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# name: path, as dvc.yaml's artifacts: declares them (tests/test_registry.py keeps the two equal).
ARTIFACTS = {
    "mlp-pytorch": "models/mlp.pt",
    "mlp-skorch": "models/skorch_params.pt",
    "mlp-onnx": "models/mlp.onnx",
    "mlp-skorch-onnx": "models/skorch.onnx",
}
LEAD = "mlp-pytorch"  # the group's name in report folders and messages
# What a server needs beside the model files to use a version: its architecture and metrics.
COMPANIONS = ("params.yaml", "metrics/evaluate.json")
SHA_LINE = re.compile(r"^sha256 (\S+) ([0-9a-f]{64})$", re.MULTILINE)


class RegistryError(Exception):
    """A registry or file problem, in one line for the user."""


@dataclass(frozen=True)
class Release:
    """One version of the group: its number, commit, and the sha256 recorded at registration."""

    version: str
    commit: str
    sha256: dict[str, str] = field(default_factory=dict)  # path -> hex, empty where none was recorded


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git(root: Path, *args: str) -> str:
    """``git args`` in ``root``; its stdout stripped. Raises RegistryError with git's first line."""
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[0]
        raise RegistryError(f"git {' '.join(args)}: {reason}")
    return result.stdout.strip()


def resolve_commit(root: Path, rev: str) -> str | None:
    """The full hash of the commit ``rev`` names, or None where git knows no such revision."""
    try:
        return git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except RegistryError:
        return None


def registry_state(root: Path) -> dict:
    """``gto show``'s table as a dict: {artifact: {"version": latest, "stage": {stage: version}}}."""
    import gto.api

    return gto.api.show(str(root))


def versions(root: Path, name: str) -> list[dict]:
    """GTO's versions of one artifact (dicts with ``version``, ``commit_hexsha``, ``message``, ...); [] for none."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        return gto.api.show(str(root), name)
    except ArtifactNotFound:  # no tag names it yet
        return []


def recorded_sha256(message: str) -> dict[str, str]:
    """The ``sha256 <path> <hex>`` lines of a registration message, as {path: hex}."""
    return dict(SHA_LINE.findall(message or ""))


def release_of(root: Path, version: str) -> Release:
    """The group's ``version``: its commit and recorded hashes. Raises RegistryError."""
    commits, hashes = set(), {}
    for name in ARTIFACTS:
        found = [v for v in versions(root, name) if v["version"] == version]
        if not found:
            raise RegistryError(f"{name} has no version {version} (gto show {name})")
        commits.add(found[0]["commit_hexsha"])
        hashes.update(recorded_sha256(found[0].get("message", "")))
    if len(commits) > 1:
        raise RegistryError(f"version {version} points to different commits for the four artifacts "
                            f"({', '.join(sorted(c[:7] for c in commits))}): register them together with promote")
    return Release(version, commits.pop(), hashes)


def agreed(named: dict[str, str | None], disagreement: str) -> str | None:
    """The one version all four artifacts have (``named``: artifact -> version), None where none has
    one; RegistryError with ``disagreement`` (its ``{}``: each artifact's version) where they differ."""
    found = set(named.values())
    if found == {None}:
        return None
    if len(found) > 1:
        raise RegistryError(disagreement.format(", ".join(f"{name} {v or 'none'}" for name, v in named.items())))
    return found.pop()


def version_in_stage(root: Path, stage: str) -> str | None:
    """The version all four artifacts have in ``stage`` (as ``gto show`` says), None where none has one.

    One read of the tags (what a server polls). Raises RegistryError where they
    disagree or only some have one.
    """
    state = registry_state(root)
    named = {name: (state.get(name) or {}).get("stage", {}).get(stage) for name in ARTIFACTS}
    return agreed(named, f"the four artifacts disagree on stage {stage!r} ({{}}): promote or roll back the group as one")


def release_in_stage(root: Path, stage: str) -> Release | None:
    """The release in ``stage`` with its commit and recorded hashes, None where none is. Raises RegistryError."""
    version = version_in_stage(root, stage)
    return release_of(root, version) if version else None


def stage_history(root: Path, stage: str) -> list[str]:
    """The versions ``stage`` has held, newest assignment first, each once (for a rollback)."""
    import gto.api

    state = gto.api.show(str(root), versions_per_stage=-1)
    listed = (state.get(LEAD) or {}).get("stage", {}).get(stage) or ""
    return [version.strip() for version in listed.split(",") if version.strip()]


def newest_tag_time(root: Path) -> int:
    """The Unix time, to the second, of the newest annotated tag of any of the four artifacts (0: none)."""
    patterns = [f"refs/tags/{name}[@#]*" for name in ARTIFACTS]
    out = git(root, "for-each-ref", "--format=%(taggerdate:unix)", *patterns)
    return max((int(line) for line in out.split() if line.isdigit()), default=0)


def wait_for_a_new_second(root: Path) -> float:
    """Sleep until the clock is past the second of the group's newest tag; the seconds slept.

    GTO orders a stage's assignments by tag time, which git keeps to the second:
    a tag made in the same second as the one before would be ordered by chance.
    """
    newest = newest_tag_time(root)
    wait = newest + 1 - time.time()
    if wait > 0:
        time.sleep(wait)
        return wait
    return 0.0


def next_version(known: dict[str, list[dict]]) -> str:
    """The group's next version: one minor above the highest any of the four has, or v1.0.0.

    ``known``: each artifact's versions, as ``versions`` lists them.
    """
    found = [v["version"] for listed in known.values() for v in listed
             if re.fullmatch(r"v\d+\.\d+\.\d+", v["version"])]
    if not found:
        return "v1.0.0"
    major, minor, _ = max(tuple(int(part) for part in v[1:].split(".")) for v in found)
    return f"v{major}.{minor + 1}.0"


def version_at(known: dict[str, list[dict]], commit: str) -> str | None:
    """The version the group already has at ``commit`` (all four the same), None where none has one.

    Raises RegistryError where only some, or differently numbered, are registered there.
    """
    named = {name: next((v["version"] for v in known[name]
                         if v["commit_hexsha"] == commit and v.get("registrations")), None)
             for name in ARTIFACTS}
    return agreed(named, f"commit {commit[:7]} is registered unevenly ({{}}): "
                         "register the missing ones with gto register --version")
    return found.pop()


def register_group(root: Path, commit: str, hashes: dict[str, str]) -> str:
    """Register the four artifacts at ``commit`` as one version (or reuse the one it has); the version.

    The registration message records each file's sha256.
    """
    import gto.api

    known = {name: versions(root, name) for name in ARTIFACTS}
    existing = version_at(known, commit)
    if existing:
        return existing
    version = next_version(known)
    lines = "\n".join(f"sha256 {path} {digest}" for path, digest in sorted(hashes.items()))
    for name in ARTIFACTS:
        gto.api.register(str(root), name, commit, version=version,
                         message=f"Registering {name} {version} (the group of {LEAD}, promote)\n\n{lines}")
    return version


def assign_group(root: Path, version: str, stage: str, message: str) -> None:
    """Assign ``stage`` to ``version`` of all four artifacts (new tags, after the next second begins)."""
    import gto.api

    wait_for_a_new_second(root)
    for name in ARTIFACTS:
        # force: a version that held the stage before (a rollback) gets a new tag all the same
        gto.api.assign(str(root), name, stage, version=version, message=message, force=True)


def fetch_release(root: Path, commit: str, dest: Path, paths: tuple[str, ...] | None = None,
                  cache_dir: Path | None = None) -> None:
    """Copy ``paths`` (default: the four model files and COMPANIONS) at ``commit`` into ``dest``.

    Read through DVC: the local cache, else the remote. ``cache_dir``: an empty folder
    to use as the cache instead, so that every file must come from the remote.
    Raises RegistryError naming the first file that cannot be read.
    """
    from dvc.api import DVCFileSystem

    paths = paths or (*ARTIFACTS.values(), *COMPANIONS)
    config = {"cache": {"dir": str(cache_dir)}} if cache_dir else None
    try:
        fs = DVCFileSystem(str(root), rev=commit, config=config)
    except Exception as exc:  # DVC raises its own error types for a bad revision or config
        raise RegistryError(f"commit {commit[:7]}: DVC cannot open it ({one_line(exc)})") from None
    for path in paths:
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get_file(path, str(target))
        except Exception as exc:  # FileNotFoundError, or DVC's errors for a file in no cache or remote
            raise RegistryError(f"{path} at {commit[:7]} cannot be fetched ({one_line(exc)})") from None


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its first line, or its type where it has no text."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def remote_configured(root: Path) -> str | None:
    """The DVC remote ``dvc push`` would use (core.remote), or None where there is none."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.config["core"].get("remote")
