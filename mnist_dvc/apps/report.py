"""report: compare revisions and experiments on one page that opens offline (docs/experiments.md).

    python -m mnist_dvc.apps.report [REV ...] [--out DIR]
    make report REVS="HEAD exp-a exp-b"

Reads each REV through DVC's public API only: nothing is checked out, nothing trains. Exit status 2 (one line on
stderr, nothing written) for a revision DVC cannot resolve, one without the pipeline's results, or a bad --out.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import dvc.api
import numpy as np
import yaml
from dvc.exceptions import DvcException
from jinja2 import Environment, PackageLoader, select_autoescape

from mnist_dvc.data import N_CLASSES, confusion_counts, load_stored_split
from mnist_dvc.figures import plt, png_bytes  # pyplot, headless (Agg and the font), for deterministic PNGs
from mnist_dvc.stage import StageError, atomic_dir

WORKSPACE = "workspace"
MODELS = {"manual": "explicit loop (train)", "skorch": "skorch (fit)"}
TRAININGS = {"train": "metrics/train", "fit": "metrics/fit"}  # stage -> its DVCLive folder
REQUIRED = ["params.yaml", "metrics/evaluate.json", "metrics/predictions/manual.csv", "metrics/predictions/skorch.csv",
            "metrics/train/plots/metrics/train/loss.tsv", "metrics/fit/plots/metrics/train/loss.tsv"]
# Every number in these files is shown, whatever its key (a new metric appears by itself).
METRIC_FILES = {"metrics/evaluate.json": "both trainings on the test set (evaluate stage)",
                "metrics/tune.json": "the grid search's best mean CV accuracy and its point (tune stage)",
                "metrics/export.json": "the ONNX copies against PyTorch: argmax agreement, largest logit "
                                       "difference, size, speed (export stage)"}
# named_revisions' kinds, singular; experiments last: a branch or tag is named without `dvc exp show`, the slow one
KINDS = {"branches": "branch", "tags": "tag", "experiments": "experiment"}
MAX_DIGITS = 24  # pictures per group of changed digits
DPI = 90
REPORT_FILES = ("report.html", "report.md")


class ReportError(Exception):
    """A revision or an option the user can fix; the message says which, in one line."""


@dataclass
class Revision:
    """What the report reads from one revision."""

    name: str
    label: str = ""
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, object]] = field(default_factory=dict)  # file -> {"manual.accuracy": value}
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # curve -> training
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # model -> actual, predicted


# --- reading one revision through DVC --------------------------------------------------

def project_root(start: Path) -> Path:
    """The nearest folder at or above ``start`` that holds ``.dvc/``."""
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise ReportError(f"{start} is not inside a DVC project (no .dvc/ folder above it); run the report from one")


@functools.cache  # main clears it: every label and error line of one report uses the same listing
def named_revisions(root: Path, kind: str) -> list[str]:
    """The branches, tags or HEAD's experiments (as ``dvc exp show`` lists them), sorted."""
    if kind == "experiments":
        return sorted(row["Experiment"] for row in dvc.api.exp_show(repo=str(root))
                      if row["Experiment"] and row["typ"] != "baseline")
    return sorted(dvc.api.all_branches(str(root)) if kind == "branches" else dvc.api.all_tags(str(root)))


