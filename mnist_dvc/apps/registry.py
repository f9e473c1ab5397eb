"""The model registry: GTO's git tags over dvc.yaml's four ``artifacts:``, moved as one group.

The four model files come from one ``dvc repro`` and are served together, so they
share each version (``mlp-pytorch@v1.2.0``, ...) and each stage tag (GTO's full
notation, ``mlp-pytorch#prod#3``: a rollback is one more tag). A version's files are
read at its commit through ``dvc.api.DVCFileSystem`` (cache, else remote); its
registration message records each file's sha256 (``sha256 <path> <hex>`` lines).
Why a group, why this notation, and the same-second pitfall: docs/registry.md, Design.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

# gto and DVC are imported where used: their import is slow, and predict or serve without --stage never need them.

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
    sha256: dict[str, str]  # path -> hex, empty where none was recorded


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its first line, or its type where it has no text."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def versions(root: Path, name: str) -> list[dict]:
    """GTO's versions of one artifact (dicts with ``version``, ``commit_hexsha``, ``message``, ...); [] for none."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        return gto.api.show(str(root), name)
    except ArtifactNotFound:  # no tag names it yet
        return []


def agreed(named: dict[str, str | None], disagreement: str) -> str | None:
    """The one version all four artifacts have (``named``: artifact -> version), None where none has
    one; RegistryError with ``disagreement`` (its ``{}``: each artifact's version) where they differ."""
    found = set(named.values())
    if found == {None}:
        return None
    if len(found) > 1:
        raise RegistryError(disagreement.format(", ".join(f"{name} {v or 'none'}" for name, v in named.items())))
    return found.pop()


def release_of(root: Path, version: str) -> Release:
    """The group's ``version``: its commit and recorded hashes. Raises RegistryError."""
    commits, hashes = set(), {}
    for name in ARTIFACTS:
        found = [v for v in versions(root, name) if v["version"] == version]
        if not found:
            raise RegistryError(f"{name} has no version {version} (gto show {name})")
        commits.add(found[0]["commit_hexsha"])
        hashes.update(SHA_LINE.findall(found[0].get("message") or ""))
    if len(commits) > 1:
        raise RegistryError(f"version {version} points to different commits for the four artifacts "
                            f"({', '.join(sorted(c[:7] for c in commits))}): register them together with promote")
    return Release(version, commits.pop(), hashes)


def version_in_stage(root: Path, stage: str) -> str | None:
    """The version all four artifacts have in ``stage`` (``gto show``'s: one read of the tags, what a server
    polls), None where none has one. Raises RegistryError where they disagree."""
    import gto.api

    state = gto.api.show(str(root))
    named = {name: (state.get(name) or {}).get("stage", {}).get(stage) for name in ARTIFACTS}
    return agreed(named, f"the four artifacts disagree on stage {stage!r} ({{}}): "
                         "promote or roll back the group as one")


def release_in_stage(root: Path, stage: str) -> Release | None:
    """The release in ``stage`` with its commit and recorded hashes, None where none is. Raises RegistryError."""
    version = version_in_stage(root, stage)
    return release_of(root, version) if version else None


def stage_history(root: Path, stage: str) -> list[str]:
    """The versions ``stage`` has held, newest assignment first, each once (for a rollback)."""
    import gto.api

    listed = (gto.api.show(str(root), versions_per_stage=-1).get(LEAD) or {}).get("stage", {}).get(stage) or ""
    return [version.strip() for version in listed.split(",") if version.strip()]


def register_group(root: Path, commit: str, hashes: dict[str, str]) -> str:
    """Register the four artifacts at ``commit`` as one version, recording each file's sha256; the version.

    A commit registered before keeps its version; otherwise the next minor above the highest
    any of the four has (v1.0.0 for the first). Raises RegistryError where only some are registered there.
    """
    import gto.api

    known = {name: versions(root, name) for name in ARTIFACTS}
    at_commit = {name: next((v["version"] for v in listed
                             if v["commit_hexsha"] == commit and v.get("registrations")), None)
                 for name, listed in known.items()}
    existing = agreed(at_commit, f"commit {commit[:7]} is registered unevenly ({{}}): "
                                 "register the missing ones with gto register --version")
    if existing:
        return existing
    numbers = [tuple(map(int, v["version"][1:].split("."))) for listed in known.values() for v in listed
               if re.fullmatch(r"v\d+\.\d+\.\d+", v["version"])]
    major, minor, _ = max(numbers, default=(1, -1, 0))  # none yet: v1.0.0
    version = f"v{major}.{minor + 1}.0"
    lines = "\n".join(f"sha256 {path} {digest}" for path, digest in sorted(hashes.items()))
    for name in ARTIFACTS:
        gto.api.register(str(root), name, commit, version=version,
                         message=f"Registering {name} {version} (the group of {LEAD}, promote)\n\n{lines}")
    return version


def assign_group(root: Path, version: str, stage: str, message: str) -> None:
    """Assign ``stage`` to ``version`` of all four artifacts: one new tag each.

    GTO orders assignments by tag time, which git keeps to the second: first wait until
    the clock has passed the second of the group's newest tag, so the order is unambiguous.
    """
    import gto.api

    newest = max((event["timestamp"].timestamp() for event in gto.api.history(str(root))
                  if event["artifact"] in ARTIFACTS), default=0)
    time.sleep(max(0.0, newest + 1 - time.time()))
    for name in ARTIFACTS:
        # force: a version that held the stage before (a rollback) gets a new tag all the same
        gto.api.assign(str(root), name, stage, version=version, message=message, force=True)


def fetch_release(root: Path, commit: str, dest: Path, paths: tuple[str, ...] | None = None,
                  cache_dir: Path | None = None) -> None:
    """Copy ``paths`` (default: the four model files and COMPANIONS) at ``commit`` into ``dest``; RegistryError
    names the first that cannot be read. ``cache_dir``: an empty cache, so that every file comes from the remote."""
    from dvc.api import DVCFileSystem

    config = {"cache": {"dir": str(cache_dir)}} if cache_dir else None
    try:
        fs = DVCFileSystem(str(root), rev=commit, config=config)
    except Exception as exc:  # DVC raises its own error types for a bad revision or config
        raise RegistryError(f"commit {commit[:7]}: DVC cannot open it ({one_line(exc)})") from None
    for path in paths or (*ARTIFACTS.values(), *COMPANIONS):
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get_file(path, str(target))
        except Exception as exc:  # FileNotFoundError, or DVC's errors for a file in no cache or remote
            raise RegistryError(f"{path} at {commit[:7]} cannot be fetched ({one_line(exc)})") from None
