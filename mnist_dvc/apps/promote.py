"""promote: register a trained revision as a version, gate it, and move a stage to it.

    python -m mnist_dvc.apps.promote REV [--stage prod] [--force --message WHY]
    python -m mnist_dvc.apps.promote --rollback [VERSION] [--stage prod] [--message WHY]
    make promote REV=HEAD        make rollback

REV is a commit, branch, tag or DVC experiment (first made the branch ``promote/<name>``:
a version is a git tag, and a tag needs a commit). The four artifacts are registered as
one version, then checked (lock, fetch/push, onnx, metrics; accuracy and feedback against
the stage's version, with a comparison report): docs/registry.md has the table. The stage
moves only if every check passes, or with ``--force --message WHY``, recorded in the tags.

Exit status: 0 promoted; 1 refused by the gate (one ``failed:`` line per check); 2 a usage or registry error.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from gto.constants import name_re
from gto.exceptions import GTOException
from ruamel.yaml import YAML

from mnist_dvc.apps.registry import (ARTIFACTS, LEAD, RegistryError, Release, assign_group, fetch_release, one_line,
                                     register_group, release_in_stage, release_of, sha256_of, stage_history)
from mnist_dvc.params import load_section
from mnist_dvc.stage import StageError

MODELS = ("manual", "skorch")  # the keys of metrics/evaluate.json and metrics/export.json
MODEL_STAGES = ("train", "fit", "evaluate", "export")  # the stages that make the artifacts and their metrics
ONNX_MAX_ABS_DIFF = 1e-4  # the export stage's own bound (stages/export.py)


def git(root: Path, *args: str) -> bytes | None:
    """The stdout of ``git args`` in ``root``, None where git fails (no such revision or file)."""
    result = subprocess.run(["git", *args], cwd=root, capture_output=True)
    return result.stdout if result.returncode == 0 else None


def resolve_commit(root: Path, rev: str) -> str | None:
    """The full hash of the commit ``rev`` names, None where git knows no such revision."""
    commit = git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    return commit.decode().strip() if commit else None


def json_at(root: Path, commit: str, path: str) -> dict | None:
    text = git(root, "show", f"{commit}:{path}")
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def candidate_commit(root: Path, rev: str) -> str:
    """The commit REV names; an experiment becomes the branch ``promote/<name>`` first. Raises RegistryError."""
    commit = resolve_commit(root, rev)
    if commit:
        return commit
    branch = f"promote/{rev}"
    result = subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "branch", rev, branch],
                            cwd=root, capture_output=True, text=True)
    commit = resolve_commit(root, branch) if result.returncode == 0 else None
    if not commit:
        raise RegistryError(f"{rev!r} is neither a git revision nor a DVC experiment (git log, dvc exp show)")
    print(f"experiment {rev} is now the branch {branch} ({commit[:7]})")
    return commit


# --- the checks: each returns the lines of what failed -------------------------------------

def check_lock(root: Path, commit: str) -> list[str]:
    """The commit's dvc.lock records, for each model stage, the commit's code, params and metrics."""
    text = git(root, "show", f"{commit}:dvc.lock")
    if text is None:
        return [f"lock: {commit[:7]} has no dvc.lock: run `dvc repro` and commit its results"]
    yaml = YAML(typ="safe", pure=True)  # YAML 1.2, as DVC reads params.yaml and writes dvc.lock
    stages = (yaml.load(text) or {}).get("stages", {})
    params = yaml.load(git(root, "show", f"{commit}:params.yaml") or b"") or {}
    # What one stage wrote, as the stages that read it recorded it: a model retrained but not evaluated differs.
    made = {entry["path"]: entry.get("md5") for stage in stages.values() for entry in stage.get("outs", [])}
    failed = []
    for name in MODEL_STAGES:
        stage = stages.get(name)
        if stage is None:
            failed.append(f"lock: dvc.lock at {commit[:7]} has no stage {name}: run `dvc repro` and commit")
            continue
        files = [entry for entry in [*stage.get("deps", []), *stage.get("outs", [])] if "md5" in entry]
        stale = [entry["path"] for entry in files if not entry["md5"].endswith(".dir")
                 and (blob := git(root, "show", f"{commit}:{entry['path']}")) is not None
                 and hashlib.md5(blob).hexdigest() != entry["md5"]]
        stale += [entry["path"] for entry in stage.get("deps", [])
                  if entry["path"] in made and made[entry["path"]] != entry.get("md5")]
        stale += [key for key, value in (stage.get("params") or {}).get("params.yaml", {}).items()
                  if lookup(params, key) != value]
        if stale:
            failed.append(f"lock: {name} in dvc.lock at {commit[:7]} does not match {', '.join(stale[:3])}: "
                          "run `dvc repro` and commit dvc.lock with its results")
    missing = [path for path in ARTIFACTS.values() if path not in made]
    if missing:
        failed.append(f"lock: dvc.lock at {commit[:7]} has no output {', '.join(missing)}: run `dvc repro` and commit")
    return failed


def lookup(params: dict, dotted: str):
    """``params["a"]["b"]`` for "a.b" (a whole section for "a"), None where absent."""
    for part in dotted.split("."):
        params = params.get(part) if isinstance(params, dict) else None
    return params


def check_onnx(export: dict | None, commit: str) -> list[str]:
    """Each ONNX copy's argmax agrees everywhere and its logits within the export stage's bound (export.json
    records either the difference measured, ``max_abs_diff``, or the bound checked, ``max_abs_diff_allowed``)."""
    if export is None:
        return [f"onnx: {commit[:7]} has no metrics/export.json: run `dvc repro export` and commit"]
    failed = []
    for name in MODELS:
        parity = export.get(name) or {}
        agreement = parity.get("argmax_agreement")
        diff = parity.get("max_abs_diff", parity.get("max_abs_diff_allowed"))
        if agreement != 1.0 or not isinstance(diff, (int, float)) or not diff <= ONNX_MAX_ABS_DIFF:
            failed.append(f"onnx: {name}'s ONNX copy disagrees with PyTorch (argmax agreement {agreement}, "
                          f"largest logit difference {diff}, at most {ONNX_MAX_ABS_DIFF:g} allowed)")
    return failed


def check_metrics(evaluate: dict | None, commit: str) -> list[str]:
    if evaluate is None:
        return [f"metrics: {commit[:7]} has no metrics/evaluate.json: run `dvc repro` and commit"]
    return [f"metrics: {commit[:7]}'s metrics/evaluate.json has no {name}.accuracy" for name in MODELS
            if not isinstance((evaluate.get(name) or {}).get("accuracy"), (int, float))]


def check_against(candidate: dict, current: dict, current_version: str, max_drop: float) -> list[str]:
    """The candidate's metrics against the stage's version: accuracy within max_drop, feedback not lower."""
    failed = []
    for name in MODELS:
        new, old = candidate.get(name) or {}, current.get(name) or {}
        if isinstance(old.get("accuracy"), (int, float)) and new["accuracy"] < old["accuracy"] - max_drop - 1e-12:
            failed.append(f"accuracy: {name} {new['accuracy']:.4f} is {old['accuracy'] - new['accuracy']:.4f} below "
                          f"{current_version}'s {old['accuracy']:.4f} (promote.max_drop {max_drop:g})")
        if "feedback_accuracy" in new and "feedback_accuracy" in old \
                and new["feedback_accuracy"] < old["feedback_accuracy"]:
            failed.append(f"feedback: {name} feedback_accuracy {new['feedback_accuracy']:.4f} is below "
                          f"{current_version}'s {old['feedback_accuracy']:.4f}")
    return failed


def check_fetch(root: Path, commit: str) -> tuple[list[str], dict[str, str]]:
    """The four files read at ``commit`` (and from the remote alone where one is configured); their sha256."""
    from dvc.repo import Repo

    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        try:
            fetch_release(root, commit, Path(tmp) / "files", paths=tuple(ARTIFACTS.values()))
        except RegistryError as exc:
            return [f"fetch: {exc}: `dvc repro` or `dvc pull` it"], {}
        hashes = {path: sha256_of(Path(tmp) / "files" / path) for path in ARTIFACTS.values()}
        with Repo(str(root)) as repo:
            remote = repo.config["core"].get("remote")  # the one `dvc push` uses
        if remote:
            try:
                fetch_release(root, commit, Path(tmp) / "remote", paths=tuple(ARTIFACTS.values()),
                              cache_dir=Path(tmp) / "empty-cache")
            except RegistryError as exc:
                return [f"push: not on the DVC remote {remote!r}: {exc}: run `dvc push`"], hashes
    return [], hashes


def write_report(root: Path, base: Release, version: str) -> list[str]:
    """The comparison report of the stage's version and the candidate, by their version tags."""
    from mnist_dvc.apps import report

    out = Path("reports") / f"promote-{LEAD}-{version}"
    revisions = [f"{LEAD}@{base.version}", f"{LEAD}@{version}"]
    written = root / out / "report.html"
    # A version is one commit for good: the same two tags give the same report (--force after a refusal).
    if not (written.is_file() and all(name in written.read_text(errors="replace") for name in revisions)):
        with contextlib.chdir(root), contextlib.redirect_stdout(io.StringIO()):  # its one line: promote prints its own
            status = report.main([*revisions, "--out", str(out)])
        if status != 0:
            return [f"report: could not write {out} (exit {status}; its error is above)"]
    print(f"comparison with {base.version}: {written}")
    return []