def existing_revisions(root: Path) -> str:
    """``revisions here: workspace; branches main; experiments exp-a, exp-b`` for an error line."""
    listed = [f"{kind} {', '.join(names[:12])}" + (f" and {len(names) - 12} more" if len(names) > 12 else "")
              for kind in KINDS if (names := named_revisions(root, kind))]
    return f"revisions here: {'; '.join([WORKSPACE, *listed])} (or any commit)"


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """Nested dicts as ``{"a.b": leaf}``; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {path: leaf for key, value in tree.items()
            for path, leaf in flatten(value, f"{prefix}.{key}" if prefix else str(key)).items()}


def read_metrics(fs, name: str) -> dict[str, dict[str, object]]:
    """METRIC_FILES and every metrics file the revision's dvc.yaml names: file -> {"manual.accuracy": value}.
    Read as files: ``dvc.api.metrics_show`` merges them and drops lists (docs/experiments.md)."""
    pipeline = (yaml.safe_load(fs.read_text("dvc.yaml")) or {}) if fs.isfile("dvc.yaml") else {}
    entries = [*(pipeline.get("metrics") or []), *(entry for stage in (pipeline.get("stages") or {}).values()
                                                   if isinstance(stage, dict) for entry in stage.get("metrics") or [])]
    declared = [entry if isinstance(entry, str) else next(iter(entry), None) for entry in entries]
    metrics = {}
    for path in dict.fromkeys([*METRIC_FILES, *(path for path in declared if isinstance(path, str))]):
        if fs.isfile(path):
            try:
                text = fs.read_text(path, encoding="utf-8")
                metrics[path] = flatten(json.loads(text) if path.endswith(".json") else yaml.safe_load(text))
            except (ValueError, yaml.YAMLError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise ReportError(f"{name}:{path} is not valid JSON or YAML") from None
    return metrics


def read_revision(root: Path, name: str) -> Revision:
    """Everything the report shows of revision ``name``, read through ``dvc.api``."""
    rev = None if name == WORKSPACE else name
    try:
        fs = dvc.api.DVCFileSystem(str(root), rev=rev)
        commit = fs.repo.get_rev()  # opens the revision: an unknown one fails here (fs.exists would say False)
    except DvcException as exc:
        raise ReportError(f"unknown revision {name!r} ({exc}); {existing_revisions(root)}") from None
    try:
        missing = [path for path in REQUIRED if not fs.isfile(path)]
        if missing:
            raise ReportError(f"revision {name!r} has no {', '.join(missing)}: it has no results of the pipeline "
                              f"(dvc repro or dvc exp run makes them); {existing_revisions(root)}")
        kind = next((KINDS[kind] for kind in KINDS if name in named_revisions(root, kind)), "commit")
        revision = Revision(name, f"on {commit[:7]}" if name == WORKSPACE else f"{kind} {commit[:7]}")
        revision.params = {key: json.dumps(value) if isinstance(value, list) else str(value)
                           for key, value in flatten(dvc.api.params_show(repo=str(root), rev=rev)).items()}
        revision.metrics = read_metrics(fs, name)
        for training, folder in TRAININGS.items():
            plots = f"{folder}/plots/metrics"
            for path in sorted(p for p in fs.find(plots) if p.endswith(".tsv")):
                curve = path[len(plots) + 1:-len(".tsv")]  # e.g. train/loss, val/accuracy
                try:  # step<TAB>value, under a header (no rows: no curve); UnicodeDecodeError is a ValueError
                    rows = fs.read_text(path, encoding="utf-8").splitlines()[1:]
                    table = np.loadtxt(rows, delimiter="\t", ndmin=2) if rows else np.zeros((0, 2))
                    revision.curves.setdefault(curve, {})[training] = table[:, 0].astype(int), table[:, 1]
                except (ValueError, IndexError):  # IndexError: one column
                    raise ReportError(f"{name}:{path} is not DVCLive's step<TAB>value table") from None
        for model in MODELS:
            path = f"metrics/predictions/{model}.csv"
            try:  # actual,predicted, under a header (no rows: refused below, with no numpy warning before)
                rows = fs.read_text(path, encoding="utf-8").splitlines()[1:]
                table = np.loadtxt(rows, delimiter=",", dtype=np.int64, ndmin=2) if rows else np.zeros((0, 0), np.int64)
            except ValueError:
                table = np.zeros((0, 0), np.int64)
            if table.shape[1:] != (2,) or table.size == 0 or table.min() < 0 or table.max() >= N_CLASSES:
                raise ReportError(f"{name}:{path} is not the evaluate stage's actual,predicted CSV of digits 0-9")
            revision.predictions[model] = table[:, 0], table[:, 1]
        return revision
    except DvcException as exc:
        raise ReportError(f"revision {name!r} cannot be read: {exc}") from None
    finally:
        fs.close()


# --- comparing ----------------------------------------------------------------------------

def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(value, signed: bool = False) -> str:
    """4 decimals, as ``dvc exp show`` prints metrics; tiny values in scientific notation; integers whole."""
    kind = "d" if isinstance(value, int) else ".3g" if value != 0 and abs(value) < 0.001 else ".4f"
    return format(value, ("+" if signed else "") + kind)


def metric_rows(revisions: list[Revision], path: str) -> list[list[Cell]]:
    """Per key of the metrics file ``path``: the key, then each revision's value and difference from the baseline."""
    rows = []
    for key in dict.fromkeys(key for revision in revisions for key in revision.metrics.get(path, {})):
        values = [revision.metrics.get(path, {}).get(key) for revision in revisions]
        base = values[0]
        rows.append([Cell(key)] + [
            Cell(number(v) if is_number(v) else "-" if v is None else json.dumps(v),
                 ("±0" if v == base else number(v - base, signed=True)) if i and is_number(v) and is_number(base)
                 else "", {"rev": revision.name, "file": path, "key": key})
            for i, (revision, v) in enumerate(zip(revisions, values))])
    return rows


