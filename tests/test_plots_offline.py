"""DVC's own plots page (`dvc plots show`, `dvc plots diff`) renders every plot with no network.

The committed .dvc/config points ``plots.html_template`` at .dvc/plots/offline.html,
which carries vega, vega-lite and vega-embed itself (DVC's default page loads them
from a CDN, and none of the interactive plots render offline). It is built by
tools/build_offline_template.py.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from helpers import REPO, dvc
from tools.build_offline_template import build_page, pinned_packages, template_path

TEMPLATE = template_path(REPO)
RENDER_WAIT = 60  # s for vega to draw every plot; about 1 s on an idle machine
MARKS = "document.querySelectorAll('svg.marks, canvas.marks').length"


def vega_plots(repo, *args: str) -> list[str]:
    """The interactive (vega) plots `dvc plots show/diff ARGS` renders, by DVC's own --json."""
    renderers = json.loads(dvc("plots", *args, "--json", cwd=repo).stdout)["data"]
    return [name for name, items in renderers.items() for item in items if item["type"] == "vega"]


def defined_vega_plots(repo) -> set[str]:
    """The titles of dvc.yaml's top-level plots drawn with a vega template (not PNGs)."""
    plots = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    return {next(iter(plot)) for plot in plots if isinstance(plot, dict)}


def rendered_marks(driver, page, expected: int) -> int:
    """Open ``page`` and wait until vega has drawn ``expected`` plots (or the wait is over); how many it drew."""
    driver.get(page.as_uri())
    deadline = time.monotonic() + RENDER_WAIT
    while (count := driver.execute_script(f"return {MARKS}")) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # a plot drawn twice (a bug) would show now
    return driver.execute_script(f"return {MARKS}")


def test_the_template_carries_the_scripts_dvc_would_load_from_its_cdn():
    """offline.html inlines the very versions dvc_render's default page names, and links nothing."""
    page = TEMPLATE.read_text()
    pinned = [f"{name}@{version}" for name, version in pinned_packages().items()]
    assert pinned == ["vega@5.20.2", "vega-lite@5.2.0", "vega-embed@6.18.2"]
    assert re.findall(r'data-package="([^"]+)"', page) == pinned
    assert "{plot_divs}" in page and "{scripts}" not in page  # no placeholder for DVC's CDN tags
    assert not re.search(r"""\b(src|href)\s*=\s*["']?[a-z]*:?//""", page, re.IGNORECASE)
    assert "sourceMappingURL" not in page


def test_the_template_is_the_installed_dvc_page_with_its_scripts_inlined():
    """After a DVC upgrade that changes its page, this fails: rerun tools/build_offline_template.py."""
    page = TEMPLATE.read_text(encoding="utf-8")
    inlined = dict(re.findall(r'<script type="text/javascript" data-package="([^"]+)">\n(.*?)\n    </script>',
                              page, re.S))
    assert list(inlined) == [f"{name}@{version}" for name, version in pinned_packages().items()]
    assert page == build_page(inlined, str(TEMPLATE.parent.relative_to(REPO)))


@pytest.mark.e2e
def test_dvc_plots_show_and_diff_render_every_plot_with_no_network(copy_project, offline_browser, tmp_path):
    repo = copy_project()
    assert dvc("config", "plots.html_template", cwd=repo).stdout.strip() == "plots/offline.html"

    dvc("plots", "show", "-o", str(tmp_path / "show"), cwd=repo)
    page = tmp_path / "show" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr.net" not in html
    plots = vega_plots(repo, "show")
    # dvc.yaml's four (the loss curves, two confusion matrices, tune's scatter) and each training's own curves
    assert len(defined_vega_plots(repo)) == 4 and defined_vega_plots(repo) <= set(plots)
    assert rendered_marks(offline_browser, page, len(plots)) == len(plots)
    errors = [entry["message"] for entry in offline_browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []

    # the workspace against HEAD, after a change: each plot once, both revisions in it
    (repo / "metrics" / "predictions" / "manual.csv").write_text("actual,predicted\n1,1\n2,7\n")
    dvc("plots", "diff", "HEAD", "-o", str(tmp_path / "diff"), cwd=repo)
    plots = vega_plots(repo, "diff", "HEAD")
    assert defined_vega_plots(repo) <= set(plots)
    assert rendered_marks(offline_browser, tmp_path / "diff" / "index.html", len(plots)) == len(plots)
