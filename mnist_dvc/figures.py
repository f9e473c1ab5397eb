"""Deterministic PNGs for the stages that draw: plot and tune.

Importing this module selects matplotlib's headless Agg backend and the
bundled DejaVu font before pyplot is used; ``save_png`` writes no timestamp
or version into the file. With a fixed figure size, the same inputs give the
same bytes.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mnist_dvc.stage import atomic_path  # noqa: E402

plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 10})


def save_png(fig, path: Path | str, dpi: int) -> None:
    """Save ``fig`` as a PNG without metadata that changes between runs, atomically; close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
