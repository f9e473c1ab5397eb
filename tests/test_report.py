"""The comparison report: revisions and experiments side by side, on a page that opens offline.

The end-to-end tests share one project with two experiments (the ``experiments``
fixture, made once) and run the report as a user does, from the project's root.
"""

from __future__ import annotations

import json
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import dvc, sh
from mnist_dvc.apps import report

REPORT = [sys.executable, "-m", "mnist_dvc.apps.report"]
LOAD_WAIT = 30  # s for the page's images to decode; well under 1 s on an idle machine


def run_report(repo: Path, *args, check: bool = True):
    return sh(*REPORT, *args, cwd=repo, check=check)


def exp_show(repo: Path) -> dict[str, dict]:
    """Each revision's metrics files, by the name the report is given: workspace, HEAD, experiment names."""
    head = sh("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    rows = {}
    for entry in json.loads(dvc("exp", "show", "--json", cwd=repo).stdout):
        name = "workspace" if entry["rev"] == "workspace" else "HEAD" if entry["rev"] == head else entry["rev"]
        rows[name] = entry["data"]["metrics"]
        for experiment in entry.get("experiments") or []:
            for rev in experiment["revs"]:
                rows[rev["name"]] = rev["data"]["metrics"]
    return rows


def shown_cells(driver) -> list[dict]:
    """Every metric cell of the page: its revision, file, key and the value it shows (its first line)."""
    return driver.execute_script("""
        return Array.from(document.querySelectorAll("td[data-file]")).map(td => ({
            rev: td.dataset.rev, file: td.dataset.file, key: td.dataset.key,
            value: td.innerText.split("\\n")[0].trim()}));""")


def images_loaded(driver) -> list[int]:
    driver_wait = time.monotonic() + LOAD_WAIT
    while not driver.execute_script("return Array.from(document.images).every(i => i.complete)"):
        if time.monotonic() > driver_wait:
            break
        time.sleep(0.1)
    return driver.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")


def dig(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


@pytest.mark.e2e
def test_head_and_two_experiments_side_by_side_in_an_offline_browser(experiments, offline_browser, tmp_path):
    out = tmp_path / "reports"
    result = run_report(experiments, "HEAD", "exp-a", "exp-b", "--out", out)
    assert result.stdout.strip().startswith(str(out / "report.html"))
    page, markdown = (out / "report.html").read_text(), (out / "report.md").read_text()

    # self-contained: every image a data URI, no link or script from anywhere
    assert re.findall(r"""\b(?:src|href)\s*=\s*(?!["']?data:image/png;base64,)""", page) == []
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert {"curves.png", "confusion.png", "confusion-changes.png"} <= set(pictures)
    assert all((out / name).is_file() for name in pictures)
    assert page.count("<img ") == len(pictures)

    offline_browser.get((out / "report.html").as_uri())
    widths = images_loaded(offline_browser)
    assert len(widths) == len(pictures) and all(width > 0 for width in widths)
    assert [e["message"] for e in offline_browser.get_log("browser") if e["level"] == "SEVERE"] == []

    # the numbers are DVC's, to 4 decimals as `dvc exp show` prints them
    metrics = exp_show(experiments)
    cells = {(cell["rev"], cell["file"], cell["key"]): cell["value"] for cell in shown_cells(offline_browser)}
    for rev in ("HEAD", "exp-a", "exp-b"):
        for file, key in [("metrics/evaluate.json", f"{model}.{name}") for model in ("manual", "skorch")
                          for name in ("accuracy", "loss", "macro_f1")] + [("metrics/tune.json", "best_score"),
                                                                            ("metrics/export.json",
                                                                             "manual.argmax_agreement")]:
            assert cells[rev, file, key] == f"{dig(metrics[rev][file]['data'], key):.4f}", (rev, file, key)
    assert "| metric | HEAD | exp-a | exp-b |" in markdown

    # the params that differ, and only those: the experiments' settings against what the fixture's HEAD holds
    # (its params.yaml is the workspace's at the time the fixture was made, so nothing here is hard-coded)
    head = yaml.safe_load(sh("git", "show", "HEAD:params.yaml", cwd=experiments).stdout)
    hidden, lr, val_size = json.dumps(head["model"]["hidden"]), head["train"]["lr"], head["preprocess"]["val_size"]
    expected = {"model.hidden": [hidden, hidden, "[64]"], "preprocess.val_size": [val_size, val_size, 200],
                "train.lr": [lr, 0.003, lr]}
    params = re.search(r"## Params that differ\n\n(.*?)\n\n", markdown, re.S).group(1).splitlines()[2:]
    assert sorted(params) == sorted(f"| {key} | {' | '.join(map(str, values))} |" for key, values in expected.items()
                                    if len({str(value) for value in values}) > 1)

    # the digits exp-a reads differently, counted from the predictions DVC has for each revision
    import dvc.api

    def predictions(rev):
        text = dvc.api.read("metrics/predictions/manual.csv", repo=str(experiments), rev=rev)
        return np.loadtxt(text.splitlines()[1:], delimiter=",", dtype=int)

    before, after = predictions("HEAD"), predictions("exp-a")
    now_right = int(((before[:, 1] != before[:, 0]) & (after[:, 1] == after[:, 0])).sum())
    assert f"exp-a vs HEAD, both models: {now_right} test digits now right" in markdown
    assert (out / "digits-1-manual-now-right.png").is_file() == (now_right > 0)


@pytest.mark.e2e
def test_with_no_revision_the_workspace_is_compared_with_head(experiments, tmp_path):
    out = tmp_path / "report"
    run_report(experiments, "--out", out)
    markdown = (out / "report.md").read_text()
    assert "| metric | HEAD | workspace |" in markdown
    workspace = exp_show(experiments)["workspace"]["metrics/evaluate.json"]["data"]
    row = next(line for line in markdown.splitlines() if line.startswith("| manual.accuracy |"))
    assert row.split(" | ")[2].split(" ")[0] == f"{workspace['manual']['accuracy']:.4f}"


def read(repo: Path, name: str) -> report.Revision:
    return report.read_revision(repo, name)


@pytest.mark.e2e
def test_validation_curves_are_read_where_a_revision_has_them(experiments):
    assert set(read(experiments, "HEAD").curves) == {"train/loss"}
    exp_b = read(experiments, "exp-b")
    assert set(exp_b.curves) == {"train/loss", "val/loss", "val/accuracy"}
    assert set(exp_b.curves["val/accuracy"]) == {"train", "fit"}
    steps, values = exp_b.curves["val/accuracy"]["train"]
    assert list(steps) == list(range(len(steps))) and all(0 <= v <= 1 for v in values)


@pytest.mark.e2e
def test_a_bad_revision_is_one_line_naming_what_exists_and_nothing_is_written(experiments, tmp_path):
    out = tmp_path / "report"
    for args, named in [(["HEAD", "nope"], "unknown revision 'nope'"),
                        (["HEAD~1"], "revision 'HEAD~1' has no")]:  # the commit before `dvc repro`
        result = run_report(experiments, *args, "--out", out, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
        assert "experiments exp-a, exp-b" in lines[0] and "branches main" in lines[0]
        assert list(tmp_path.iterdir()) == []  # no report, no temporary folder


@pytest.mark.e2e
def test_an_out_folder_holding_other_files_is_refused(experiments, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_report(experiments, "--out", tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: --out ") and "notes.txt" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]



@pytest.mark.e2e
def test_a_table_with_no_rows_or_other_columns_is_one_error_line_and_no_warning(copy_project):
    repo = copy_project()
    loss, predictions = repo / "metrics/train/plots/metrics/train/loss.tsv", repo / "metrics/predictions/manual.csv"
    good = loss.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "loadtxt: input contained no data" fails the test
        for path, text in ((loss, "step\tloss\n"), (loss, "step\n0\n1\n"), (predictions, "actual,predicted\n")):
            loss.unlink()  # never write through a link into the DVC cache
            loss.write_text(good)
            path.unlink(missing_ok=True)
            path.write_text(text)
            if text == "step\tloss\n":  # DVCLive's header before the first step: an empty curve
                steps, values = read(repo, report.WORKSPACE).curves["train/loss"]["train"]
                assert len(steps) == len(values) == 0
                continue
            with pytest.raises(report.ReportError) as refused:
                read(repo, report.WORKSPACE)
            assert str(refused.value).startswith(f"workspace:{path.relative_to(repo)} is not ")

# --- without DVC: revisions made in memory ----------------------------------------------

def revision(name: str, actual: list[int], predicted: list[int], **params) -> report.Revision:
    arrays = (np.array(actual), np.array(predicted))
    curve = (np.arange(2), np.array([0.5, 0.3]))
    accuracy = float(np.mean(arrays[0] == arrays[1]))
    return report.Revision(name, f"commit {name}", params={k: str(v) for k, v in params.items()},
                           metrics={"metrics/evaluate.json": {"manual.accuracy": accuracy}},
                           curves={"train/loss": {"train": curve, "fit": curve}},
                           predictions={"manual": arrays, "skorch": arrays})


def texts(sections) -> str:
    return "\n".join(part for section in sections for part in section.parts if isinstance(part, str))


def test_a_revision_evaluated_on_another_test_split_is_said_so_not_drawn(tmp_path):
    base = revision("A", [1, 2, 3], [1, 2, 2])
    other = revision("B", [1, 2, 3, 4], [1, 2, 3, 4])
    _, sections = report.build(tmp_path, [base, other])
    assert "The test split of B differs from A's" in texts(sections)
    assert "Test digits that changed" not in [section.title for section in sections]
    images = [part.file_name for section in sections for part in section.parts if isinstance(part, report.Figure)]
    assert images == ["curves.png", "confusion.png"]


def test_without_the_test_images_the_changed_digits_are_listed_by_index(tmp_path):
    base = revision("A", [1, 2, 3, 4], [1, 7, 3, 4], **{"train.lr": 0.001})
    other = revision("B", [1, 2, 3, 4], [1, 2, 3, 9], **{"train.lr": 0.01})
    _, sections = report.build(tmp_path, [base, other])  # tmp_path holds no data/processed
    shown = texts(sections)
    assert "No pictures:" in shown and "dvc pull" in shown
    assert "B vs A, both models: 1 test digits now right (were wrong): test indices 1." in shown
    assert "B vs A, both models: 1 test digits now wrong (were right): test indices 3." in shown
    assert "4 read as 9: 0 → 1 (+1)" in shown and "2 read as 7: 1 → 0 (-1)" in shown


def test_numbers_are_printed_as_dvc_exp_show_does():
    assert report.number(0.97553) == "0.9755"
    assert report.number(0.0067, signed=True) == "+0.0067"
    assert report.number(1.3351e-05) == "1.34e-05"
    assert report.number(411539) == "411539"
    assert report.number(-203528, signed=True) == "-203528"


def tables(sections) -> dict[str, list[list[tuple[str, str]]]]:
    """Each metrics table's rows as (value, difference) cells, by the file its caption names."""
    return {part.caption.split(":")[0]: [[(cell.value, cell.diff) for cell in row] for row in part.rows]
            for section in sections for part in section.parts if isinstance(part, report.Table) and part.caption}


def test_a_new_metric_key_or_file_is_shown_without_being_named_in_the_report(tmp_path):
    base = revision("A", [1, 2], [1, 2])
    other = revision("B", [1, 2], [1, 2])
    other.metrics["metrics/evaluate.json"]["feedback_accuracy"] = 0.8125
    for rev, count in ((base, 3), (other, 5)):
        rev.metrics["metrics/feedback.json"] = {"pictures": count, "same": 1}
    _, sections = report.build(tmp_path, [base, other])
    shown = tables(sections)
    assert [("feedback_accuracy", ""), ("-", ""), ("0.8125", "")] in shown["metrics/evaluate.json"]
    # another metrics file dvc.yaml names: only the values that differ
    assert shown["metrics/feedback.json"] == [[("pictures", ""), ("3", ""), ("5", "+2")]]


def test_a_long_value_wraps_and_every_column_stays_on_the_page(offline_browser, tmp_path):
    base, other = revision("A", [1, 2], [1, 2]), revision("B", [1, 2], [1, 2])
    for rev, digit in ((base, "7"), (other, "9")):  # a hash such as metrics/feedback.json's, 64 characters
        rev.metrics["metrics/feedback.json"] = {"labels_sha256": digit * 64}
    title, sections = report.build(tmp_path, [base, other])
    report.write_report(tmp_path / "report", title, sections)
    offline_browser.get((tmp_path / "report" / "report.html").as_uri())
    page = offline_browser.execute_script("""
        const cell = document.querySelector('td[data-rev="B"][data-key="labels_sha256"]');
        return {text: cell.innerText, right: cell.getBoundingClientRect().right,
                width: document.documentElement.clientWidth, scrolled: document.documentElement.scrollWidth};""")
    assert page["text"].replace("\n", "") == json.dumps("9" * 64)  # wrapped, not cut
    assert page["right"] <= page["width"] and page["scrolled"] <= page["width"], page