def model_groups(revisions: list[Revision]) -> dict[str, str]:
    """Column title -> model: one column, "both models", when the two trainings predict alike everywhere
    (the default: they learn bit-identical weights), else one per model."""
    if all(np.array_equal(r.predictions["manual"][1], r.predictions["skorch"][1]) for r in revisions):
        return {"both models": "manual"}
    return {title: model for model, title in MODELS.items()}


# --- drawing: fixed margins, as tight_layout is slower (docs/performance.md) --------------------

def curves_png(revisions: list[Revision]) -> bytes:
    """One panel per curve (train/loss first), every revision on the same axes; skorch dashed."""
    names = sorted({curve for r in revisions for curve in r.curves}, key=lambda c: (c != "train/loss", c))
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.4), squeeze=False)
    for ax, curve in zip(axes[0], names):
        for i, revision in enumerate(revisions):
            for training, (steps, values) in revision.curves.get(curve, {}).items():  # in TRAININGS' order
                ax.plot(steps + 1, values, "-" if training == "train" else "--", color=f"C{i % 10}", marker="o",
                        markersize=3, label=f"{revision.name} · {training}")
        ax.set(title=curve, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.subplots_adjust(left=0.08 / len(names), right=0.99, bottom=0.15, top=0.91, wspace=0.22)
    return png_bytes(fig, DPI)


def matrices_png(panels: list[list[tuple[str, np.ndarray]]], change: bool = False) -> bytes:
    """Rows of 10x10 confusion-matrix panels, ``(title, matrix)`` each, on one colour scale: counts in blue or,
    with ``change``, differences from the baseline (red more, blue fewer)."""
    top = max(1, max(int(abs(matrix).max()) for row in panels for _, matrix in row))
    rows, columns = len(panels), len(panels[0])
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns + 0.4, 4.0 * rows), squeeze=False)
    for ax, (title, matrix) in zip(axes.flat, (panel for row in panels for panel in row)):
        ax.imshow(matrix, cmap="RdBu_r" if change else "Blues", vmin=-top if change else 0, vmax=top)
        for (t, p), value in np.ndenumerate(matrix):
            if value:
                ax.text(p, t, f"{value:+d}" if change else str(value), ha="center", va="center", fontsize=6,
                        color="white" if value > top / 2 and not change else "black")
        ax.set_title(title, fontsize=9)
        ax.set(xticks=range(N_CLASSES), yticks=range(N_CLASSES), xlabel="predicted", ylabel="true")
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.12 / rows, top=1 - 0.08 / rows, wspace=0.2, hspace=0.3)
    return png_bytes(fig, DPI)


def digits_png(images: np.ndarray, indices: np.ndarray, actual, before, after) -> bytes:
    """Up to MAX_DIGITS test images, 12 a row, each captioned ``#index true: before→after``, as one mosaic on one
    axes (a subplot per digit costs more than drawing the digits)."""
    shown = indices[:MAX_DIGITS]
    columns = min(12, len(shown))
    rows = math.ceil(len(shown) / columns)
    cell = images.shape[1] + 4  # pixels, a white margin around each digit
    caption = 12  # pixels of room for the caption above each digit
    mosaic = np.zeros((rows * (cell + caption), columns * cell), np.uint8)
    fig, ax = plt.subplots(figsize=(1.0 * columns, 1.3 * rows))
    for k, i in enumerate(shown):
        top, left = (k // columns) * (cell + caption) + caption + 2, (k % columns) * cell + 2
        mosaic[top:top + images.shape[1], left:left + images.shape[2]] = images[i]
        ax.text(left + images.shape[2] / 2, top - 2, f"#{i} {actual[i]}: {before[i]}→{after[i]}",
                ha="center", va="bottom", fontsize=7)
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01)
    return png_bytes(fig, DPI)


# --- the document: typed parts, rendered by templates/report.html and report.md ---------------

@dataclass
class Cell:
    """A table cell: its value, the value's difference from the baseline, and data-* attributes for the page."""

    value: str
    diff: str = ""
    data: dict[str, str] = field(default_factory=dict)


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""  # the line above the table