def promote(root: Path, rev: str, stage: str, force: bool, message: str | None) -> int:
    """Register, check, report and (if allowed) assign; the exit status."""
    limit = load_section("promote", root / "params.yaml").max_drop  # the workspace's: no candidate loosens its gate
    commit = candidate_commit(root, rev)
    current = release_in_stage(root, stage)
    evaluate = json_at(root, commit, "metrics/evaluate.json")
    failed = check_lock(root, commit) + check_metrics(evaluate, commit)
    failed += check_onnx(json_at(root, commit, "metrics/export.json"), commit)
    fetch_failed, hashes = check_fetch(root, commit)
    failed += fetch_failed
    version = register_group(root, commit, hashes)
    print(f"registered {', '.join(ARTIFACTS)} {version} at {commit[:7]}")
    base = current if current and current.commit != commit else None
    if base and evaluate is not None:
        old = json_at(root, base.commit, "metrics/evaluate.json") or {}
        failed += check_against(evaluate, old, base.version, limit)
    if current and current.commit == commit and not force:
        print(f"{version} is already in {stage}: nothing to do")
        return 0
    # A first promotion has nothing to be compared with; a candidate whose own build fails its
    # checks (a stale lock, files that cannot be fetched) has no results worth comparing.
    if base and not any(line.startswith(("lock:", "metrics:", "fetch:")) for line in failed):
        failed += write_report(root, base, version)
    if failed and not force:
        for line in failed:
            print(f"failed: {line}", file=sys.stderr)
        print(f"not promoted: {version} stays out of {stage}" + (f" ({current.version} stays)" if current else "")
              + "; fix the above, or override with --force --message WHY", file=sys.stderr)
        return 1
    against = f"against {base.version}" if base else "first promotion"
    note = f"Promote {version} ({commit[:7]}) to {stage}: gate {'passed' if not failed else 'FORCED'} ({against})"
    if force:
        note += f"\n\nforced: {message}" + "".join(f"\nfailed: {line}" for line in failed)
    assign_group(root, version, stage, note)
    print(f"{stage}: {version} ({commit[:7]})" + (f", was {current.version}" if current else "")
          + (" (forced)" if failed else ""))
    return 0


