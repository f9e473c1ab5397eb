"""Where the pipeline's time goes: each stage's wall time, and how much of it is start-up.

    .venv/bin/python benchmarks/pipeline_time.py [--mirror DIR] [--md5 KEY=MD5 ...]

Copies the project (its tracked sources, no data) into a temporary git
repository, points ``download.mirrors`` at ``--mirror`` (default: the shared
offline copy ``../shared/datasets/mnist`` when it exists, else the mirrors in
params.yaml), runs ``dvc repro`` once to fetch the data, then:

1. runs every stage's command from dvc.yaml, in pipeline order, as DVC would,
   under ``python -X importtime``: its wall time, the time spent importing
   (every import, also those made lazily inside functions, such as the one
   ``torch.optim`` makes of ``torch._dynamo``), and the rest, the stage's own
   work (loading data, training, writing);
2. times ``python -c "import torch"`` alone, the reference for start-up;
3. times a forced ``dvc repro --force`` of the whole pipeline, as a user runs it.

Nothing in this repository is changed. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from helpers import copy_sources  # noqa: E402 (the files a project copy needs: one list for tests and benchmarks)

SHARED = REPO.parent / "shared" / "datasets" / "mnist"
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def run(cmd: list[str] | str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": ""}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.exit(f"{cmd} failed:\n{result.stdout}\n{result.stderr}")
    return result


def make_copy(dest: Path, mirror: Path | None, md5: dict[str, str]) -> None:
    """The sources as the tests copy them, with the real params.yaml, committed."""
    copy_sources(dest)
    shutil.copy2(REPO / "params.yaml", dest / "params.yaml")
    params = yaml.safe_load((dest / "params.yaml").read_text())
    if mirror is not None:
        params["download"]["mirrors"].insert(0, mirror.resolve().as_uri() + "/")
    params["download"]["md5"].update(md5)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-qm", "bench"]):
        run(cmd, dest)


def import_seconds(stderr: str) -> float:
    """Total time spent importing, from ``-X importtime``: the sum over top-level imports."""
    total = 0
    for line in stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if match and len(match.group(3)) == 1:  # one space: a top-level import
            total += int(match.group(2))
    return total / 1e6


def time_stage(cmd: str, cwd: Path) -> tuple[float, float]:
    """(wall seconds, import seconds) of one stage command run as DVC runs it."""
    assert cmd.startswith("python -m "), cmd
    argv = [sys.executable, "-X", "importtime", *cmd.split()[1:]]
    started = time.perf_counter()
    result = run(argv, cwd)
    return time.perf_counter() - started, import_seconds(result.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, default=SHARED if SHARED.is_dir() else None,
                        help="a folder holding the four MNIST .gz files (default: %(default)s)")
    parser.add_argument("--md5", action="append", default=[], metavar="KEY=MD5",
                        help="override download.md5.KEY, for a trusted copy whose md5 differs from the official one")
    args = parser.parse_args()
    md5 = dict(item.split("=", 1) for item in args.md5)

    with tempfile.TemporaryDirectory(prefix="pipeline-time-") as tmp:
        work = Path(tmp)
        make_copy(work, args.mirror, md5)
        print(f"project copy in {work}; dvc repro (fetching the data, not timed) ...", file=sys.stderr)
        run(["dvc", "repro"], work)

        started = time.perf_counter()
        run([sys.executable, "-c", "import torch"], work)
        torch_import = time.perf_counter() - started

        stages = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
        rows = []
        for name, stage in stages.items():
            wall, imports = time_stage(" ".join(stage["cmd"].split()), work)
            rows.append((name, wall, imports))
            print(f"  {name}: {wall:.2f} s", file=sys.stderr)

        started = time.perf_counter()
        run(["dvc", "repro", "--force"], work)
        forced = time.perf_counter() - started

    print("| stage | wall (s) | importing (s) | the stage's own work (s) |")
    print("|---|---|---|---|")
    for name, wall, imports in rows:
        print(f"| {name} | {wall:.2f} | {imports:.2f} | {wall - imports:.2f} |")
    total = sum(wall for _, wall, _ in rows)
    print(f"| **all stages** | **{total:.2f}** | {sum(i for *_, i in rows):.2f} | "
          f"{sum(w - i for _, w, i in rows):.2f} |")
    print()
    print(f"`import torch` alone: {torch_import:.2f} s (python start-up included)")
    print(f"`dvc repro --force` (every stage, DVC's own work included): {forced:.1f} s")


if __name__ == "__main__":
    main()