@dataclass
class Figure:
    file_name: str
    png: bytes
    caption: str


@dataclass
class Section:
    """A heading, then its parts in order: paragraphs (str), tables and figures."""

    title: str
    parts: list[str | Table | Figure] = field(default_factory=list)


def confusion_changes(revisions: list[Revision]) -> list[str | Figure]:
    """Each revision's confusion matrices minus the baseline's: drawn, then the cells that changed most in words."""
    groups = model_groups(revisions)
    base = {who: confusion_counts(*revisions[0].predictions[model]) for who, model in groups.items()}
    panels, words = [], []
    for revision in revisions[1:]:
        panels.append([])
        for who, model in groups.items():
            counts = confusion_counts(*revision.predictions[model])
            change = counts - base[who]
            np.fill_diagonal(change, 0)
            panels[-1].append((f"{revision.name} minus {revisions[0].name} · {who}", change))
            cells = sorted(zip(*np.nonzero(change)), key=lambda cell: (-abs(change[cell]), cell))[:6]
            changes = [f"{t} read as {p}: {base[who][t, p]} → {counts[t, p]} ({change[t, p]:+d})" for t, p in cells]
            words.append(f"{revision.name}, {who}, the errors that changed most: {'; '.join(changes) or 'none'}.")
    return [Figure("confusion-changes.png", matrices_png(panels, change=True),
                   f"Errors per cell minus {revisions[0].name}'s: red more, blue fewer"), *words]


def changed_digits(root: Path, revisions: list[Revision]) -> list[str | Figure]:
    """Per model, the test digits each revision reads differently from the baseline: pictures, else indices and why."""
    base, parts, listed = revisions[0], [], False
    try:
        images, labels = load_stored_split(root / "data" / "processed", "test")
        why_not = ""
        if not np.array_equal(labels, base.predictions["manual"][0]):
            images, why_not = None, (f"No pictures: the workspace's test split ({len(labels)} images) is not the one "
                                     f"{base.name} was evaluated on ({len(base.predictions['manual'][0])} images); "
                                     "indices instead.")
    except StageError as exc:
        images, why_not = None, f"No pictures: {exc}; `dvc pull` or `dvc repro preprocess` brings the test images back."
    for i, revision in enumerate(revisions[1:], start=1):
        for who, model in model_groups([base, revision]).items():
            actual, before = base.predictions[model]
            after = revision.predictions[model][1]
            for kind, was, chosen in (("now right", "wrong", (before != actual) & (after == actual)),
                                      ("now wrong", "right", (before == actual) & (after != actual))):
                indices = np.flatnonzero(chosen)
                heading = f"{revision.name} vs {base.name}, {who}: {len(indices)} test digits {kind} (were {was})"
                more = len(indices) > MAX_DIGITS
                if not len(indices):
                    parts.append(heading + ".")
                elif images is None:
                    listed = True
                    parts.append(f"{heading}: test indices {', '.join(map(str, indices[:MAX_DIGITS]))}"
                                 f"{' …' if more else ''}.")
                else:
                    parts.append(Figure(f"digits-{i}-{model}-{kind.replace(' ', '-')}.png",
                                        digits_png(images, indices, actual, before, after),
                                        f"{heading}{f', the first {MAX_DIGITS}' if more else ''}; each is #index "
                                        f"true digit: {base.name}'s → {revision.name}'s"))
    return [why_not, *parts] if listed else parts


