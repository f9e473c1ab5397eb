"""Write offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

DVC's default page loads these three scripts from cdn.jsdelivr.net, so with
no network (every machine this project is built and tested on) none of the
interactive plots of ``dvc plots show`` / ``dvc plots diff`` render. The
committed ``.dvc/config`` points ``plots.html_template`` at offline.html
(a relative path there is relative to ``.dvc/``), which carries the same
minified builds DVC's own page names (dvc_render's ``VegaRenderer.SCRIPTS``),
taken from the npm packages. They are inlined rather than linked because
``dvc plots show -o DIR`` can write the page anywhere: a relative ``src``
would break. The template has no ``{scripts}`` placeholder, so DVC adds no
CDN tags.

Run once, where the npm registry is reachable, to change the versions:

    python .dvc/plots/build_offline_template.py

It runs ``npm pack`` for the pinned versions (npm checks each tarball's
integrity), writes offline.html and each package's LICENSE beside it.
"""

from __future__ import annotations

import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The versions dvc_render 1.0.2 (DVC 3.67) loads from the CDN; npm's "jsdelivr" file of each.
PACKAGES = {
    "vega": ("5.20.2", "build/vega.min.js"),
    "vega-lite": ("5.2.0", "build/vega-lite.min.js"),
    "vega-embed": ("6.18.2", "build/vega-embed.min.js"),
}

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC plots</title>
    <!-- vega {vega}, vega-lite {vega_lite}, vega-embed {vega_embed} (BSD-3-Clause, see the LICENSE-* files
         in .dvc/plots/), inlined from their npm packages so that this page renders with no network.
         Built by .dvc/plots/build_offline_template.py. -->
{scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def script_tag(name: str, source: str) -> str:
    """``source`` as an inline script: no source-map comment (a fetch), no ``</script`` inside."""
    source = re.sub(r"\n?//# sourceMappingURL=\S+\s*$", "", source)
    if "</script" in source.lower() or any(f"{{{key}}}" in source for key in ("plot_divs", "scripts", "refresh_tag")):
        raise SystemExit(f"{name}: the minified file cannot be inlined as it is")
    return f'    <script type="text/javascript" data-package="{name}">\n{source}\n    </script>'


def main() -> None:
    tags, versions = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, member) in PACKAGES.items():
            tarball = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True,
                                     capture_output=True, text=True).stdout.split()[-1]
            with tarfile.open(Path(tmp) / tarball) as archive:
                source = archive.extractfile(f"package/{member}").read().decode("utf-8")
                license_text = archive.extractfile("package/LICENSE").read().decode("utf-8")
            (HERE / f"LICENSE-{name}").write_text(license_text)
            tags.append(script_tag(f"{name}@{version}", source))
            versions[name.replace("-", "_")] = version
    (HERE / "offline.html").write_text(PAGE.format(scripts="\n".join(tags), **versions))


if __name__ == "__main__":
    main()
