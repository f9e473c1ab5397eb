"""Accuracy on digits that were never MNIST: typeset, photographed, drawn on a canvas.

Generates, deterministically from ``--seed``, three kinds of pictures and
passes each one's encoded bytes through ``mnist_dvc.apps.images.to_mnist``, as the
``predict`` command and the web app do:

- typeset: the digits 0-9 in the fonts matplotlib ships (DejaVu Sans / Mono /
  Serif, STIX, Computer Modern) and any DejaVu system fonts, regular, bold and
  oblique, at various sizes and positions, both polarities, as PNG;
- photo:   pen strokes (hand-made polyline templates, or a font's outline) in
  dark blue or black ink on off-white paper, with paper texture, a lighting
  gradient, blur and a small rotation, 1200x900, as JPEG;
- lined:   60 more such photos on ruled notebook paper (pale blue lines
  every 45-75 px, half of them with a red margin line), as JPEG;
- canvas:  strokes with round joins and caps, 10-28 px wide, on a 280x280
  transparent RGBA canvas (what an HTML canvas's ``toBlob()`` gives), a
  quarter of them white on a canvas filled black, as PNG.

Then it classifies them with both trained models (``models/mlp.pt`` and
``models/skorch_params.pt`` under ``--root``, as ``predict`` does), and,
for comparison, classifies a plain ``resize((28, 28))`` of the same pictures.
It writes a contact sheet (``--sheet``): some pictures, the 28x28 input each
became, and the predicted digit.

Usage:
    .venv/bin/python benchmarks/own_digits.py [--root .] [--out DIR] [--seed 0] [--min-accuracy 0.85]
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mnist_dvc.figures import plt, save_png  # noqa: E402  (selects the Agg backend)
from mnist_dvc.apps.images import ImageError, to_mnist  # noqa: E402
from mnist_dvc.apps.inference import MODELS, Predictor  # noqa: E402
from mnist_dvc.stage import StageError  # noqa: E402

CATEGORIES = ("typeset", "photo", "canvas", "lined")
MPL_FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
             "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
             "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
             "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf"]
SYSTEM_FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSansCondensed.ttf",
                "/usr/share/fonts/truetype/dejavu/DejaVuSerifCondensed-Bold.ttf",
                "/usr/share/fonts/truetype/dejavu/DejaVuSans-ExtraLight.ttf"]


def fonts() -> list[Path]:
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    found = [folder / name for name in MPL_FONTS if (folder / name).exists()]
    return found + [Path(p) for p in SYSTEM_FONTS if Path(p).exists()]


# --- stroke templates: each digit as a few polylines in a unit box (x right, y down) ----

def arc(cx, cy, rx, ry, start, stop, n=24):
    """Points on an ellipse; angles in degrees, 0 = right, 90 = down (y grows downwards)."""
    t = np.radians(np.linspace(start, stop, n))
    return list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t)))


TEMPLATES: dict[int, list[list[list[tuple[float, float]]]]] = {
    0: [[arc(0.5, 0.5, 0.32, 0.5, -90, 275)],
        [arc(0.5, 0.5, 0.4, 0.48, -100, 265)]],
    1: [[[(0.5, 0.0), (0.5, 1.0)]],
        [[(0.25, 0.22), (0.55, 0.0), (0.55, 1.0)]],
        [[(0.3, 0.2), (0.55, 0.0), (0.55, 1.0)], [(0.3, 1.0), (0.8, 1.0)]]],
    2: [[arc(0.5, 0.28, 0.33, 0.28, 190, 370) + [(0.1, 1.0), (0.9, 1.0)]],
        [arc(0.48, 0.3, 0.36, 0.3, 180, 385) + [(0.08, 0.97), (0.5, 0.9), (0.95, 1.0)]]],
    3: [[arc(0.45, 0.26, 0.32, 0.26, 200, 450) + arc(0.45, 0.74, 0.37, 0.26, 270, 520)],
        [[(0.1, 0.0), (0.85, 0.0), (0.4, 0.42)] + arc(0.45, 0.7, 0.4, 0.3, 270, 510)]],
    4: [[[(0.7, 1.0), (0.7, 0.0), (0.05, 0.68), (0.95, 0.68)]],
        [[(0.25, 0.0), (0.12, 0.6), (0.9, 0.6)], [(0.68, 0.15), (0.68, 1.0)]]],
    5: [[[(0.85, 0.0), (0.25, 0.0), (0.2, 0.45)] + arc(0.47, 0.68, 0.38, 0.32, 220, 490)],
        [[(0.2, 0.45), (0.25, 0.0)] + arc(0.47, 0.68, 0.38, 0.32, 220, 490), [(0.25, 0.0), (0.85, 0.0)]]],
    6: [[arc(0.6, 0.55, 0.45, 0.55, 290, 180, 12) + arc(0.5, 0.7, 0.35, 0.3, 180, 540)],
        [[(0.75, 0.0), (0.3, 0.45)] + arc(0.5, 0.7, 0.33, 0.3, 200, 560)]],
    7: [[[(0.05, 0.0), (0.95, 0.0), (0.35, 1.0)]],
        [[(0.05, 0.1), (0.15, 0.0), (0.95, 0.0), (0.45, 1.0)], [(0.35, 0.5), (0.85, 0.5)]]],
    8: [[arc(0.5, 0.25, 0.28, 0.25, 90, 450), arc(0.5, 0.73, 0.36, 0.27, -90, 270)],
        [arc(0.5, 0.25, 0.3, 0.25, 0, -270) + arc(0.5, 0.73, 0.38, 0.27, -90, 180) + [(0.8, 0.25)]]],
    9: [[arc(0.45, 0.3, 0.35, 0.3, 0, 360) + [(0.8, 1.0)]],
        [arc(0.45, 0.3, 0.35, 0.3, -10, 360) + arc(0.3, 0.3, 0.5, 0.7, 0, 90, 10)]],
}


def jittered_strokes(digit: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A template of ``digit``, randomly slanted, rotated, squeezed and wobbled; unit-ish box."""
    template = TEMPLATES[digit][rng.integers(len(TEMPLATES[digit]))]
    angle = math.radians(rng.uniform(-10, 10))
    shear = rng.uniform(-0.3, 0.15)
    sx = rng.uniform(0.65, 1.1)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    out = []
    for stroke in template:
        p = np.asarray(stroke, dtype=float) - 0.5
        p += rng.normal(0, 0.02, p.shape)  # a hand's wobble
        p[:, 0] = p[:, 0] * sx + shear * p[:, 1]
        out.append(p @ rot.T)
    return out