def rollback(root: Path, stage: str, version: str | None, message: str | None) -> int:
    """Assign ``stage`` to ``version``, default the one it held before the current one."""
    current = release_in_stage(root, stage)
    if version is None:
        earlier = [v for v in stage_history(root, stage) if not current or v != current.version]
        if not earlier:
            raise RegistryError(f"stage {stage!r} has held no other version to roll back to (gto show)")
        version = earlier[0]
    target = release_of(root, version)
    if current and current.version == version:
        raise RegistryError(f"{version} is already in {stage}")
    with tempfile.TemporaryDirectory(prefix="rollback-") as tmp:
        fetch_release(root, target.commit, Path(tmp), paths=tuple(ARTIFACTS.values()))  # can it still be served?
    note = (f"Roll back {stage} to {version} ({target.commit[:7]})"
            + (f" from {current.version}" if current else "") + (f"\n\n{message}" if message else ""))
    assign_group(root, version, stage, note)
    print(f"{stage}: {version} ({target.commit[:7]})" + (f", was {current.version}" if current else ""))
    return 0


def stage_name(text: str) -> str:
    """argparse type: a name GTO takes for a stage (letters, digits, - _ /; a letter or digit at each end)."""
    if not name_re.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a stage name GTO takes (e.g. prod, staging)")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_dvc.apps.promote", description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", metavar="REV",
                        help="commit, branch, tag or DVC experiment to promote; with --rollback, the version "
                             "to go back to (default: the one the stage held before)")
    parser.add_argument("--stage", default="prod", type=stage_name, help="the stage to move (default: prod)")
    parser.add_argument("--force", action="store_true", help="assign even if checks fail (needs --message)")
    parser.add_argument("--message", metavar="WHY", help="why: recorded in the stage tags' annotation")
    parser.add_argument("--rollback", action="store_true", help="move the stage back to an earlier version")
    parser.add_argument("--root", type=Path, default=Path("."), metavar="DIR",
                        help="the project's git repository (default: .)")
    args = parser.parse_args(argv)
    if args.force and not (args.message or "").strip():
        parser.error("--force needs --message WHY: the reason is recorded in the tags")
    if not args.rollback and not args.rev:
        parser.error("REV is required (a commit, branch, tag or experiment), or --rollback")
    root = args.root.resolve()
    try:
        if args.rollback:
            return rollback(root, args.stage, args.rev, args.message)
        return promote(root, args.rev, args.stage, args.force, args.message)
    except (RegistryError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GTOException as exc:  # gto's own errors (a bad stage name, a tag that exists)
        print(f"error: gto: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
