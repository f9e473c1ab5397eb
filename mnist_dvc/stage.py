"""What every stage does the same way: fail with one clear line, write atomically.

``run_stage(main)`` prints a ``StageError`` (a problem the user can fix) as
``error: ...`` and exits 1; SIGINT and SIGTERM raise ``Interrupted``, so the
stage unwinds through the ``atomic_*`` helpers (a reader never sees a
half-written output, a failed stage never replaces a good one) and exits 130.
It also calls ``gc.freeze()``, why: docs/design.md, "Start-up is part of the
product". Only the standard library here: every stage imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO


class StageError(Exception):
    """A problem with the inputs that the user can fix; the message says how."""


class Interrupted(BaseException):
    """Raised on SIGINT and SIGTERM. Not a KeyboardInterrupt, which skorch's ``fit`` catches
    to end training early and return normally: the stage would save a half-trained model."""


def _raise_interrupted(signum, frame):
    raise Interrupted("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it to ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a new empty folder next to ``path``, for writers that fill one as they go (DVCLive);
    it replaces the folder ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        old = tmp.with_suffix(".old")
        if path.is_dir() and not path.is_symlink():
            os.replace(path, old)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_suffix(".old")):
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[BinaryIO]:
    """Yield a binary file open for writing; it becomes ``path`` when the block succeeds. For savers: given a
    path, ``torch.save`` names the archive inside after the random temporary file's name."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        yield f


def write_json(path: Path | str, data) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path | str, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Write a CSV with a header row and ``\\n`` line ends, atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def parse_paths(doc: str, argv: list[str] | None, **defaults: str) -> argparse.Namespace:
    """A stage's command line: ``--<key>`` (``_`` written ``-``) for each keyword, a path with that default."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for key, default in defaults.items():
        parser.add_argument("--" + key.replace("_", "-"), type=Path, default=Path(default))
    return parser.parse_args(argv)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; turn StageError and interrupts into a clean exit."""
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    gc.freeze()  # the imported modules' objects
    try:
        main()
        gc.freeze()
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as exc:
        print(f"interrupted ({exc}): no output was replaced", file=sys.stderr)
        sys.exit(130)
