"""report: compare revisions and experiments on one page that opens offline.

    python -m mnist_dvc.apps.report [REV ...] [--out DIR]
    make report REVS="HEAD exp-a exp-b"

A REV is anything DVC resolves: a commit, a branch or a tag, the name of a
DVC experiment (``dvc exp show``), or ``workspace``. With none, the report
compares ``HEAD`` (the baseline) with the workspace; otherwise the first REV
is the baseline the others are compared with. Each revision's params.yaml,
metrics, curves and predictions are read through DVC's own file system
(``dvc.api.DVCFileSystem``): nothing is checked out and nothing trains.

It writes DIR (default ``reports``):
- ``report.html``: one self-contained page (every chart a PNG data URI,
  no ``src`` or ``href`` to another host), which opens from disk;
- ``report.md``: the same for a pull request or an issue, its PNGs beside it.

Side by side for each revision: the params that differ; every number in
metrics/evaluate.json, tune.json and export.json with its difference from
the baseline (and, of the other metrics files dvc.yaml names, the values
that differ); the per-epoch curves (train loss, and the validation curves
where present) of every revision on shared axes; both models' confusion
matrices and how they changed; and, as pictures, the test digits a revision
reads right that the baseline read wrong, and the other way round (the test
images are the workspace's data/processed/test_images.npy).

Exit status: 0; 2 for a revision DVC cannot resolve or one without the
pipeline's results (one line naming it and the revisions that exist), or a
bad --out. Nothing is written then: the report is built in a temporary
folder beside DIR and moved into place whole.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import subprocess
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
    metrics: dict[str, object] = field(default_factory=dict)  # "metrics/evaluate.json: manual.accuracy" -> value
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # curve -> training
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # model -> actual, predicted


# --- reading one revision through DVC --------------------------------------------------

def project_root(start: Path) -> Path:
    """The nearest folder at or above ``start`` that holds ``.dvc/``."""
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise ReportError(f"{start} is not inside a DVC project (no .dvc/ folder above it); run the report from one")


def git_refs(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Branches, tags and DVC experiments of the repository: kind -> [(name, commit)]."""
    result = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)",
                             "refs/heads", "refs/tags", "refs/exps"],
                            cwd=root, capture_output=True, text=True)
    refs: dict[str, list[tuple[str, str]]] = {"branches": [], "tags": [], "experiments": []}
    for line in result.stdout.splitlines():
        commit, ref = line.split(" ", 1)
        parts = ref.split("/")
        if parts[1] == "heads":
            refs["branches"].append(("/".join(parts[2:]), commit))
        elif parts[1] == "tags":
            refs["tags"].append(("/".join(parts[2:]), commit))
        elif len(parts) == 5:  # refs/exps/<2 hex>/<38 hex of the baseline>/<name>
            refs["experiments"].append((parts[4], commit))
    return refs


def existing_revisions(root: Path) -> str:
    """``revisions here: workspace; branches main; experiments exp-a, exp-b`` for an error line."""
    listed = [WORKSPACE]
    for kind, names in git_refs(root).items():
        names = sorted({name for name, _ in names})
        if names:
            shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
            listed.append(f"{kind} {shown}")
    return "revisions here: " + "; ".join(listed) + " (or any commit)"


def describe(root: Path, name: str, commit: str) -> str:
    """``experiment c7cf717``, ``branch 8a3df28``, ``commit 8a3df28`` or, for the workspace, ``on 8a3df28``."""
    if name == WORKSPACE:
        return f"on {commit[:7]}"
    for kind, refs in git_refs(root).items():
        if (name, commit) in refs:
            return f"{kind[:-1]} {commit[:7]}"
    return f"commit {commit[:7]}"


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


