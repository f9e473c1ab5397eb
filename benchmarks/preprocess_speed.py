"""Cost of ``to_mnist`` against a bare decode and resize of the same picture, in one process.

For each picture, times ``to_mnist(data)`` and the least any reader of the
picture pays, ``Image.open(data).convert("L").resize((28, 28))``, alternately
(so that a busy machine slows both alike), and prints the best CPU time of
this process (``time.process_time``: other processes' turns on the CPU do
not count) of each over ``--repeat`` rounds of ``--number`` calls, and their
ratio. The pictures:

- canvas: the 280x280 PNG of a drawn "3" that ``serve_load.py`` sends (what
  the page sends: dark strokes on a transparent canvas);
- scan:   a fixture-style digit, dark on white, 280x280 greyscale PNG;
- photo:  a pen "7" on off-white paper with a lighting gradient, 1200x900 JPEG.

    .venv/bin/python benchmarks/preprocess_speed.py [--number 50] [--repeat 15] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import canvas_png  # noqa: E402
from mnist_dvc.apps.images import to_mnist  # noqa: E402


def scan_png() -> bytes:
    img = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(img).ellipse((85, 40, 195, 240), outline=30, width=22)  # a "0"
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def photo_jpeg() -> bytes:
    w, h = 1200, 900
    light = np.linspace(1.0, 0.7, w)[None, :] * np.linspace(1.0, 0.9, h)[:, None]
    paper = Image.fromarray(np.round(235 * light).astype(np.uint8), "L").convert("RGB")
    ImageDraw.Draw(paper).line([(460, 270), (740, 270), (540, 650)], fill=(25, 30, 90), width=24)
    buffer = io.BytesIO()
    paper.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def bare(data: bytes) -> None:
    Image.open(io.BytesIO(data)).convert("L").resize((28, 28))


def best_of(pictures: dict[str, bytes], number: int, repeat: int) -> dict[str, dict[str, float]]:
    """{picture: {"to_mnist_ms", "bare_ms", "ratio"}}: the best round of each, rounds alternating."""
    results = {}
    for name, data in pictures.items():
        to_mnist(data)  # lazy imports, caches
        bare(data)
        times = {"to_mnist": [], "bare": []}
        for _ in range(repeat):
            for label, function in (("bare", bare), ("to_mnist", to_mnist)):
                start = time.process_time()
                for _ in range(number):
                    function(data)
                times[label].append((time.process_time() - start) / number * 1000)
        best = {label: min(values) for label, values in times.items()}
        results[name] = {"to_mnist_ms": best["to_mnist"], "bare_ms": best["bare"],
                         "ratio": best["to_mnist"] / best["bare"], "bytes": len(data)}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=50, help="calls per timed round")
    parser.add_argument("--repeat", type=int, default=15, help="rounds; the best is kept")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()

    pictures = {"canvas": canvas_png(), "scan": scan_png(), "photo": photo_jpeg()}
    results = best_of(pictures, args.number, args.repeat)
    print(f"best of {args.repeat} rounds of {args.number} calls "
          f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})")
    print("| picture | bytes | to_mnist ms | open + convert('L') + resize ms | ratio |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['bytes']:,} | {result['to_mnist_ms']:.2f} | {result['bare_ms']:.2f} | "
              f"{result['ratio']:.2f} |")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