def build(root: Path, revisions: list[Revision]) -> tuple[str, list[Section]]:
    names = [r.name for r in revisions]
    base = revisions[0].name
    sections = [Section("Revisions", [f"The baseline is {base}: every difference below is a revision minus it.",
                                      Table(["revision", "what it is"], [[Cell(r.name), Cell(r.label)]
                                                                         for r in revisions])])]

    params = [[Cell(key), *(Cell(r.params.get(key, "-")) for r in revisions)]
              for key in sorted({key for r in revisions for key in r.params})
              if len({r.params.get(key, "-") for r in revisions}) > 1]
    sections.append(Section("Params that differ", [Table(["param", *names], params) if params
                                                   else "None: every revision has the same params.yaml values."]))

    metrics = Section("Metrics", [f"Every number in each file; under a value, its difference from {base}. "
                                  "Accuracy, loss and macro F1 are on the test set."])
    unchanged = []
    for path in dict.fromkeys([*METRIC_FILES, *(path for r in revisions for path in r.metrics)]):
        rows = metric_rows(revisions, path)
        if path not in METRIC_FILES:  # the other metrics files dvc.yaml names: only what differs
            rows = [row for row in rows if len({cell.value for cell in row[1:]}) > 1]
            if not rows:
                unchanged.append(path)
        if rows:
            metrics.parts.append(Table(["metric", *names], rows,
                                       f"{path}: {METRIC_FILES.get(path, 'the values that differ')}"))
    if unchanged:
        metrics.parts.append(f"The same in every revision: {', '.join(unchanged)}.")
    sections.append(metrics)

    sections.append(Section("Curves per epoch", [Figure(
        "curves.png", curves_png(revisions),
        "Each revision in its own colour: the explicit loop (train) solid, skorch (fit) dashed; "
        "validation curves where the revision has a validation split (preprocess.val_size > 0)")]))

    panels = []
    for r in revisions:
        counts = {who: confusion_counts(*r.predictions[model]) for who, model in model_groups(revisions).items()}
        panels.append([(f"{r.name} · {who}: {int(c.sum() - np.trace(c))} errors", c) for who, c in counts.items()])
    matrices = Section("Confusion matrices", [Figure("confusion.png", matrices_png(panels),
                                                     "Rows: the true digit; columns: the prediction")])
    actual = revisions[0].predictions["manual"][0]
    differs = [r.name for r in revisions[1:] if not np.array_equal(r.predictions["manual"][0], actual)]
    if differs:
        matrices.parts.append(f"The test split of {', '.join(differs)} differs from {base}'s: "
                              "their matrices are not compared cell by cell, and no digits are compared.")
    comparable = [revisions[0]] + [r for r in revisions[1:] if r.name not in differs]
    sections.append(matrices)
    if len(comparable) > 1:
        matrices.parts += confusion_changes(comparable)
        sections.append(Section("Test digits that changed", changed_digits(root, comparable)))
    return f"mnist-dvc: {' vs '.join(names)}", sections


def write_report(out: Path, title: str, sections: list[Section]) -> None:
    """report.html and report.md from templates/ (HTML escaped; ``|`` escaped in Markdown's table cells), and the
    PNGs, into ``out`` all at once (a temporary folder moved in place)."""
    env = Environment(loader=PackageLoader("mnist_dvc.apps"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.tests["table"] = lambda part: isinstance(part, Table)
    env.tests["figure"] = lambda part: isinstance(part, Figure)
    env.filters["md_cell"] = lambda text: str(text).replace("|", "\\|")
    env.filters["data_uri"] = lambda png: "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    with atomic_dir(out) as tmp:
        for figure in (part for section in sections for part in section.parts if isinstance(part, Figure)):
            (tmp / figure.file_name).write_bytes(figure.png)
        for name in REPORT_FILES:
            page = env.get_template(name).render(title=title, sections=sections)
            (tmp / name).write_text(page.rstrip("\n") + "\n", encoding="utf-8")


def ensure_out_replaceable(out: Path) -> None:
    """``out`` is replaced whole: only a new folder or an earlier report's may be."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a folder")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    is_report = any(name in REPORT_FILES for name in names)
    others = [name for name in names if not is_report or (name not in REPORT_FILES and not name.endswith(".png"))]
    if others:
        raise ReportError(f"--out {out}: holds other files than a report ({', '.join(others[:3])}); "
                          "it would be replaced whole, so choose a new folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_dvc.apps.report", description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="*", metavar="REV",
                        help="commits, branches, tags, DVC experiment names or 'workspace'; the first is the "
                             "baseline (default: HEAD workspace)")
    parser.add_argument("--out", type=Path, default=Path("reports"),
                        help="folder for report.html, report.md and its PNGs (default: reports)")
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(args.revisions or ["HEAD", WORKSPACE]))
    named_revisions.cache_clear()  # a caller such as promote may run several reports in one process
    try:
        ensure_out_replaceable(args.out)
        root = project_root(Path.cwd())
        revisions = [read_revision(root, name) for name in names]
        title, sections = build(root, revisions)
        write_report(args.out, title, sections)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --out cannot be written (permissions, a full disk)
        print(f"error: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    count = f"{len(revisions)} revision{'s' if len(revisions) > 1 else ''}"
    print(f"{args.out / 'report.html'}  ({count}; Markdown: {args.out / 'report.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
