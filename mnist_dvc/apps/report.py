"""report: compare revisions and experiments on one page that opens offline.

    python -m mnist_dvc.apps.report [REV ...] [--out DIR]
    make report REVS="HEAD exp-a exp-b"

A REV is a commit, a branch, a tag, a DVC experiment's name or ``workspace``;
the first is the baseline (default: ``HEAD`` against the workspace). Each is
read through ``dvc.api``: params with ``params_show``; metrics files, curves
and predictions through ``DVCFileSystem``; ``all_branches``, ``all_tags`` and
``exp_show`` say what it is. Nothing is checked out and nothing trains.

DIR (default ``reports``) gets ``report.html``, one self-contained page (every
chart a PNG data URI, no ``src`` or ``href`` to another host), and
``report.md`` with its PNGs beside it, both from ``templates/``.
docs/experiments.md says what they show, side by side.

Exit status: 0; 2 for a revision DVC cannot resolve or one without the
pipeline's results (one line naming it and the revisions that exist), or a
bad --out. Nothing is written then: the report is built in a temporary
folder beside DIR and moved into place whole.
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist_dvc.data import N_CLASSES, confusion_counts, load_stored_split
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
MAX_DIGITS = 24  # pictures per group of changed digits
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


@functools.cache
def named_revisions(root: Path) -> dict[str, dict[str, str]]:
    """Branches, tags and HEAD's experiments (as ``dvc exp show`` lists them): kind -> {name: short commit}.

    Read once per report (``main`` clears it): every label and error line uses the same listing.
    """
    import dvc.api

    experiments = {row["Experiment"]: row["rev"] for row in dvc.api.exp_show(repo=str(root))
                   if row["Experiment"] and row["typ"] != "baseline"}
    return {"branches": dict.fromkeys(dvc.api.all_branches(str(root)), ""),
            "tags": dict.fromkeys(dvc.api.all_tags(str(root)), ""), "experiments": experiments}


def existing_revisions(root: Path) -> str:
    """``revisions here: workspace; branches main; experiments exp-a, exp-b`` for an error line."""
    listed = [WORKSPACE]
    for kind, names in named_revisions(root).items():
        names = sorted(names)
        if names:
            shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
            listed.append(f"{kind} {shown}")
    return "revisions here: " + "; ".join(listed) + " (or any commit)"


def kind_and_commit(root: Path, name: str, commit: str) -> str:
    """``experiment c7cf717``, ``branch 8a3df28``, ``commit 8a3df28`` or, for the workspace, ``on 8a3df28``."""
    if name == WORKSPACE:
        return f"on {commit[:7]}"
    singular = {"branches": "branch", "tags": "tag", "experiments": "experiment"}
    kind = next((singular[kind] for kind, names in named_revisions(root).items() if name in names), "commit")
    return f"{kind} {commit[:7]}"


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """Nested dicts as ``{"a.b": leaf}``; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def read_tsv(text: str) -> tuple[np.ndarray, np.ndarray]:
    """A DVCLive plot file (``step<TAB>value``, with a header) as steps and values."""
    table = np.loadtxt(io.StringIO(text), delimiter="\t", skiprows=1, ndmin=2)
    return table[:, 0].astype(int), table[:, 1]