def read_text(fs, path: str) -> str | None:
    """The file at ``path`` in ``fs``, or None where the revision has none."""
    try:
        return fs.read_text(path, encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        return None
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not UTF-8 text") from None


def declared_metrics(dvc_yaml: str | None) -> list[str]:
    """The metrics files a dvc.yaml names (its top-level ``metrics`` and each stage's), in order."""
    import yaml

    try:
        pipeline = yaml.safe_load(dvc_yaml or "") or {}
    except yaml.YAMLError:
        return []
    entries = list(pipeline.get("metrics") or [])
    for stage in (pipeline.get("stages") or {}).values():
        entries += (stage.get("metrics") or []) if isinstance(stage, dict) else []
    paths = [entry if isinstance(entry, str) else next(iter(entry), None) for entry in entries]
    return list(dict.fromkeys(path for path in paths if isinstance(path, str)))


def read_revision(root: Path, name: str) -> Revision:
    """Everything the report shows of revision ``name``, read through ``dvc.api.DVCFileSystem``."""
    import yaml
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException

    try:
        fs = DVCFileSystem(str(root), rev=None if name == WORKSPACE else name)
        commit = fs.repo.get_rev()  # opens the revision: an unknown one fails here (fs.exists would say False)
    except DvcException as exc:
        raise ReportError(f"unknown revision {name!r} ({exc}); {existing_revisions(root)}") from None
    try:
        texts = {path: read_text(fs, path) for path in [*REQUIRED, *METRIC_FILES]}
        missing = [path for path in REQUIRED if texts[path] is None]
        if missing:
            raise ReportError(f"revision {name!r} has no {', '.join(missing)}: it has no results of the pipeline "
                              f"(dvc repro or dvc exp run makes them); {existing_revisions(root)}")
        revision = Revision(name, describe(root, name, commit))
        try:
            params = yaml.safe_load(texts["params.yaml"]) or {}
        except yaml.YAMLError:
            raise ReportError(f"{name}:params.yaml is not valid YAML") from None
        revision.params = {key: json.dumps(value) if isinstance(value, list) else str(value)
                           for key, value in flatten(params).items()}
        for path in dict.fromkeys([*METRIC_FILES, *declared_metrics(read_text(fs, "dvc.yaml"))]):
            text = texts[path] if path in texts else read_text(fs, path)
            if text is not None:
                try:
                    values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
                except (json.JSONDecodeError, yaml.YAMLError):
                    raise ReportError(f"{name}:{path} is not valid JSON or YAML") from None
                revision.metrics.update({f"{path}: {key}": value for key, value in flatten(values).items()})
        for training, folder in TRAININGS.items():
            plots = f"{folder}/plots/metrics"
            for path in sorted(fs.find(plots)):
                if path.endswith(".tsv"):
                    curve = path[len(plots) + 1:-len(".tsv")]  # e.g. train/loss, val/accuracy
                    try:
                        revision.curves.setdefault(curve, {})[training] = read_tsv(texts.get(path)
                                                                                   or fs.read_text(path))
                    except ValueError:
                        raise ReportError(f"{name}:{path} is not DVCLive's step<TAB>value table") from None
        for model in MODELS:
            path = f"metrics/predictions/{model}.csv"
            revision.predictions[model] = read_predictions(texts[path], f"{name}:{path}")
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


def metric_rows(revisions: list[Revision], path: str) -> list[tuple[str, list[str], list[str]]]:
    """(key, values, differences from the baseline) for every key of the metrics file ``path`` any revision has."""
    prefix = f"{path}: "
    keys = list(dict.fromkeys(key[len(prefix):] for revision in revisions for key in revision.metrics
                              if key.startswith(prefix)))
    rows = []
    for key in keys:
        values = [revision.metrics.get(prefix + key) for revision in revisions]
        base = values[0]
        shown = [number(v) if is_number(v) else "-" if v is None else json.dumps(v) for v in values]
        diffs = [("±0" if v == base else number(v - base, signed=True)) if i and is_number(v) and is_number(base)
                 else "" for i, v in enumerate(values)]
        rows.append((key, shown, diffs))
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


def same_split(revisions: list[Revision]) -> list[str]:
    """Names of the revisions whose test labels differ from the baseline's."""
    actual = revisions[0].predictions["manual"][0]
    return [r.name for r in revisions[1:] if not np.array_equal(r.predictions["manual"][0], actual)]


# --- drawing ------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot, headless (mnist_dvc.figures selects Agg and the font), loaded when drawing."""
    from mnist_dvc.figures import plt

    return plt


def figure_png(fig) -> bytes:
    """``fig`` as PNG bytes at the report's resolution (``figures.png_bytes``); closes it."""
    from mnist_dvc.figures import png_bytes

    return png_bytes(fig, dpi=90)


def colours(count: int) -> list:
    plt = pyplot()

    return [plt.get_cmap("tab10")(i % 10) for i in range(count)]


def curves_png(revisions: list[Revision]) -> bytes:
    """One panel per curve (train/loss first), every revision on the same axes; skorch dashed."""
    plt = pyplot()

    names = sorted({curve for r in revisions for curve in r.curves}, key=lambda c: (c != "train/loss", c))
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.4), squeeze=False)
    for ax, curve in zip(axes[0], names):
        for revision, colour in zip(revisions, colours(len(revisions))):
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
    plt = pyplot()

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
    plt = pyplot()

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
    plt = pyplot()
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


