"""feedback: check the corrections collected in the web app, and count them.

In:  data/feedback/ (in git; pictures/ from `serve --collect`, maybe absent); ``preprocess.feedback.holdout``.
Out: metrics/feedback.json   {"pictures": N, "held_out": K}

DVC reruns it, and preprocess, exactly when data/feedback changes (docs/feedback.md,
"In the pipeline"). Where pictures.dvc is committed but its data was not pulled, it
stops with one line: training would otherwise go on without the corrections.
"""

from __future__ import annotations

from pathlib import Path

from mnist_dvc.data import FEEDBACK_LABELS, feedback_held_out, missing_feedback, read_feedback_labels
from mnist_dvc.params import load_section
from mnist_dvc.stage import StageError, parse_paths, run_stage, write_json


def files_recorded(dvc_file: Path) -> int:
    """The number of files a `dvc add` file records (``nfiles``); 0 if it does not say."""
    from ruamel.yaml import YAML, YAMLError

    try:
        return int(YAML(typ="safe", pure=True).load(dvc_file.read_text(encoding="utf-8"))["outs"][0].get("nfiles", 0))
    except (OSError, UnicodeDecodeError, YAMLError, KeyError, IndexError, TypeError, AttributeError,
            ValueError) as exc:
        raise StageError(f"{dvc_file} is not a `dvc add` file ({exc}); restore it with git") from None


def check_pulled(folder: Path, missing: list[str]) -> None:
    """StageError where ``folder``'s .dvc file is committed but its files are not all here.

    By then `dvc repro` has recorded the folder as it found it in the .dvc file
    ("Verifying data sources"), so the way back is git's copy, then the pull.
    """
    dvc_file = folder.with_name(folder.name + ".dvc")
    if not dvc_file.exists():
        return
    present = sum(1 for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0
    if not (folder / FEEDBACK_LABELS).is_file() or missing or present < files_recorded(dvc_file):
        raise StageError(f"{dvc_file} is committed but its data is not here: run "
                         f"`git checkout {dvc_file} && dvc pull {dvc_file}`")


def main(argv: list[str] | None = None) -> None:
    args = parse_paths(__doc__, argv, folder="data/feedback/pictures", record="metrics/feedback.json")
    holdout = load_section("preprocess").feedback.holdout
    folder = args.folder

    if folder.exists() and not folder.is_dir():
        raise StageError(f"{folder} is a file, not a folder of collected pictures: move it away")
    labels = read_feedback_labels(folder)
    missing = missing_feedback(folder, labels)
    check_pulled(folder, missing)
    if missing:
        raise StageError(f"{folder / FEEDBACK_LABELS} lists {len(missing)} pictures that are not in {folder} "
                         f"(the first: {missing[0]}): remove their lines or restore the files")
    held_out = sum(feedback_held_out(name, holdout) for name in labels)
    write_json(args.record, {"pictures": len(labels), "held_out": held_out})
    line = f"{folder}: {len(labels)} corrected pictures, {held_out} held out as the feedback test split"
    if labels and not held_out:
        line += (f" (a picture is held out where its content hash falls in the first {holdout:.0%}: "
                 f"feedback_accuracy appears once one does, usually within the first {round(3 / holdout)})")
    print(line)
    if labels and not folder.with_name(folder.name + ".dvc").exists():
        print(f"{folder} is not versioned yet: `dvc add {folder}` (docs/feedback.md)")


if __name__ == "__main__":
    run_stage(main)