def read_predictions(text: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The evaluate stage's ``actual,predicted`` CSV as two label arrays."""
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except ValueError:
        table = np.zeros((0, 0), np.int64)
    if table.shape[1:] != (2,) or table.size == 0 or table.min() < 0 or table.max() >= N_CLASSES:
        raise ReportError(f"{where} is not the evaluate stage's actual,predicted CSV of digits 0-9")
    return table[:, 0], table[:, 1]


def read_metrics(fs, name: str) -> dict[str, dict[str, object]]:
    """Every metrics file the revision's dvc.yaml names, and METRIC_FILES: file -> {"manual.accuracy": value}.

    Read as files, not with ``dvc.api.metrics_show``: that merges the files,
    names a key's file only where two files share the key (which differs from
    one revision to another) and drops lists such as tune's best point.
    """
    import yaml

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
    import dvc.api
    from dvc.exceptions import DvcException

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
        revision = Revision(name, kind_and_commit(root, name, commit))
        revision.params = {key: json.dumps(value) if isinstance(value, list) else str(value)
                           for key, value in flatten(dvc.api.params_show(repo=str(root), rev=rev)).items()}
        revision.metrics = read_metrics(fs, name)
        for training, folder in TRAININGS.items():
            plots = f"{folder}/plots/metrics"
            for path in sorted(p for p in fs.find(plots) if p.endswith(".tsv")):
                curve = path[len(plots) + 1:-len(".tsv")]  # e.g. train/loss, val/accuracy
                try:
                    revision.curves.setdefault(curve, {})[training] = read_tsv(fs.read_text(path, encoding="utf-8"))
                except (ValueError, UnicodeDecodeError):
                    raise ReportError(f"{name}:{path} is not DVCLive's step<TAB>value table") from None
        for model in MODELS:
            path = f"metrics/predictions/{model}.csv"
            revision.predictions[model] = read_predictions(fs.read_text(path, encoding="utf-8"), f"{name}:{path}")
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
    sign = "+" if signed else ""
    if isinstance(value, int):
        return f"{value:{sign}d}"
    if value != 0 and abs(value) < 0.001:
        return f"{value:{sign}.3g}"
    return f"{value:{sign}.4f}"


def params_that_differ(revisions: list[Revision]) -> list[tuple[str, list[str]]]:
    keys = sorted({key for revision in revisions for key in revision.params})
    rows = [(key, [revision.params.get(key, "-") for revision in revisions]) for key in keys]
    return [(key, values) for key, values in rows if len(set(values)) > 1]


def metric_rows(revisions: list[Revision], path: str) -> list[list[Cell]]:
    """A row per key of the metrics file ``path`` any revision has: the key, then each revision's value with its
    difference from the baseline."""
    keys = list(dict.fromkeys(key for revision in revisions for key in revision.metrics.get(path, {})))
    rows = []
    for key in keys:
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


def biggest_changes(base: np.ndarray, other: np.ndarray, count: int = 6) -> list[str]:
    """The off-diagonal cells whose count changed most: ``4 read as 9: 12 -> 5 (-7)``."""
    change = other - base
    np.fill_diagonal(change, 0)
    cells = sorted(zip(*np.nonzero(change)), key=lambda cell: (-abs(change[cell]), cell))[:count]
    return [f"{t} read as {p}: {base[t, p]} → {other[t, p]} ({change[t, p]:+d})" for t, p in cells]


def on_another_split(revisions: list[Revision]) -> list[str]:
    """Names of the revisions whose test labels differ from the baseline's."""
    actual = revisions[0].predictions["manual"][0]
    return [r.name for r in revisions[1:] if not np.array_equal(r.predictions["manual"][0], actual)]


# --- drawing ------------------------------------------------------------------------------

def figure_png(fig) -> bytes:
    """``fig`` as PNG bytes at the report's resolution (``figures.png_bytes``); closes it."""
    from mnist_dvc.figures import png_bytes

    return png_bytes(fig, dpi=90)


def curves_png(revisions: list[Revision]) -> bytes:
    """One panel per curve (train/loss first), every revision on the same axes; skorch dashed."""
    from mnist_dvc.figures import plt  # pyplot, headless (Agg and the font), loaded only to draw

    names = sorted({curve for r in revisions for curve in r.curves}, key=lambda c: (c != "train/loss", c))
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.4), squeeze=False)
    for ax, curve in zip(axes[0], names):
        for revision, colour in zip(revisions, (plt.get_cmap("tab10")(i % 10) for i in range(len(revisions)))):
            for training, style in zip(TRAININGS, ("-", "--")):
                if training in revision.curves.get(curve, {}):
                    steps, values = revision.curves[curve][training]
                    ax.plot(steps + 1, values, style, color=colour, marker="o", markersize=3,
                            label=f"{revision.name} · {training}")
        ax.set_title(curve)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.subplots_adjust(left=0.08 / len(names), right=0.99, bottom=0.15, top=0.91, wspace=0.22)  # tight_layout: +1 s
    return figure_png(fig)


def adjust_grid(fig, rows: int) -> None:
    """Margins of a grid of matrices 4 inches a row (fixed: tight_layout costs a second)."""
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.12 / rows, top=1 - 0.08 / rows, wspace=0.2, hspace=0.3)