def draw_strokes(strokes: list[np.ndarray], size: tuple[int, int], height: float, width: float,
                 rng: np.random.Generator, supersample: int = 4) -> Image.Image:
    """An anti-aliased 'L' mask (255 = ink) of ``strokes``, ``height`` px tall, at a random place inside."""
    s = supersample
    canvas = Image.new("L", (size[0] * s, size[1] * s), 0)
    draw = ImageDraw.Draw(canvas)
    allp = np.concatenate(strokes)
    lo, hi = allp.min(0), allp.max(0)
    scale = height / max(hi[1] - lo[1], 1e-6)
    half = (hi - lo) * scale / 2 + width / 2 + 2  # the digit's half extent, strokes included
    scale *= min(1.0, *(size[i] / 2 / half[i] for i in range(2)))  # shrink if it would not fit
    half = np.minimum(half, np.array(size) / 2)
    box = [rng.uniform(half[i], size[i] - half[i]) for i in range(2)]
    centre = (lo + hi) / 2
    w = width * s
    for stroke in strokes:
        pts = [((x - centre[0]) * scale * s + box[0] * s, (y - centre[1]) * scale * s + box[1] * s)
               for x, y in stroke]
        draw.line(pts, fill=255, width=max(1, round(w)), joint="curve")
        for x, y in (pts[0], pts[-1]):  # round caps
            draw.ellipse((x - w / 2, y - w / 2, x + w / 2, y + w / 2), fill=255)
    return canvas.resize(size, Image.LANCZOS)


