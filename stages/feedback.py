"""feedback: check that the collected corrections are here, and record what they hold.

In:  data/feedback/ (labels.csv and <sha256>.png, written by
     `python -m mnist_dvc.apps.serve --collect data/feedback`), maybe absent;
     data/feedback.dvc once the collection is versioned (`dvc add data/feedback`).
Out: metrics/feedback.json   {"pictures": N, "per_class": {"0": n, ...}, "labels_sha256": ...}
     /feedback in data/.gitignore, where it is missing: the pictures are
     versioned by DVC, never committed to git by a `git add -A`.

preprocess reads data/feedback but depends on this record instead: a DVC
dependency must exist, and the folder does not in a fresh clone. The record
is in git and names the collection by the sha256 of its sorted labels.csv;
every picture is named by the sha256 of its bytes, so the same record means
the same pictures and labels, and preprocess reruns exactly when they change.
This stage is ``always_changed`` in dvc.yaml, so every `dvc repro` refreshes
the record. Where data/feedback.dvc is committed but its data was not pulled,
it stops with one line instead: training would otherwise go on without the
corrections.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from mnist_dvc.data import FEEDBACK_LABELS, N_CLASSES, format_feedback_labels, missing_feedback, read_feedback_labels
from mnist_dvc.stage import StageError, atomic_path, run_stage, write_json


def dvc_file_of(folder: Path) -> Path:
    """``data/feedback`` -> ``data/feedback.dvc``, the file `dvc add` writes."""
    return folder.with_name(folder.name + ".dvc")


def files_recorded(dvc_file: Path) -> int:
    """The number of files data/feedback.dvc records (``nfiles``); 0 if it does not say."""
    from ruamel.yaml import YAML, YAMLError

    try:
        document = YAML(typ="safe", pure=True).load(dvc_file.read_text(encoding="utf-8"))
        return int(document["outs"][0].get("nfiles", 0))
    except (OSError, UnicodeDecodeError, YAMLError, KeyError, IndexError, TypeError, AttributeError,
            ValueError) as exc:
        raise StageError(f"{dvc_file} is not a `dvc add` file ({exc}); restore it with git") from None


def files_in(folder: Path) -> int:
    """Regular files under ``folder``, at any depth."""
    return sum(1 for path in folder.rglob("*") if path.is_file())


def check_pulled(folder: Path, dvc_file: Path, labels: dict[str, int]) -> None:
    """StageError unless ``folder`` holds at least what ``dvc_file`` records, with every listed picture."""
    absent = (not folder.is_dir() or not (folder / FEEDBACK_LABELS).is_file()
              or missing_feedback(folder, labels) or files_in(folder) < files_recorded(dvc_file))
    if absent:
        raise StageError(f"{dvc_file} is committed but its data is not here: run `dvc pull {dvc_file}`")


def ignore_in_git(folder: Path) -> None:
    """Add ``/<folder name>`` to the .gitignore beside ``folder`` where it is missing, as `dvc add` would."""
    gitignore, entry = folder.parent / ".gitignore", f"/{folder.name}"
    text = gitignore.read_text(encoding="utf-8") if gitignore.exists() else ""
    if entry not in text.splitlines():
        with atomic_path(gitignore) as tmp:
            tmp.write_text(text + ("\n" if text and not text.endswith("\n") else "") + entry + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("data/feedback"))
    parser.add_argument("--record", type=Path, default=Path("metrics/feedback.json"))
    args = parser.parse_args(argv)
    folder, dvc_file = args.folder, dvc_file_of(args.folder)

    if folder.exists() and not folder.is_dir():
        raise StageError(f"{folder} is a file, not a folder of collected pictures: move it away")
    labels = read_feedback_labels(folder)
    if dvc_file.exists():
        check_pulled(folder, dvc_file, labels)
    else:
        missing = missing_feedback(folder, labels)
        if missing:
            raise StageError(f"{folder / FEEDBACK_LABELS} lists {len(missing)} pictures that are not in {folder} "
                             f"(the first: {missing[0]}): remove their lines or restore the files")
        if folder.exists():
            ignore_in_git(folder)
    per_class = [0] * N_CLASSES
    for label in labels.values():
        per_class[label] += 1
    digest = hashlib.sha256(format_feedback_labels(labels).encode()).hexdigest()
    write_json(args.record, {"pictures": len(labels), "per_class": {str(c): n for c, n in enumerate(per_class)},
                             "labels_sha256": digest})
    print(f"{folder}: {len(labels)} corrected pictures")


if __name__ == "__main__":
    run_stage(main)