def confusion_png(revisions: list[Revision]) -> bytes:
    """The confusion matrices (one per model, or one for both), one row per revision, on one colour scale."""
    from mnist_dvc.figures import plt

    groups = model_groups(revisions)
    matrices = [[confusion_counts(*r.predictions[m]) for m in groups.values()] for r in revisions]
    top = max(int(m.max()) for row in matrices for m in row)
    fig, axes = plt.subplots(len(revisions), len(groups), figsize=(4.2 * len(groups) + 0.4, 4.0 * len(revisions)),
                             squeeze=False)
    for axes_row, revision, row in zip(axes, revisions, matrices):
        for ax, who, counts in zip(axes_row, groups, row):
            ax.imshow(counts, cmap="Blues", vmin=0, vmax=top)
            for (t, p), value in np.ndenumerate(counts):
                if value:
                    ax.text(p, t, str(value), ha="center", va="center", fontsize=6,
                            color="white" if value > top / 2 else "black")
            errors = int(counts.sum() - np.trace(counts))
            label_matrix(ax, f"{revision.name} · {who}: {errors} errors")
    adjust_grid(fig, len(revisions))
    return figure_png(fig)


def label_matrix(ax, title: str) -> None:
    """Title, digit ticks and axis names of one 10x10 confusion-matrix panel."""
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(N_CLASSES))
    ax.set_yticks(range(N_CLASSES))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")


def changes_png(revisions: list[Revision]) -> bytes:
    """Per revision after the first, the change in each error cell from the baseline: red more, blue fewer."""
    from mnist_dvc.figures import plt

    groups = model_groups(revisions)
    base = [confusion_counts(*revisions[0].predictions[m]) for m in groups.values()]
    rows = revisions[1:]
    diffs = [[confusion_counts(*r.predictions[m]) - b for m, b in zip(groups.values(), base)] for r in rows]
    for row in diffs:
        for d in row:
            np.fill_diagonal(d, 0)
    top = max(1, max(int(abs(d).max()) for row in diffs for d in row))
    fig, axes = plt.subplots(len(rows), len(groups), figsize=(4.2 * len(groups) + 0.4, 4.0 * len(rows)),
                             squeeze=False)
    for axes_row, revision, row in zip(axes, rows, diffs):
        for ax, who, change in zip(axes_row, groups, row):
            ax.imshow(change, cmap="RdBu_r", vmin=-top, vmax=top)
            for (t, p), value in np.ndenumerate(change):
                if value:
                    ax.text(p, t, f"{value:+d}", ha="center", va="center", fontsize=6)
            label_matrix(ax, f"{revision.name} minus {revisions[0].name} · {who}")
    adjust_grid(fig, len(rows))
    return figure_png(fig)


def digits_png(images: np.ndarray, indices: np.ndarray, actual, before, after) -> bytes:
    """Up to MAX_DIGITS test images, 12 a row, each captioned ``#index true: before→after``.

    One mosaic on one axes: a subplot per digit costs more than drawing the digits.
    """
    from mnist_dvc.figures import plt
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
    return figure_png(fig)


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

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class Section:
    """A heading, then its parts in order: paragraphs (str), tables and figures."""

    title: str
    parts: list[str | Table | Figure] = field(default_factory=list)


def render(template: str, title: str, sections: list[Section]) -> str:
    """``templates/<template>`` filled in; HTML escaped, Markdown's ``|`` escaped in table cells."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("mnist_dvc.apps"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.tests["table"] = lambda part: isinstance(part, Table)
    env.tests["figure"] = lambda part: isinstance(part, Figure)
    env.filters["md_cell"] = lambda text: str(text).replace("|", "\\|")
    return env.get_template(template).render(title=title, sections=sections).rstrip("\n") + "\n"


def changed_digits(revisions: list[Revision], images: np.ndarray | None, why_not: str) -> list[str | Figure]:
    """The test digits each revision reads differently from the baseline, per model: pictures, or
    without ``images`` their indices after ``why_not``."""
    base, parts, listed = revisions[0], [], False
    for i, revision in enumerate(revisions[1:], start=1):
        for who, model in model_groups([base, revision]).items():
            actual, before = base.predictions[model]
            after = revision.predictions[model][1]
            for kind, chosen in (("now right", (before != actual) & (after == actual)),
                                 ("now wrong", (before == actual) & (after != actual))):
                indices = np.flatnonzero(chosen)
                heading = (f"{revision.name} vs {base.name}, {who}: {len(indices)} test digits {kind} "
                           f"(were {'wrong' if kind == 'now right' else 'right'})")
                if not len(indices):
                    parts.append(heading + ".")
                elif images is None:
                    listed = True
                    parts.append(heading + ": test indices " + ", ".join(map(str, indices[:MAX_DIGITS]))
                                 + (" …" if len(indices) > MAX_DIGITS else "") + ".")
                else:
                    shown = f", the first {MAX_DIGITS}" if len(indices) > MAX_DIGITS else ""
                    parts.append(Figure(f"digits-{i}-{model}-{kind.replace(' ', '-')}.png",
                                        digits_png(images, indices, actual, before, after),
                                        f"{heading}{shown}; each is #index true digit: {base.name}'s → "
                                        f"{revision.name}'s"))
    return [why_not, *parts] if listed else parts


def workspace_test_images(root: Path, revisions: list[Revision]) -> tuple[np.ndarray | None, str]:
    """The workspace's test images when they are the split the revisions were evaluated on, else why not."""
    try:
        images, labels = load_stored_split(root / "data" / "processed", "test")
    except StageError as exc:
        return None, f"No pictures: {exc}; `dvc pull` or `dvc repro preprocess` brings the test images back."
    actual = revisions[0].predictions["manual"][0]
    if not np.array_equal(labels, actual):
        return None, (f"No pictures: the workspace's test split ({len(labels)} images) is not the one "
                      f"{revisions[0].name} was evaluated on ({len(actual)} images); indices instead.")
    return images, ""