def glyph_mask(digit: int, font_path: Path, size: tuple[int, int], height: float,
               centre: tuple[float, float], stroke: int = 0) -> Image.Image:
    """An 'L' mask of ``digit`` typeset so that its ink is ``height`` px tall, centred at ``centre``."""
    probe = ImageFont.truetype(str(font_path), 200)
    l, t, r, b = probe.getbbox(str(digit), stroke_width=stroke)
    font = ImageFont.truetype(str(font_path), max(4, round(200 * height / max(b - t, 1))))
    l, t, r, b = font.getbbox(str(digit), stroke_width=stroke)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).text((centre[0] - (l + r) / 2, centre[1] - (t + b) / 2), str(digit), fill=255,
                              font=font, stroke_width=stroke, stroke_fill=255)
    return mask


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# --- the three categories ---------------------------------------------------------

def typeset(rng: np.random.Generator) -> list[tuple[str, int, bytes]]:
    out = []
    for f, font_path in enumerate(fonts()):
        for digit in range(10):
            for variant in range(2):
                side = int(rng.choice([64, 128, 200, 320]))
                size = (side, int(side * rng.uniform(0.8, 1.3)))
                height = rng.uniform(0.3, 0.85) * min(size)
                cx = size[0] / 2 + rng.uniform(-0.2, 0.2) * (size[0] - height * 0.7)
                cy = size[1] / 2 + rng.uniform(-0.2, 0.2) * (size[1] - height)
                mask = np.asarray(glyph_mask(digit, font_path, size, height, (cx, cy)), dtype=np.float32) / 255
                dark_on_light = (f + digit + variant) % 2 == 0
                ink, paper = (0.0, 1.0) if dark_on_light else (1.0, 0.0)
                grey = paper + (ink - paper) * mask
                img = Image.fromarray(np.round(grey * 255).astype(np.uint8), "L")
                out.append((f"{font_path.stem}-{digit}-{variant}", digit, encode(img, "PNG")))
    return out


