"""Any picture of one digit -> the 28x28 input the MNIST models were trained on.

``to_mnist`` makes a photo, a scan, a canvas drawing or a typeset digit look like an MNIST digit;
docs/use-the-model.md describes how, docs/performance.md at what cost. Only numpy, Pillow and scipy are used
(no torch): the web app and an ONNX-only path import this module.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from mnist_dvc.data import IMAGE_SIDE

__all__ = ["ImageError", "MAX_PIXELS", "to_mnist", "load_image", "to_png"]

MAX_PIXELS = 40_000_000  # refuse larger pictures from their header (Pillow warns at ~89M)
MAX_FILE_BYTES = 200_000_000  # load_image refuses larger files before reading them
WORK_SIDE = 1000  # pictures are shrunk to at most this long side before the float work
DIGIT_SIDE = 80  # ... and further, as far as the digit's box stays this long (4x its output size)
BOX = 20  # the longer side of the ink's bounding box in the output
CENTRE = (14.0, 14.0)  # where the ink's centre of mass goes (row, column), as in MNIST
MIN_PART = 0.05  # a connected component is kept if its ink is >= this fraction of the largest's
EDGE_CONTACT = 0.15  # a component on more than this fraction of the picture's edge is background
FRAME_PAPER = 0.6  # a border unlike this fraction of the picture (or more) is a frame, not the paper
LINE_SPAN = 0.9  # ink across this fraction of the picture's width or height may be ruled lines ...
LINE_BOX = 0.5  # ... and they are dropped if that shrinks the ink's box to this fraction of its area
MIN_STROKE = 0.09  # strokes thinner than this fraction of the digit's longer side (MNIST's thinnest: ~0.10) ...
STROKE = 0.12  # ... are thickened to this fraction (a typical MNIST stroke: ~2.4 px of 20)
REDUCING_GAP = 2  # _render averages big crops down to about this many pixels per output pixel
# Raster formats this Pillow build has (AVIF, WebP are optional); no EPS (it runs Ghostscript).
Image.init()
FORMATS = tuple(f for f in ("PNG", "JPEG", "GIF", "BMP", "DIB", "WEBP", "TIFF", "PPM", "TGA", "ICO", "PCX",
                            "QOI", "SGI", "AVIF") if f in Image.OPEN)
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: diagonal strokes stay one component
_BLANK = "no digit found: the image is blank, has a single colour or holds only faint noise"


class ImageError(ValueError):
    """A picture that cannot be used; str(exc) is one clear sentence for the user."""


def to_mnist(data: bytes) -> np.ndarray:
    """Encoded image bytes -> float32 (28, 28) in [0, 1], MNIST-style; raises ImageError, and only that, if unusable."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"expected the bytes of an image file, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError("the file is empty (0 bytes)")
    return _render(_thicken(_strokes(*_ink(_decode(data)))))


def load_image(path) -> np.ndarray:
    """``to_mnist`` of the file at ``path``; a missing or unreadable path or a directory raises ImageError."""
    try:
        path = Path(os.fspath(path))
    except TypeError:
        raise ImageError(f"expected a file path, got {type(path).__name__}") from None
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{path} is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{path} is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError(f"{path} is too large ({info.st_size / 1e6:.0f} MB; "
                             f"the limit is {MAX_FILE_BYTES / 1e6:.0f} MB)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist") from None
    except PermissionError:
        raise ImageError(f"{path} cannot be read: permission denied") from None
    except OSError as exc:
        raise ImageError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except ImageError:
        raise
    except ValueError as exc:  # e.g. a NUL byte in the path
        raise ImageError(f"{str(path)!r} is not a valid path: {exc}") from None
    return to_mnist(data)


