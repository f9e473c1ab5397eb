"""Run notebooks/mlp_tutorial.ipynb top to bottom on a project's processed data.

    python notebooks/run_tutorial.py            # `make notebook`: execute it, save it with its outputs
    python notebooks/run_tutorial.py --check    # CI: execute a copy; fail if its key figures differ
                                                # from those of the committed outputs

The project (``data/processed``, ``params.yaml``, ``metrics/``) is this
repository, or the folder named by ``--project`` or ``MNIST_DVC_ROOT``; the
notebook reads the same variable. Any cell that raises fails the run
(nbclient's ``CellExecutionError``). The notebook's last cell, tagged
``key-figures``, prints its key figures as JSON: the committed copy keeps its
outputs (docs/tutorial.md says why), and ``--check`` is what keeps them true.
Needs the ``notebook`` extra: ``pip install -e '.[notebook]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent / "mlp_tutorial.ipynb"
REPO = NOTEBOOK.parent.parent
KEY_FIGURES_TAG = "key-figures"
# What the issue promises a learner sees (docs/tutorial.md).
PROMISED = {
    "parameters_784_128_64_10": lambda v: v == 109_386,
    "skorch_nllloss_train_loss": lambda v: v == "nan",
    "skorch_crossentropy_test_accuracy": lambda v: v >= 0.97,
    "train_stage_matches_metrics": lambda v: v is True,
}
# How far an accuracy may move when the committed outputs come from a CPU whose torch has other
# kernels (below AVX2, or another architecture): the pinned numerics make every x86-64 CPU with AVX2 equal.
CROSS_CPU_TOLERANCE = 0.003


def missing_data(project: Path) -> str | None:
    """A one-line message if the project has no processed training split, else None."""
    processed = project / "data" / "processed"
    if (processed / "train_images.npy").exists():
        return None
    return f"{processed}: no processed data; run `make repro` (or `dvc pull`) in {project} first"


def execute(notebook, project: Path, timeout: float = 600):
    """Execute ``notebook`` (a NotebookNode) in the notebooks folder with ``MNIST_DVC_ROOT=project``.

    Raises nbclient's CellExecutionError at the first cell that fails.
    """
    from nbclient import NotebookClient

    # record_timing=False: no execution timestamps, so a rerun changes only what the cells print.
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    executed = client.execute(env={**os.environ, "MNIST_DVC_ROOT": str(project)})
    coalesce_streams(executed)
    return executed


def coalesce_streams(notebook) -> None:
    """Join each cell's consecutive stdout (or stderr) outputs into one, as Jupyter shows them.

    The kernel sends a cell's prints in as many messages as the timing makes:
    without this, a rerun that prints the same text stores it split differently.
    """
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.outputs:
            previous = outputs[-1] if outputs else None
            if (previous is not None and output.output_type == "stream" and previous.output_type == "stream"
                    and previous.name == output.name):
                previous.text += output.text
            else:
                outputs.append(output)
        cell.outputs = outputs


def key_figures(notebook) -> dict:
    """The JSON printed by the cell tagged ``key-figures``; ValueError if there is none."""
    for cell in notebook.cells:
        if KEY_FIGURES_TAG in cell.get("metadata", {}).get("tags", []):
            text = "".join(out.get("text", "") for out in cell.get("outputs", []) if out.output_type == "stream")
            if text.strip():
                return json.loads(text)
            raise ValueError(f"{NOTEBOOK}: the {KEY_FIGURES_TAG} cell has no output (run `make notebook`)")
    raise ValueError(f"{NOTEBOOK}: no cell tagged {KEY_FIGURES_TAG}")


def compare(committed: dict, fresh: dict) -> list[str]:
    """One line per key figure of the fresh run that differs from the committed one, or breaks a promise.

    Same torch kernels (``cpu_capability``, AVX2 on every x86-64 CPU under the
    pinned numerics): every figure must be equal. With others (a CPU below AVX2,
    another architecture), sums round differently and accuracies may move in
    the last digits: those may differ by ``CROSS_CPU_TOLERANCE``.
    """
    same_cpu = committed.get("cpu_capability") == fresh.get("cpu_capability")
    problems = []
    for key in sorted((set(committed) | set(fresh)) - {"cpu_capability"}):
        old, new = committed.get(key), fresh.get(key)
        floats = isinstance(old, float) and isinstance(new, float)
        if old != new and (same_cpu or not floats or abs(old - new) > CROSS_CPU_TOLERANCE):
            problems.append(f"{key}: committed {old!r}, now {new!r}")
    problems += [f"{key}: {fresh.get(key)!r} is not what the tutorial promises"
                 for key, holds in PROMISED.items() if key not in fresh or not holds(fresh[key])]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path(os.environ.get("MNIST_DVC_ROOT", REPO)),
                        help="the project folder whose data/processed, params.yaml and metrics/ it reads "
                             "(default: $MNIST_DVC_ROOT, else this repository)")
    parser.add_argument("--check", action="store_true",
                        help="execute a copy; exit 1 if its key figures differ from the committed outputs'")
    args = parser.parse_args(argv)
    project = args.project.resolve()
    problem = missing_data(project)
    if problem:
        print(problem, file=sys.stderr)
        return 1

    import nbformat
    from nbclient.exceptions import CellExecutionError

    from mnist_dvc.stage import atomic_path

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    try:
        committed = key_figures(notebook) if args.check else None
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        executed = execute(notebook, project)
    except CellExecutionError as exc:
        print(exc, file=sys.stderr)
        print(f"{NOTEBOOK}: a cell failed (above); nothing was written", file=sys.stderr)
        return 1
    fresh = key_figures(executed)
    print(json.dumps(fresh, indent=1))
    if not args.check:
        with atomic_path(NOTEBOOK) as tmp:
            nbformat.write(executed, tmp)
        print(f"{NOTEBOOK.relative_to(REPO)}: executed and saved with its outputs")
        return 0
    problems = compare(committed, fresh)
    for line in problems:
        print("FAIL:", line, file=sys.stderr)
    if problems:
        print(f"{NOTEBOOK.relative_to(REPO)}: its committed outputs are stale; run `make notebook` on the real "
              f"data and commit it", file=sys.stderr)
        return 1
    print(f"{NOTEBOOK.relative_to(REPO)}: the committed key figures hold")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # mnist_dvc from this checkout (it is not installed)
    sys.exit(main())
