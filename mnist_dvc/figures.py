"""Deterministic PNGs: headless Agg, the bundled DejaVu font, no timestamp or version in the file.

Import it before pyplot is used. With a fixed figure size, the same inputs give the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mnist_dvc.stage import atomic_path  # noqa: E402

plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 10})


def png_bytes(fig, dpi: int) -> bytes:
    """``fig`` as PNG bytes, without metadata that changes between runs; closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def save_png(fig, path: Path | str, dpi: int) -> None:
    """Save ``fig`` as ``png_bytes``, atomically; close it."""
    data = png_bytes(fig, dpi)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