def to_png(image28: np.ndarray) -> bytes:
    """A [0, 1] greyscale array as 8-bit PNG bytes; no metadata, fixed compression: same array, same bytes."""
    array = np.asarray(image28, dtype=np.float64)
    if array.ndim != 2 or not np.isfinite(array).all():
        raise ValueError(f"expected a finite 2-D array, got shape {array.shape}")
    pixels = np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    """Decoded, upright, shrunk picture as float32 greyscale in [0, 1] (paper where transparent)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageError("the image has no pixels")
            if width * height > MAX_PIXELS:
                raise ImageError(f"the image is too large ({width}x{height} pixels; "
                                 f"the limit is {MAX_PIXELS / 1e6:.0f} million)")
            if img.format in ("JPEG", "MPO") and max(width, height) > WORK_SIDE:
                # Decode at 1/2, 1/4 or 1/8 scale straight from the DCT, no smaller than WORK_SIDE.
                scale = WORK_SIDE / max(width, height)
                img.draft("L" if img.mode in ("RGB", "L") else img.mode,
                          (math.ceil(width * scale), math.ceil(height * scale)))
            img.load()
            with contextlib.suppress(Exception):  # a broken EXIF block should not cost the picture
                ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an upright picture
            return _greyscale(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("the file is not an image in a supported format "
                         "(PNG, JPEG, GIF, BMP, WebP, TIFF, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"the image is too large (over {MAX_PIXELS / 1e6:.0f} million pixels)") from None
    except MemoryError:
        raise ImageError("the image is too large to decode") from None
    except Exception:  # noqa: BLE001 - on corrupt input Pillow raises almost anything; none of it may escape
        raise ImageError("the image could not be decoded: the file is corrupt or truncated") from None


def _shrink(img: Image.Image) -> Image.Image:
    """``img`` reduced by a whole factor to at most WORK_SIDE px along its longer side."""
    factor = math.ceil(max(img.size) / WORK_SIDE)
    return img.reduce(factor) if factor > 1 else img


def _greyscale(img: Image.Image) -> np.ndarray:
    """float32 greyscale in [0, 1], transparency composited onto paper, shrunk (``_shrink``, ``_shrink_factor``)."""
    mode, white = img.mode, 255
    if mode in ("I", "F") or mode.startswith("I;16"):  # 32-bit integers, floats, 16-bit integers
        img = _shrink(img.convert("I") if mode.startswith("I;16") else img)
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = grey.min(), grey.max()
        # Scale by the picture's own range: 16-bit data need not use all 16 bits.
        grey = ((grey - low) / (high - low) if high > low else np.zeros_like(grey)).astype(np.float32)
        img, white = Image.fromarray(grey, mode="F"), 1
    elif mode in ("RGBA", "LA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        img = _shrink(img if mode in ("RGBA", "LA") else img.convert("RGBA"))
        alpha, luma = img.getchannel("A"), img.convert("L")
        visible = np.asarray(alpha) > 0
        # White paper would hide white strokes on a transparent canvas: black if most visible pixels are light.
        light = 2 * np.count_nonzero(visible & (np.asarray(luma) > 190)) > np.count_nonzero(visible)
        img = Image.new("L", img.size, 0 if light else 255)
        img.paste(luma, None, alpha)  # Image.composite(luma, paper, alpha) without its copy of the paper
    elif mode == "LAB":
        img = img.getchannel("L")  # lightness
    elif mode != "L":
        try:
            img = img.convert("L")
        except ValueError:
            raise ImageError(f"the image's pixel format ({mode}) is not supported") from None
    img = _shrink(img)
    k = _shrink_factor(np.asarray(img), white)
    if k > 1:
        img = img.reduce(k)  # block averages: each k x k square of pixels becomes one
    return np.multiply(np.asarray(img), np.float32(1 / white), dtype=np.float32)  # one float array, not two


def _shrink_factor(pixels: np.ndarray, white: float) -> int:
    """How many times a picture (0 black to ``white``) can be shrunk with its digit's box still DIGIT_SIDE px.

    The largest patch of contrast in a sample is the digit or a part of it. If it reaches the border or spans
    LINE_SPAN (lines, a table, a frame, a cut digit: later steps need those full size), the answer is 1.
    """
    if max(pixels.shape) < 2 * DIGIT_SIDE:
        return 1
    sample, step, edge = _sample(pixels)
    visible = np.abs(sample - np.median(sample[edge])) > 0.1 * white
    labels, count = ndimage.label(visible, structure=_EIGHT)
    if count == 0:
        return 1
    patch = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    height, width = patch[_box(patch)].shape
    if (patch & edge).any() or max(height / sample.shape[0], width / sample.shape[1]) >= LINE_SPAN:
        return 1
    return max(1, (max(height, width) - 1) * step // DIGIT_SIDE)  # (n - 1) steps: a lower bound of its size


def _mad(values: np.ndarray) -> float:
    """Robust sigma, 1.4826 MADs (not scipy.stats', whose import would slow every predict and serve start)."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values)))) if values.size else 0.0


def _box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """``mask``'s bounding box as (rows, columns) slices, None if empty (np.any: find_objects is much slower)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)) if rows.size else None


def _sample(pixels: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """A <= 64 px float32 sample (every ``step``-th row and column), ``step``, and its border band (3%, >= 1 px)."""
    step = max(1, math.ceil(max(pixels.shape) / 64))
    sample = pixels[::step, ::step].astype(np.float32)
    band = max(1, round(0.03 * min(sample.shape)))
    edge = np.ones(sample.shape, dtype=bool)
    edge[band:-band, band:-band] = False
    return sample, step, edge


def _background(grey: np.ndarray) -> tuple[np.ndarray | np.float32, float]:
    """The paper (the border's median, or a quadratic surface fitted to the background) and the noise sigma."""
    h, w = grey.shape
    sample, step, edge = _sample(grey)
    border = sample[edge]
    level = np.median(border)
    # A frame or a desk all around the sheet: the border is not the paper, most of the picture is.
    overall = np.median(sample)
    near = np.abs(sample - overall) <= 0.1
    if abs(level - overall) > 0.3 and near.mean() >= FRAME_PAPER and not near[edge].any():
        return np.float32(overall), _mad(sample[near])
    # The paper on the border: ink that touches the edge is an outlier there.
    paper = np.abs(border - level) <= max(3 * _mad(border), 0.02)
    if np.ptp(border[paper]) < 0.02 or min(h, w) < 32:  # flat paper (drawings, typeset), or too small to fit
        return np.float32(level), _mad(border[paper])
    inliers = np.zeros(sample.shape, dtype=bool)
    inliers[edge] = paper
    ys, xs = np.mgrid[0:sample.shape[0], 0:sample.shape[1]]
    y = (ys.ravel() * step / (h - 1)) * 2 - 1
    x = (xs.ravel() * step / (w - 1)) * 2 - 1
    design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    values = sample.ravel().astype(np.float64)
    inliers = inliers.ravel()
    for _ in range(4):
        # By the 6x6 normal equations (well conditioned on [-1, 1]): LAPACK's threads are slow on so tiny a fit.
        d = design[inliers]
        coef = np.linalg.solve(d.T @ d + 1e-9 * np.eye(6), d.T @ values[inliers])
        residual = values - design @ coef
        sigma = _mad(residual[inliers])
        inliers = np.abs(residual) < max(3 * sigma, 0.01)
        if inliers.sum() < 12:
            break
    sigma = _mad(residual[inliers]) if inliers.sum() >= 12 else sigma
    yy, xx = np.linspace(-1, 1, h, dtype=np.float32)[:, None], np.linspace(-1, 1, w, dtype=np.float32)
    c = coef.astype(np.float32)
    return c[0] + c[1] * xx + c[2] * yy + c[3] * xx * xx + c[4] * xx * yy + c[5] * yy * yy, sigma


def _ink(grey: np.ndarray) -> tuple[np.ndarray, float]:
    """Ink intensity (0 = paper) and the noise sigma; the ink is whichever side of the paper has more contrast."""
    paper, sigma = _background(grey)
    d = grey - paper
    t = np.float32(max(4 * sigma, 0.02))
    lighter = float(np.maximum(d - t, 0).sum())
    darker = float(np.maximum(-d - t, 0).sum())
    if lighter == 0 and darker == 0:
        raise ImageError(_BLANK)
    return (d if lighter >= darker else np.negative(d, out=d)), sigma


def _strokes(ink: np.ndarray, sigma: float) -> np.ndarray:
    """Ink in [0, 1], cropped to the digit, with the background, noise and specks zeroed."""
    peak = float(ink.max())  # a lone bright pixel only raises the floor a little; its component is dropped
    if peak < max(6 * sigma, 0.03):
        raise ImageError(_BLANK)
    floor = max(4 * sigma, 0.1 * peak)
    mask = ink > floor
    box = _box(mask)
    if box is None:
        raise ImageError(_BLANK)
    # The rest sees only the ink's box and a pixel around it: the same components and distances, far cheaper.
    (h, w), min_area = mask.shape, max(4, 1e-4 * mask.size)
    crop = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, mask.shape))
    rows, cols = np.ogrid[crop]
    on_edge = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)  # the crop's part of the picture's edge
    frame_size = h * w - max(h - 2, 0) * max(w - 2, 0)  # the picture's edge pixels
    ink, mask = ink[crop], mask[crop]
    labels, count, sheet = _components(mask, on_edge, frame_size)
    lined = _without_thin_lines(mask, labels, sheet, (h, w))
    if lined is not mask:
        mask = lined
        labels, count, sheet = _components(mask, on_edge, frame_size)
    ink_labels = labels[mask]
    mass = np.bincount(ink_labels, weights=ink[mask], minlength=count + 1)
    area = np.bincount(ink_labels, minlength=count + 1)
    # What lies along the picture's edge (a table, a shadow) is not the digit if something else is big enough.
    if sheet.any() and (area[~sheet] >= min_area).any():
        mass[sheet] = 0
    biggest = int(np.argmax(mass))
    if area[biggest] < min_area:
        raise ImageError(_BLANK)
    keep = mass >= MIN_PART * mass[biggest]
    keep[0] = False
    kept = keep[labels]
    box = _box(kept)
    ink, kept = ink[box], kept[box]
    # In float64, like the arithmetic it feeds: float32 would round the interpolated level.
    level = float(np.percentile(ink[kept].astype(np.float64), 90))
    strokes = np.clip((ink - floor) * np.float32(1 / max(level - floor, 1e-6)), 0, 1)
    strokes[~kept] = 0
    return strokes


