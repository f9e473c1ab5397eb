"""What every stage does the same way: fail with one clear line, write atomically.

- ``StageError`` is the one exception a stage raises for a problem the user
  can fix (a bad parameter, a corrupt file, an unreachable mirror).
  ``run_stage(main)`` prints it as ``error: ...`` without a traceback and
  exits with status 1.
- ``run_stage`` also freezes the garbage collector's view of the objects
  that exist before and after ``main`` (``gc.freeze``): the cyclic
  collector then never walks the ~190,000 objects ``import torch`` creates,
  during the run or at interpreter exit, which otherwise spends about
  0.5 s collecting them before the process can end. Frozen objects are still
  freed; nothing a stage writes depends on it.
- SIGINT (Ctrl-C) and SIGTERM are turned into an exception (``Interrupted``),
  so an interrupted stage unwinds through ``atomic_path`` and removes its
  temporary file, and exits with status 130.
- ``atomic_path(path)`` yields a temporary path next to ``path`` and renames
  it over ``path`` only when the block succeeds: a reader never sees a
  half-written output, and a failed stage never replaces a good one.
  ``atomic_file(path)`` does the same with an open binary file, for savers
  (``torch.save``, ``np.save``, skorch's ``save_params``) that would otherwise
  record the temporary file's random name in the bytes they write.
  ``atomic_dir(path)`` does it for a whole folder (DVCLive's).

This module imports only the standard library: every stage imports it, and
a stage's start-up is paid on every run.
"""

from __future__ import annotations

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
    """Raised on SIGINT (Ctrl-C) and SIGTERM, so that cleanup runs and the stage fails.

    Not a KeyboardInterrupt: skorch's ``fit`` catches KeyboardInterrupt, ends
    training early and returns normally, and the stage would save a
    half-trained model and exit 0.
    """


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
    """Yield a new empty folder next to ``path``; it replaces the folder ``path`` when the block succeeds.

    For writers that fill a folder as they go (DVCLive's metrics and plots):
    a failed or interrupted stage leaves the last good folder as it was.
    """
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
    """Yield a binary file open for writing; it becomes ``path`` when the block succeeds.

    Savers get a file object, not a path: given a path, ``torch.save`` names
    the archive inside after the (random) temporary file, and the bytes would
    differ between two identical runs.
    """
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


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; turn StageError and interrupts into a clean exit."""
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    gc.freeze()  # the imported modules' objects: see the module's docstring
    try:
        main()
        gc.freeze()
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as exc:
        print(f"interrupted ({exc}): no output was replaced", file=sys.stderr)
        sys.exit(130)