def ruling(size: tuple[int, int], rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """A notebook's ruled lines (mask 255), every 45-75 px, 2-4 px wide; and a margin line, or none."""
    w, h = size
    lines, margin = Image.new("L", size, 0), Image.new("L", size, 0)
    spacing, width = rng.uniform(45, 75), int(rng.integers(2, 5))
    for y in np.arange(rng.uniform(0, spacing), h, spacing):
        ImageDraw.Draw(lines).line([(0, y), (w, y)], fill=255, width=width)
    if rng.random() < 0.5:
        x = rng.uniform(0.05, 0.2) * w
        ImageDraw.Draw(margin).line([(x, 0), (x, h)], fill=255, width=width)
    return lines, margin


def paper_photo(mask: Image.Image, rng: np.random.Generator, ruled: bool = False) -> Image.Image:
    """``mask`` (ink = 255) as ink on a photographed sheet: texture, lighting, blur, rotation;
    on ruled notebook paper (pale blue lines, a red margin line or none) if ``ruled``."""
    layers = [mask, *(ruling(mask.size, rng) if ruled else ())]
    angle, blur = rng.uniform(-8, 8), rng.uniform(0.8, 2.5)
    layers = [layer.rotate(angle, resample=Image.BICUBIC).filter(ImageFilter.GaussianBlur(blur))
              for layer in layers]
    mask = layers[0]
    w, h = mask.size
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255
    paper = np.array([rng.uniform(225, 250), rng.uniform(220, 245), rng.uniform(200, 235)], np.float32)
    ink = np.array([25, 30, 35], np.float32) if rng.random() < 0.5 else np.array([30, 45, 120], np.float32)
    ink = ink * rng.uniform(0.8, 1.6)
    img = np.broadcast_to(paper, (h, w, 3))
    for layer, colour in zip(layers[1:], ([120, 160, 225], [225, 110, 110])):  # blue rules, red margin
        line = np.asarray(layer, dtype=np.float32)[..., None] / 255
        img = img * (1 - line) + np.array(colour, np.float32) * line
    img = img * (1 - m) + ink * m
    # Lighting: a linear gradient in a random direction, and a vignette.
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = ((xs / w - 0.5) * math.cos(theta) + (ys / h - 0.5) * math.sin(theta))
    light = 1 - rng.uniform(0.1, 0.35) * (ramp + 0.5)
    light -= rng.uniform(0, 0.15) * (((xs / w - 0.5) ** 2 + (ys / h - 0.5) ** 2) * 2)
    img = img * light[..., None]
    # Paper texture: fine grain plus a blotchy low-frequency pattern.
    grain = rng.normal(0, rng.uniform(2, 6), (h, w, 1)).astype(np.float32)
    coarse = rng.normal(0, 1, (h // 40 + 2, w // 40 + 2)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.BICUBIC))[..., None]
    img = img + grain + blotch * rng.uniform(1, 4)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def photo(rng: np.random.Generator, count: int = 120, ruled: bool = False) -> list[tuple[str, int, bytes]]:
    out = []
    font_list = fonts()
    size = (1200, 900)
    kind = "lined" if ruled else "photo"
    for i in range(count):
        digit = i % 10
        height = rng.uniform(250, 700)
        if i % 3 == 0:  # a font's outline, thickened like a felt pen
            font_path = font_list[int(rng.integers(len(font_list)))]
            centre = (size[0] / 2 + rng.uniform(-200, 200), size[1] / 2 + rng.uniform(-80, 80))
            mask = glyph_mask(digit, font_path, size, height, centre, stroke=int(rng.integers(0, 6)))
        else:
            width = height * rng.uniform(0.04, 0.12)
            mask = draw_strokes(jittered_strokes(digit, rng), size, height, width, rng, supersample=2)
        img = paper_photo(mask, rng, ruled)
        out.append((f"{kind}-{i:03d}-{digit}", digit, encode(img, "JPEG", quality=int(rng.integers(70, 92)))))
    return out


def canvas(rng: np.random.Generator) -> list[tuple[str, int, bytes]]:
    out = []
    for i in range(200):
        digit = i % 10
        height = rng.uniform(110, 230)
        width = rng.uniform(10, 28)
        mask = draw_strokes(jittered_strokes(digit, rng), (280, 280), height, width, rng)
        if i % 4 == 3:  # the MNIST-demo style: white strokes on a canvas filled black
            rgba = Image.merge("RGBA", (mask, mask, mask, Image.new("L", mask.size, 255)))
        else:  # black strokes (RGB 0) on a transparent canvas
            rgba = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
            rgba.putalpha(mask)
        out.append((f"canvas-{i:03d}-{digit}", digit, encode(rgba, "PNG")))
    return out


# --- classification ------------------------------------------------------------------

def plain_resize(data: bytes) -> np.ndarray:
    """The naive input: the picture resized to 28x28, greyscale, as is."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L").resize((28, 28), Image.BILINEAR), dtype=np.float32) / 255


def safe_to_mnist(name: str, data: bytes, refused: list[str]) -> np.ndarray:
    """to_mnist, or (counted as wrong) an all-zero input for a picture it refuses."""
    try:
        return to_mnist(data)
    except ImageError as exc:
        refused.append(f"{name}: {exc}")
        return np.zeros((28, 28), np.float32)


def contact_sheet(path: Path, samples: list[tuple[str, int, bytes, np.ndarray, int]]) -> None:
    n = len(samples)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3.0))
    for col, (name, label, data, inp, pred) in enumerate(samples):
        with Image.open(io.BytesIO(data)) as img:
            shown = img.convert("RGBA")
        shown.thumbnail((160, 160))
        paper = Image.new("RGBA", shown.size, (255, 255, 255, 255))
        axes[0, col].imshow(Image.alpha_composite(paper, shown).convert("RGB"))
        axes[0, col].set_title(name.replace(": ", "\n"), fontsize=7)
        axes[1, col].imshow(inp, cmap="gray", vmin=0, vmax=1)
        ok = "" if pred == label else " (x)"
        axes[1, col].set_title(f"{label} -> {pred}{ok}", fontsize=9, color="black" if pred == label else "red")
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("own digits: picture (top), the 28x28 input to_mnist made, true -> predicted (manual)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="the project folder with models/ and params.yaml (default: the current one)")
    parser.add_argument("--min-accuracy", type=float, default=0.0,
                        help="exit 1 if either model's overall accuracy (after to_mnist) is below this")
    parser.add_argument("--out", type=Path, help="save the generated pictures (by category) here")
    parser.add_argument("--sheet", type=Path, default=ROOT / "docs" / "images" / "own_digits.png",
                        help="where to write the contact sheet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        predictor = Predictor(args.root)
    except StageError as exc:
        sys.exit(f"error: {exc}")
    names = list(MODELS)

    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    pictures = {"typeset": typeset(rng), "photo": photo(rng), "canvas": canvas(rng),
                "lined": photo(rng, count=60, ruled=True)}
    made = time.perf_counter() - start
    if args.out:
        for category, items in pictures.items():
            folder = args.out / category
            folder.mkdir(parents=True, exist_ok=True)
            for name, _, data in items:
                ext = "jpg" if data[:2] == b"\xff\xd8" else "png"
                (folder / f"{name}.{ext}").write_bytes(data)

    rows, preprocess_time, results, refused = [], 0.0, {}, []
    for category, items in pictures.items():
        labels = np.array([label for _, label, _ in items])
        t = time.perf_counter()
        inputs = np.stack([safe_to_mnist(name, data, refused) for name, _, data in items])
        preprocess_time += time.perf_counter() - t
        plain = np.stack([plain_resize(data) for _, _, data in items])
        # One pass of both models over each set of inputs.
        preds = {name: p.argmax(1) for name, p in predictor.probabilities(inputs).items()}
        plain_preds = {name: p.argmax(1) for name, p in predictor.probabilities(plain).items()}
        results[category] = (items, inputs, preds)
        rows.append([category, len(items)] + [(preds[n] == labels).mean() for n in names]
                    + [(plain_preds[n] == labels).mean() for n in names])

    total = sum(r[1] for r in rows)
    overall = ["overall", total] + [sum(r[i] * r[1] for r in rows) / total for i in range(2, 2 + 2 * len(names))]
    header = ["category", "n"] + [f"{m} to_mnist" for m in names] + [f"{m} plain resize" for m in names]
    print(f"{len(pictures)} categories, {total} pictures (made in {made:.1f} s, to_mnist "
          f"{1000 * preprocess_time / total:.1f} ms each on average)")
    print(" | ".join(f"{h:>19}" if i else f"{h:<8}" for i, h in enumerate(header)))
    for row in rows + [overall]:
        cells = [f"{row[0]:<8}", f"{row[1]:>19}"] + [f"{v:>19.3f}" for v in row[2:]]
        print(" | ".join(cells))

    for line in refused:
        print(f"refused (counted as wrong): {line}")

    # Contact sheet: four pictures of each category, at random, one of them a
    # mistake where the MLP makes any (so the sheet shows what still fails).
    pick = np.random.default_rng(args.seed + 1)
    samples = []
    for category, (items, inputs, preds) in results.items():
        labels = np.array([label for _, label, _ in items])
        wrong = np.flatnonzero(preds["manual"] != labels)
        right = np.flatnonzero(preds["manual"] == labels)
        chosen = list(pick.choice(right, 4 - min(1, len(wrong)), replace=False))
        chosen += list(pick.choice(wrong, min(1, len(wrong)), replace=False))
        for index in sorted(chosen):
            name, label, data = items[index]
            samples.append((f"{category}: {name.split('-')[0]}" if category == "typeset" else category,
                            label, data, inputs[index], int(preds["manual"][index])))
    contact_sheet(args.sheet, samples)
    if args.out:
        contact_sheet(args.out / "contact_sheet.png", samples)
    print(f"contact sheet: {args.sheet}")
    worst = min(overall[2:2 + len(names)])
    if worst < args.min_accuracy:
        sys.exit(f"error: overall accuracy {worst:.3f} is below --min-accuracy {args.min_accuracy}")


if __name__ == "__main__":
    main()