def _components(mask: np.ndarray, on_edge: np.ndarray, frame_size: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Labels, count and, per label, whether it covers over EDGE_CONTACT of the edge (``frame_size`` pixels)."""
    labels, count = ndimage.label(mask, structure=_EIGHT)
    sheet = np.bincount(labels[on_edge], minlength=count + 1) > EDGE_CONTACT * frame_size
    sheet[0] = False
    return labels, count, sheet


def _span(mask: np.ndarray, shape: tuple[int, int]) -> float:
    """The larger of the fractions of the picture's (``shape``) columns and rows that ``mask`` has ink in."""
    return max(mask.any(axis=0).sum() / shape[1], mask.any(axis=1).sum() / shape[0])


def _without_thin_lines(mask: np.ndarray, labels: np.ndarray, sheet: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` without lines much thinner than the strokes that run across the picture (ruled paper, a form's box).

    Such lines join the digit into one component as wide as the picture. The mask is opened by a disk of half
    the strokes' half-width; this counts only if the ink's box shrinks to LINE_BOX (a cropped digit stays).
    """
    if _span(mask, shape) < LINE_SPAN:  # the cheap test first: most pictures end here
        return mask
    along_edge = sheet[labels]
    inner = mask & ~along_edge
    if not inner.any() or _span(inner, shape) < LINE_SPAN:
        return mask
    depth = ndimage.distance_transform_edt(mask)  # distance to the nearest pixel without ink
    radius = float(np.percentile(depth[inner], 95)) / 2
    if radius < 1.5:  # strokes of a few pixels: too thin to tell lines from strokes
        return mask
    opened = mask & (ndimage.distance_transform_edt(depth <= radius) <= radius + 1)
    digit = opened & ~along_edge
    box = _box(digit)
    return opened if box and digit[box].size <= LINE_BOX * inner[_box(inner)].size else mask


def _stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width in pixels: twice the area over the boundary length."""
    area = np.count_nonzero(mask)
    boundary = area - np.count_nonzero(ndimage.binary_erosion(mask))
    return 2 * area / max(boundary, 1)


def _thicken(a: np.ndarray) -> np.ndarray:
    """Dilate strokes thinner than MIN_STROKE of the digit's longer side to STROKE of it."""
    mask = a > 0.5
    if not mask.any() or _stroke_width(mask) >= MIN_STROKE * max(a.shape):
        return a
    k = max(1, max(a.shape) // 160)  # max-pool big crops: keeps thin lines, makes the dilation cheap
    if k > 1:
        a = np.pad(a, ((0, -a.shape[0] % k), (0, -a.shape[1] % k)))
        a = a.reshape(a.shape[0] // k, k, a.shape[1] // k, k).max(axis=(1, 3))
        mask = a > 0.5
    radius = (STROKE * max(a.shape) - _stroke_width(mask)) / 2
    if radius <= 0:
        return a
    return np.maximum(a, np.clip(radius + 0.5 - ndimage.distance_transform_edt(~mask), 0, 1).astype(np.float32))


def _render(a: np.ndarray) -> np.ndarray:
    """Scale the cropped digit so its longer side is BOX px and place it in 28x28, centre of mass on CENTRE.

    Corners aligned (the outermost ink pixels' centres onto the box's): the ink spans BOX px at any resolution.
    """
    h, w = a.shape
    scale = (BOX - 1) / (max(h, w) - 1) if max(h, w) > 1 else 1.0
    cy, cx = ndimage.center_of_mass(a)
    # Where the crop's top-left corner lands in the output (continuous coordinates, pixel k spans [k, k+1)).
    left = min(max(CENTRE[1] + 0.5 - (cx + 0.5) * scale, 0.0), IMAGE_SIDE - w * scale)
    top = min(max(CENTRE[0] + 0.5 - (cy + 0.5) * scale, 0.0), IMAGE_SIDE - h * scale)
    if scale == 1:  # an unscaled digit moves by whole pixels, as MNIST's did
        left, top = round(left), round(top)
    # The source rectangle that maps onto the output field, padded with background where it sticks out.
    x0, x1, y0, y1 = -left / scale, (IMAGE_SIDE - left) / scale, -top / scale, (IMAGE_SIDE - top) / scale
    # A crop many times the output's size is first averaged over k x k blocks (Pillow's reducing_gap, but
    # before the padding), so that Lanczos reads about REDUCING_GAP source pixels per output pixel.
    k = int(1 / (scale * REDUCING_GAP))
    if k > 1:
        a = np.asarray(Image.fromarray(np.pad(a, ((0, -h % k), (0, -w % k))), mode="F").reduce(k))
        (h, w), scale = a.shape, scale * k
        x0, x1, y0, y1 = x0 / k, x1 / k, y0 / k, y1 / k
    margin = 3 / min(scale, 1) + 1  # the filter's reach
    pad_left, pad_top = math.ceil(max(0.0, -x0) + margin), math.ceil(max(0.0, -y0) + margin)
    pad_right, pad_bottom = math.ceil(max(0.0, x1 - w) + margin), math.ceil(max(0.0, y1 - h) + margin)
    padded = np.pad(a, ((pad_top, pad_bottom), (pad_left, pad_right)))
    resample = Image.LANCZOS if scale < 1 else Image.BICUBIC
    box = (x0 + pad_left, y0 + pad_top, x1 + pad_left, y1 + pad_top)
    out = np.asarray(Image.fromarray(padded, mode="F").resize((IMAGE_SIDE, IMAGE_SIDE), resample, box=box))
    if out.max() <= 0:
        raise ImageError(_BLANK)
    out = out * np.float32(1 / out.max())
    # Lanczos rings: faint (< 3%) echoes of the strokes around them; MNIST's background is exactly 0.
    out[out < 0.03] = 0
    return np.minimum(out, 1, out=out)

