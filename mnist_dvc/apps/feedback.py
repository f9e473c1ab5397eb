"""The feedback store: pictures people corrected in the web app, as a dataset DVC can version.

    python -m mnist_dvc.apps.serve --collect data/feedback/pictures [--collect-limit 10000]

The folder's format: docs/feedback.md. File names come only from the content
hash, never from the request; every write is atomic, and labels.csv changes under
a lock held between threads and processes: concurrent corrections never lose a row.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from mnist_dvc.apps.images import to_png
from mnist_dvc.data import DIGITS, FEEDBACK_LABELS, format_feedback_labels, read_feedback_labels
from mnist_dvc.stage import StageError, atomic_path

DEFAULT_LIMIT = 10_000


class StoreFull(Exception):
    """The store already holds its limit of pictures; str(exc) says so and what to do."""


@dataclass(frozen=True)
class Stored:
    """One correction as stored: its file name, its label, whether the picture is new, the pictures held."""

    file: str
    label: int
    created: bool
    total: int


class FeedbackStore:
    """The folder of corrected pictures; ``add`` is safe to call from many threads and processes."""

    def __init__(self, folder: Path | str, limit: int = DEFAULT_LIMIT):
        if limit < 1:
            raise ValueError(f"the limit must be at least 1, got {limit}")
        self.folder, self.limit = Path(folder), limit
        # One lock per collection folder on this machine, named by its absolute path.
        key = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:16]
        self._lock = FileLock(Path(tempfile.gettempdir()) / f"mnist-dvc-feedback-{key}.lock")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StageError(f"{self.folder}: cannot create the folder for corrections: "
                             f"{exc.strerror or exc}") from None
        if not self.folder.is_dir():
            raise StageError(f"{self.folder} is not a folder")
        with self._lock:
            labels = read_feedback_labels(self.folder)  # a damaged labels.csv stops the server at start
            if not (self.folder / FEEDBACK_LABELS).exists():
                self._write_labels(labels)

    def count(self) -> int:
        """The pictures held now."""
        with self._lock:
            return len(read_feedback_labels(self.folder))

    def add(self, image28: np.ndarray, label: int) -> Stored:
        """Store the 28x28 input ``image28`` (floats in [0, 1]) with ``label``; StoreFull if the store is full."""
        if not (isinstance(label, int) and label in DIGITS):
            raise ValueError(f"label must be a digit 0..9, got {label!r}")
        png = to_png(image28)
        name = hashlib.sha256(png).hexdigest() + ".png"
        with self._lock:
            labels = read_feedback_labels(self.folder)
            created = name not in labels
            if created and len(labels) >= self.limit:
                raise StoreFull(f"the collection in {self.folder} is full ({self.limit} pictures): "
                                f"version it (`dvc add {self.folder}`) and restart the server "
                                f"with a larger --collect-limit or another --collect folder")
            path = self.folder / name
            if not path.is_file() or path.read_bytes() != png:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(png)
            if labels.get(name) != label:
                labels[name] = label
                self._write_labels(labels)
            return Stored(name, label, created, len(labels))

    def _write_labels(self, labels: dict[str, int]) -> None:
        with atomic_path(self.folder / FEEDBACK_LABELS) as tmp:
            tmp.write_text(format_feedback_labels(labels), encoding="utf-8")