# --- the document -------------------------------------------------------------------------

@dataclass
class Section:
    """A heading, then paragraphs, tables and charts, written as HTML and as Markdown."""

    title: str
    parts: list[tuple[str, object]] = field(default_factory=list)  # ("text"|"table"|"image", content)

    def text(self, line: str) -> None:
        self.parts.append(("text", line))

    def table(self, header: list[str], rows: list[list[str]], cells: list[list[dict]] | None = None) -> None:
        self.parts.append(("table", (header, rows, cells)))

    def image(self, file_name: str, png: bytes, caption: str) -> None:
        self.parts.append(("image", (file_name, png, caption)))


def to_html(title: str, sections: list[Section]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:1.5em auto;padding:0 1em;max-width:1200px;color:#222}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
           "text-align:right}td:first-child,th:first-child{text-align:left}.diff{color:#666;font-size:.85em}"
           "img{max-width:100%;display:block;margin:.5em 0}figcaption{color:#555;font-size:.9em}</style>",
           "</head><body>", f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        for kind, content in section.parts:
            if kind == "text":
                out.append(f"<p>{html.escape(content)}</p>")
            elif kind == "table":
                header, rows, cells = content
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                for r, row in enumerate(rows):
                    tds = []
                    for c, value in enumerate(row):
                        attrs = "".join(f' data-{k}="{html.escape(str(v))}"'
                                        for k, v in (cells[r][c] if cells else {}).items())
                        tds.append(f"<td{attrs}>{html.escape(value).replace(chr(10), '<br><span class=diff>')}"
                                   f"{'</span>' if chr(10) in value else ''}</td>")
                    out.append("<tr>" + "".join(tds) + "</tr>")
                out.append("</table>")
            else:
                file_name, png, caption = content
                data = base64.b64encode(png).decode("ascii")
                out.append(f"<figure><figcaption>{html.escape(caption)}</figcaption>"
                           f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"></figure>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def md_cell(value: str) -> str:
    """A table cell; a value's difference (after a newline) in brackets."""
    value = value.replace("|", "\\|")
    return value.replace("\n", " (") + ")" if "\n" in value else value


def to_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for kind, content in section.parts:
            if kind == "text":
                out += [content, ""]
            elif kind == "table":
                header, rows, _ = content
                out.append("| " + " | ".join(md_cell(h) for h in header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in rows]
                out.append("")
            else:
                file_name, _, caption = content
                out += [caption + ":", "", f"![{Path(file_name).stem}]({file_name})", ""]
    return "\n".join(out)


def changed_digits(revisions: list[Revision], images: np.ndarray | None, section: Section) -> None:
    """The test digits each revision reads differently from the baseline, per model, as pictures."""
    base = revisions[0]
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
                    section.text(heading + ".")
                elif images is None:
                    section.text(heading + ": test indices " + ", ".join(map(str, indices[:MAX_DIGITS]))
                                 + (" …" if len(indices) > MAX_DIGITS else "") + ".")
                else:
                    shown = f", the first {MAX_DIGITS}" if len(indices) > MAX_DIGITS else ""
                    section.image(f"digits-{i}-{model}-{kind.replace(' ', '-')}.png",
                                  digits_png(images, indices, actual, before, after),
                                  f"{heading}{shown}; each is #index true digit: {base.name}'s → {revision.name}'s")


def test_images(root: Path, revisions: list[Revision]) -> tuple[np.ndarray | None, str]:
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
    title = f"mnist-dvc: {' vs '.join(names)}"
    sections = []

    heading = Section("Revisions")
    heading.text(f"The baseline is {revisions[0].name}: every difference below is a revision minus it.")
    heading.table(["revision", "what it is"], [[r.name, r.label] for r in revisions])
    sections.append(heading)

    params = Section("Params that differ")
    differ = params_that_differ(revisions)
    if differ:
        params.table(["param", *names], [[key, *values] for key, values in differ])
    else:
        params.text("None: every revision has the same params.yaml values.")
    sections.append(params)

    metrics = Section("Metrics")
    metrics.text("Every number in each file; under a value, its difference from "
                 f"{revisions[0].name}. Accuracy, loss and macro F1 are on the test set.")
    others = list(dict.fromkeys(key.split(": ", 1)[0] for r in revisions for key in r.metrics
                                if key.split(": ", 1)[0] not in METRIC_FILES))
    unchanged = []
    for path in [*METRIC_FILES, *others]:
        rows = metric_rows(revisions, path)
        if path in others:  # the other metrics files dvc.yaml names: only what differs
            rows = [row for row in rows if len(set(row[1])) > 1]
            if not rows:
                unchanged.append(path)
                continue
        if rows:
            metrics.text(f"{path}: {METRIC_FILES.get(path, 'the values that differ')}")
            metrics.table(["metric", *names],
                          [[key, *(v + (f"\n{d}" if d else "") for v, d in zip(values, diffs))]
                           for key, values, diffs in rows],
                          [[{}, *({"rev": r.name, "file": path, "key": key} for r in revisions)]
                           for key, _, _ in rows])
    if unchanged:
        metrics.text(f"The same in every revision: {', '.join(unchanged)}.")
    sections.append(metrics)

    curves = Section("Curves per epoch")
    curves.image("curves.png", curves_png(revisions),
                 "Each revision in its own colour: the explicit loop (train) solid, skorch (fit) dashed; "
                 "validation curves where the revision has a validation split (preprocess.val_size > 0)")
    sections.append(curves)

    matrices = Section("Confusion matrices")
    matrices.image("confusion.png", confusion_png(revisions), "Rows: the true digit; columns: the prediction")
    differs = same_split(revisions)
    if differs:
        matrices.text(f"The test split of {', '.join(differs)} differs from {revisions[0].name}'s: "
                      "their matrices are not compared cell by cell, and no digits are compared.")
    comparable = [revisions[0]] + [r for r in revisions[1:] if r.name not in differs]
    if len(comparable) > 1:
        matrices.image("confusion-changes.png", changes_png(comparable),
                       f"Errors per cell minus {revisions[0].name}'s: red more, blue fewer")
        for revision in comparable[1:]:
            for who, model in model_groups(comparable).items():
                changes = biggest_changes(confusion_counts(*revisions[0].predictions[model]),
                                          confusion_counts(*revision.predictions[model]))
                matrices.text(f"{revision.name}, {who}, the errors that changed most: "
                              + ("; ".join(changes) or "none") + ".")
    sections.append(matrices)

    if len(comparable) > 1:
        digits = Section("Test digits that changed")
        images, why_not = test_images(root, comparable)
        changed_digits(comparable, images, digits)
        if why_not and any(kind == "text" and "test indices" in content for kind, content in digits.parts):
            digits.parts.insert(0, ("text", why_not))
        sections.append(digits)
    return title, sections


def write_report(out: Path, title: str, sections: list[Section]) -> None:
    """report.html, report.md and its PNGs into ``out``, all at once (a temporary folder moved in place)."""
    with atomic_dir(out) as tmp:
        for section in sections:
            for kind, content in section.parts:
                if kind == "image":
                    file_name, png, _ = content
                    (tmp / file_name).write_bytes(png)
        (tmp / "report.html").write_text(to_html(title, sections), encoding="utf-8")
        (tmp / "report.md").write_text(to_markdown(title, sections), encoding="utf-8")


def check_out(out: Path) -> None:
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
    try:
        check_out(args.out)
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
