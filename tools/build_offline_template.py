"""Write DVC's plots page with vega, vega-lite and vega-embed inlined, so that it renders offline.

DVC's page (dvc_render's ``PAGE_HTML``) loads these three scripts from
cdn.jsdelivr.net (``VegaRenderer.SCRIPTS``), so with no network none of the
interactive plots of ``dvc plots show`` / ``dvc plots diff`` render. This
script writes that page with the very versions it names inlined, where the
committed ``.dvc/config`` points ``plots.html_template`` (relative to
``.dvc/``), and each package's LICENSE beside it. The scripts are inlined
rather than linked because ``dvc plots show -o DIR`` can write the page
anywhere: a relative ``src`` would break. The page keeps no ``{scripts}``
placeholder, so DVC adds no CDN tags.

The page and the versions both come from the installed dvc_render: after a
DVC upgrade, rerun it where the npm registry is reachable:

    python tools/build_offline_template.py

Each package comes from ``npm pack`` (npm checks the tarball's integrity); the
file inlined is the one jsdelivr serves for it, its package.json's ``jsdelivr``.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CDN_SCRIPT = re.compile(r'<script src="https://cdn\.jsdelivr\.net/npm/([\w-]+)@([\w.-]+)"></script>')
PLACEHOLDERS = ("scripts", "plot_divs", "refresh_tag")


def pinned_packages() -> dict[str, str]:
    """The packages DVC's page loads from the CDN, in its order: ``{name: version}``."""
    from dvc_render.vega import VegaRenderer

    pins = dict(CDN_SCRIPT.findall(VegaRenderer.SCRIPTS))
    if not pins:
        raise SystemExit(f"no CDN script in dvc_render's VegaRenderer.SCRIPTS: {VegaRenderer.SCRIPTS!r}")
    return pins


def template_path(root: Path = ROOT) -> Path:
    """The file ``plots.html_template`` in ``root``'s .dvc/config names (a relative path is relative to .dvc/)."""
    from configobj import ConfigObj  # what DVC reads its config with

    return root / ".dvc" / ConfigObj(str(root / ".dvc" / "config"))["plots"]["html_template"]


def script_tag(package: str, source: str) -> str:
    """``source`` as an inline script: no source-map comment (a fetch), no ``</script`` inside."""
    source = re.sub(r"\n?//# sourceMappingURL=\S+\s*$", "", source)
    if "</script" in source.lower() or any(f"{{{key}}}" in source for key in PLACEHOLDERS):
        raise SystemExit(f"{package}: the minified file cannot be inlined as it is")
    return f'    <script type="text/javascript" data-package="{package}">\n{source}\n    </script>'


def build_page(sources: dict[str, str], licences: str) -> str:
    """DVC's page with ``sources`` (``{"name@version": minified source}``) inlined in place of its
    ``{scripts}``; ``licences`` is the folder that holds their LICENSE files, for the page's comment."""
    from dvc_render.html import PAGE_HTML

    if PAGE_HTML.count("    {scripts}\n") != 1 or PAGE_HTML.count("<head>\n") != 1:
        raise SystemExit("dvc_render's PAGE_HTML changed its layout: update build_page")
    versions = ", ".join(package.replace("@", " ") for package in sources)
    comment = (f"    <!-- {versions} (BSD-3-Clause, see the LICENSE-* files\n"
               f"         in {licences}/), inlined from their npm packages so that this page renders with no network.\n"
               f"         Built by tools/{Path(__file__).name}. -->\n")
    scripts = "\n".join(script_tag(package, source) for package, source in sources.items())
    # The minified scripts hold non-ASCII characters: without a charset a browser may read them as windows-1252.
    page = PAGE_HTML.replace("<head>\n", '<head>\n    <meta charset="utf-8">\n')
    return page.replace("    {scripts}\n", comment + scripts + "\n") + "\n"


def npm_package(name: str, version: str, folder: Path) -> tuple[str, str]:
    """The file jsdelivr serves for ``name@version`` and the package's LICENSE, from ``npm pack``."""
    tarball = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=folder, check=True,
                             capture_output=True, text=True).stdout.split()[-1]
    with tarfile.open(folder / tarball) as archive:
        def read(member: str) -> str:
            return archive.extractfile(f"package/{member}").read().decode("utf-8")
        served = json.loads(read("package.json"))["jsdelivr"]
        return read(served.removeprefix("./")), read("LICENSE")


def main() -> None:
    template = template_path()
    sources = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, version in pinned_packages().items():
            sources[f"{name}@{version}"], licence = npm_package(name, version, Path(tmp))
            (template.parent / f"LICENSE-{name}").write_text(licence)
    template.write_text(build_page(sources, str(template.parent.relative_to(ROOT))))


if __name__ == "__main__":
    main()