def build(root: Path, revisions: list[Revision]) -> tuple[str, list[Section]]:
    names = [r.name for r in revisions]
    base = revisions[0].name
    sections = [Section("Revisions", [f"The baseline is {base}: every difference below is a revision minus it.",
                                      Table(["revision", "what it is"], [[Cell(r.name), Cell(r.label)]
                                                                         for r in revisions])])]

    differ = params_that_differ(revisions)
    sections.append(Section("Params that differ", [
        Table(["param", *names], [[Cell(key), *map(Cell, values)] for key, values in differ]) if differ
        else "None: every revision has the same params.yaml values."]))

    metrics = Section("Metrics", [f"Every number in each file; under a value, its difference from {base}. "
                                  "Accuracy, loss and macro F1 are on the test set."])
    others = list(dict.fromkeys(path for r in revisions for path in r.metrics if path not in METRIC_FILES))
    unchanged = []
    for path in [*METRIC_FILES, *others]:
        rows = metric_rows(revisions, path)
        if path in others:  # the other metrics files dvc.yaml names: only what differs
            rows = [row for row in rows if len({cell.value for cell in row[1:]}) > 1]
            if not rows:
                unchanged.append(path)
                continue
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

    matrices = Section("Confusion matrices", [Figure("confusion.png", confusion_png(revisions),
                                                     "Rows: the true digit; columns: the prediction")])
    differs = on_another_split(revisions)
    if differs:
        matrices.parts.append(f"The test split of {', '.join(differs)} differs from {base}'s: "
                              "their matrices are not compared cell by cell, and no digits are compared.")
    comparable = [revisions[0]] + [r for r in revisions[1:] if r.name not in differs]
    if len(comparable) > 1:
        matrices.parts.append(Figure("confusion-changes.png", changes_png(comparable),
                                     f"Errors per cell minus {base}'s: red more, blue fewer"))
        for revision in comparable[1:]:
            for who, model in model_groups(comparable).items():
                changes = biggest_changes(confusion_counts(*revisions[0].predictions[model]),
                                          confusion_counts(*revision.predictions[model]))
                matrices.parts.append(f"{revision.name}, {who}, the errors that changed most: "
                                      + ("; ".join(changes) or "none") + ".")
    sections.append(matrices)

    if len(comparable) > 1:
        images, why_not = workspace_test_images(root, comparable)
        sections.append(Section("Test digits that changed", changed_digits(comparable, images, why_not)))
    return f"mnist-dvc: {' vs '.join(names)}", sections


def write_report(out: Path, title: str, sections: list[Section]) -> None:
    """report.html, report.md and its PNGs into ``out``, all at once (a temporary folder moved in place)."""
    with atomic_dir(out) as tmp:
        for figure in (part for section in sections for part in section.parts if isinstance(part, Figure)):
            (tmp / figure.file_name).write_bytes(figure.png)
        for name in REPORT_FILES:
            (tmp / name).write_text(render(name, title, sections), encoding="utf-8")


def ensure_out_replaceable(out: Path) -> None:
    """``out`` is replaced whole: only a new folder or an earlier report's may be."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a folder")
    if out.is_dir():
        names = sorted(p.name for p in out.iterdir())
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
