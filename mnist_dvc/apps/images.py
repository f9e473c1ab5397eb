"""Any picture of one digit -> the 28x28 input the MNIST models were trained on.

MNIST digits are light ink on a black background, the ink scaled so the
longer side of its bounding box is 20 px (aspect ratio kept, anti-aliased)
and placed in a 28x28 field so that its centre of mass is at the centre.
``to_mnist`` does the same to a photo, a scan, a canvas drawing or a
typeset digit:

1. decode with Pillow (a fixed list of raster formats; first frame; EXIF
   orientation applied); large pictures are first shrunk cheaply (JPEG DCT
   scaling, ``Image.reduce``) to at most ``WORK_SIDE`` px on the long side;
2. greyscale in [0, 1]: transparency is paper (composited onto white, or onto
   black when most visible pixels are light, i.e. light strokes on a
   transparent canvas); 16/32-bit and float pictures are scaled by their own
   range;
3. polarity from the background: the background level is the median of a
   border band (or of the whole picture, when a frame or a desk all around
   is unlike most of it); the ink is whichever side of it (darker or
   lighter) carries more contrast, and dark ink is inverted to light;
4. background removal: a smooth (quadratic) surface fitted to the background
   pixels absorbs uneven lighting; the noise level comes from the residual
   background; everything below ``max(4 sigma, 10% of the ink peak)`` is
   zeroed, and connected components with less than ``MIN_PART`` of the
   largest component's ink are dropped (specks, dust), so they do not widen
   the bounding box; so is anything lying along the picture's edge (the table
   beside the sheet, a shadow) when there is a digit elsewhere; lines much
   thinner than the digit's strokes that run across the picture (ruled or
   squared paper, a margin, a box printed around the digit) are removed;
5. very thin strokes (a fine pen photographed at high resolution, a 1-px
   line) are thickened to a typical MNIST stroke width relative to the
   digit's size, since they would otherwise fade to a faint grey at 20 px;
6. crop to the ink, scale its longer side to 20 px (Lanczos, aspect ratio
   kept) and shift it, in the same resampling, so that its centre of mass is
   at ``CENTRE`` = (14, 14) in array-index coordinates (row, column; pixel
   centres at integers), which is where real MNIST digits have it (test set
   mean: 13.99, 14.00). Faint Lanczos ringing (< 3%) is zeroed, so the
   background is exactly 0 as in MNIST.

Only numpy, Pillow and scipy are used (no torch): the web app and an
ONNX-only path import this module.
"""

from __future__ import annotations

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
SIDE = IMAGE_SIDE  # output size, 28
BOX = 20  # the longer side of the ink's bounding box in the output
CENTRE = (14.0, 14.0)  # where the ink's centre of mass goes (row, column), as in MNIST
MIN_PART = 0.05  # a connected component is kept if its ink is >= this fraction of the largest's
EDGE_CONTACT = 0.15  # a component on more than this fraction of the picture's edge is background
FRAME_PAPER = 0.6  # a border unlike this fraction of the picture (or more) is a frame, not the paper
LINE_SPAN = 0.9  # ink across this fraction of the picture's width or height may be ruled lines ...
LINE_BOX = 0.5  # ... and they are dropped if that shrinks the ink's box to this fraction of its area
# Strokes thinner than MIN_STROKE of the digit's longer side (MNIST's thinnest are ~0.10)
# are thickened to STROKE (a typical MNIST stroke: ~2.4 px of 20).
MIN_STROKE = 0.09
STROKE = 0.12
REDUCING_GAP = 2  # _render averages big crops down to about this many pixels per output pixel
# Raster formats only: no EPS (it runs Ghostscript), no exotic scientific formats;
# only those this Pillow build has (AVIF, WebP are optional).
Image.init()
FORMATS = tuple(f for f in ("PNG", "JPEG", "GIF", "BMP", "DIB", "WEBP", "TIFF", "PPM", "TGA", "ICO", "PCX",
                            "QOI", "SGI", "AVIF") if f in Image.OPEN)
_ALPHA_MODES = {"RGBA", "LA", "RGBa", "PA"}
_WIDE_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: diagonal strokes stay one component


class ImageError(ValueError):
    """A picture that cannot be used; str(exc) is one clear sentence for the user."""


def to_mnist(data: bytes) -> np.ndarray:
    """Encoded image bytes -> float32 (28, 28) in [0, 1], white digit on black, MNIST-style.

    Any format in ``FORMATS`` that Pillow decodes. Raises ``ImageError`` (and
    nothing else) for input that cannot be used: not an image, corrupt or
    truncated, too large, or without a digit ("no digit found ...").
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ImageError(f"expected the bytes of an image file, got {type(data).__name__}")
    if not data:
        raise ImageError("the file is empty (0 bytes)")
    return _normalise(_decode(data))


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
    """A [0, 1] greyscale array (the 28x28 of ``to_mnist``) as 8-bit greyscale PNG bytes.

    Deterministic: no metadata, fixed compression, so the same array gives the same bytes.
    """
    array = np.asarray(image28, dtype=np.float64)
    if array.ndim != 2 or not np.isfinite(array).all():
        raise ValueError(f"expected a finite 2-D array, got shape {array.shape}")
    pixels = np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


# --- decoding ---------------------------------------------------------------

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
            return _greyscale(_upright(img))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("the file is not an image in a supported format "
                         "(PNG, JPEG, GIF, BMP, WebP, TIFF, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"the image is too large (over {MAX_PIXELS / 1e6:.0f} million pixels)") from None
    except MemoryError:
        raise ImageError("the image is too large to decode") from None
    except Exception:  # noqa: BLE001 - Pillow's decoders raise OSError, EOFError, SyntaxError,
        # struct.error, ValueError, IndexError... on corrupt input; none of it may escape.
        raise ImageError("the image could not be decoded: the file is corrupt or truncated") from None


def _upright(img: Image.Image) -> Image.Image:
    """The picture turned as its EXIF orientation tag says (phone photos); as is if the tag is unreadable."""
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an upright picture
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the picture
        pass
    return img


def _shrink(img: Image.Image) -> Image.Image:
    """``img`` reduced by a whole factor to at most WORK_SIDE px along its longer side."""
    factor = math.ceil(max(img.size) / WORK_SIDE)
    return img.reduce(factor) if factor > 1 else img


def _greyscale(img: Image.Image) -> np.ndarray:
    """float32 greyscale in [0, 1], transparency composited onto paper, at most WORK_SIDE px long,
    and shrunk further while the digit's box stays DIGIT_SIDE px long (``_shrink_factor``)."""
    mode = img.mode
    if mode in _WIDE_MODES:
        if mode.startswith("I;16"):
            img = img.convert("I")
        img = _shrink(img)
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = grey.min(), grey.max()
        # Scale by the picture's own range: 16-bit data need not use all 16 bits.
        grey = ((grey - low) / (high - low) if high > low else np.zeros_like(grey)).astype(np.float32)
        k = _shrink_factor(grey, 1.0)
        return np.asarray(Image.fromarray(grey, mode="F").reduce(k)) if k > 1 else grey
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        if mode not in ("RGBA", "LA"):
            img = img.convert("RGBA")
        img = _shrink(img)
        alpha, luma = img.getchannel("A"), img.convert("L")
        visible = np.asarray(alpha) > 0
        # Paper is white, unless the visible pixels are mostly light (white strokes on a
        # transparent canvas, however faint), where a white background would hide the drawing.
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
    k = _shrink_factor(np.asarray(img), 255)
    if k > 1:
        img = img.reduce(k)  # block averages: each k x k square of pixels becomes one
    grey = np.asarray(img).astype(np.float32)
    grey *= np.float32(1 / 255)  # in place: one float array, not two
    return grey


# --- normalisation ------------------------------------------------------------

def _blank() -> ImageError:
    return ImageError("no digit found: the image is blank, has a single colour or holds only faint noise")


def _mad(values: np.ndarray) -> float:
    """Robust standard deviation: 1.4826 times the median absolute deviation.

    Not scipy.stats.median_abs_deviation(scale="normal"): importing scipy.stats
    would lengthen every predict and serve start (docs/performance.md).
    """
    return 1.4826 * float(np.median(np.abs(values - np.median(values)))) if values.size else 0.0


def _box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box of ``mask``'s True pixels, as (rows, columns) slices; None if there are none.

    By ``np.any`` along each axis rather than ``ndimage.find_objects``, which
    visits every pixel one by one and is many times slower on a whole picture.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)) if rows.size else None


def _edge_mask(shape: tuple[int, int]) -> np.ndarray:
    """A band along the four edges, 3% of the shorter side (at least one pixel) wide."""
    band = max(1, round(0.03 * min(shape)))
    edge = np.ones(shape, dtype=bool)
    edge[band:-band, band:-band] = False
    return edge


def _background(grey: np.ndarray) -> tuple[np.ndarray | np.float32, float]:
    """The paper: a smooth surface through the background of ``grey``, and the noise sigma around it.

    Starts from the border band (the paper around the digit); when that is not
    flat (uneven lighting), fits a quadratic surface to it, then refits to all
    pixels within 3 sigma of the surface (the ink, darker or lighter, lies far
    from it). The fit runs on a <= 64 px sample of the picture.
    """
    h, w = grey.shape
    step = max(1, math.ceil(max(h, w) / 64))
    sample = grey[::step, ::step]
    edge = _edge_mask(sample.shape)
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
        # Least squares by the 6x6 normal equations: well conditioned on [-1, 1], and no
        # multi-threaded LAPACK call for a tiny problem (slow on a busy machine).
        d = design[inliers]
        coef = np.linalg.solve(d.T @ d + 1e-9 * np.eye(6), d.T @ values[inliers])
        residual = values - design @ coef
        sigma = _mad(residual[inliers])
        inliers = np.abs(residual) < max(3 * sigma, 0.01)
        if inliers.sum() < 12:
            break
    sigma = _mad(residual[inliers]) if inliers.sum() >= 12 else sigma
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    c = coef.astype(np.float32)
    return c[0] + c[1] * xx + c[2] * yy + c[3] * xx * xx + c[4] * xx * yy + c[5] * yy * yy, sigma


def _ink(grey: np.ndarray) -> tuple[np.ndarray, float]:
    """Ink intensity (0 = paper), light ink whatever the picture's polarity; and the noise sigma.

    The ink is whichever side of the paper, darker or lighter, carries more
    contrast beyond the noise: dark ink on light paper is inverted.
    """
    paper, sigma = _background(grey)
    d = grey - paper
    t = np.float32(max(4 * sigma, 0.02))
    lighter = float(np.maximum(d - t, 0).sum())
    darker = float(np.maximum(-d - t, 0).sum())
    if lighter == 0 and darker == 0:
        raise _blank()
    return (d if lighter >= darker else np.negative(d, out=d)), sigma


def _strokes(ink: np.ndarray, sigma: float) -> np.ndarray:
    """Ink in [0, 1], cropped to the digit, with the background, noise and specks zeroed."""
    peak = float(ink.max())  # a lone bright pixel only raises the floor a little; its component is dropped
    if peak < max(6 * sigma, 0.03):
        raise _blank()
    floor = max(4 * sigma, 0.1 * peak)
    mask = ink > floor
    picture = _Picture.around(mask)
    if picture is None:
        raise _blank()
    # All that follows sees only the ink's box and a pixel of background around it: the same
    # components, edges and distances as the whole picture, at a fraction of the cost.
    ink, mask = ink[picture.crop], mask[picture.crop]
    labels, count = ndimage.label(mask, structure=_EIGHT)
    sheet = picture.along_the_edge(labels, count)
    lined = _without_thin_lines(mask, labels, sheet, picture)
    if lined is not mask:
        mask = lined
        labels, count = ndimage.label(mask, structure=_EIGHT)
        sheet = picture.along_the_edge(labels, count)
    ink_labels = labels[mask]
    mass = np.bincount(ink_labels, weights=ink[mask], minlength=count + 1)
    area = np.bincount(ink_labels, minlength=count + 1)
    min_area = max(4, 1e-4 * picture.size)
    # Something lying along the picture's edge (the table beside the sheet, a
    # shadow) is not the digit, when there is a digit-sized component elsewhere.
    if sheet.any() and (area[~sheet] >= min_area).any():
        mass[sheet] = 0
    biggest = int(np.argmax(mass))
    if area[biggest] < min_area:
        raise _blank()
    keep = mass >= MIN_PART * mass[biggest]
    keep[0] = False
    # Crop to the kept components first: the rest of the work is on the digit's box only.
    kept = keep[labels]
    box = _box(kept)
    ink, kept = ink[box], kept[box]
    # In float64, like the arithmetic it feeds: float32 would round the interpolated level.
    level = float(np.percentile(ink[kept].astype(np.float64), 90))
    strokes = np.clip((ink - floor) * np.float32(1 / max(level - floor, 1e-6)), 0, 1)
    strokes[~kept] = 0
    return strokes


class _Picture:
    """The crop of a picture to its ink's box and one pixel around it, and what the crop
    needs to know of the whole picture: its size, and which of the crop's sides are its edges."""

    def __init__(self, shape: tuple[int, int], crop: tuple[slice, slice]):
        self.height, self.width = shape
        self.size = self.height * self.width
        self.crop = crop
        rows, cols = crop
        self.edges = (rows.start == 0, rows.stop == self.height, cols.start == 0, cols.stop == self.width)

    @classmethod
    def around(cls, mask: np.ndarray) -> _Picture | None:
        """The crop around ``mask``'s True pixels; None if there are none."""
        box = _box(mask)
        if box is None:
            return None
        (rows, cols), (h, w) = box, mask.shape
        return cls(mask.shape, (slice(max(rows.start - 1, 0), min(rows.stop + 1, h)),
                                slice(max(cols.start - 1, 0), min(cols.stop + 1, w))))

    def along_the_edge(self, labels: np.ndarray, count: int) -> np.ndarray:
        """For each component label (of the crop): whether it covers more than EDGE_CONTACT of the picture's edge."""
        on_edge = np.zeros(labels.shape, dtype=bool)
        top, bottom, left, right = self.edges
        on_edge[0] |= top
        on_edge[-1] |= bottom
        on_edge[:, 0] |= left
        on_edge[:, -1] |= right
        # Each edge pixel of the picture once; the crop leaves out only background (label 0).
        frame_size = self.size - max(self.height - 2, 0) * max(self.width - 2, 0)
        sheet = np.bincount(labels[on_edge], minlength=count + 1) > EDGE_CONTACT * frame_size
        sheet[0] = False
        return sheet

    def span(self, mask: np.ndarray) -> float:
        """The larger of the fractions of the picture's columns and rows that hold ink (``mask``: the crop)."""
        return max(mask.any(axis=0).sum() / self.width, mask.any(axis=1).sum() / self.height)


def _without_thin_lines(mask: np.ndarray, labels: np.ndarray, sheet: np.ndarray, picture: _Picture) -> np.ndarray:
    """``mask`` without lines much thinner than the digit's strokes that run across the picture:
    ruled or squared paper, a margin line, a box printed around the digit on a form.

    Such lines join the digit into one component as wide as the picture, and
    the digit would end up a small part of its crop. When the ink spans at
    least LINE_SPAN of the picture's width or height, the mask is opened
    (eroded, then dilated back) by a disk of half the thickest strokes'
    half-width: lines thinner than that vanish, the digit's strokes keep
    their shape. The result is used only if the ink's bounding box shrank
    to at most LINE_BOX of what it was (the lines made it big); otherwise
    (a tightly cropped digit, thin strokes everywhere) ``mask`` is kept.
    The components marked in ``sheet`` (lying along the picture's edge: a
    table, a shadow; see ``_strokes``) take no part in the decision.
    """
    if picture.span(mask) < LINE_SPAN:  # the cheap test first: most pictures end here
        return mask
    along_edge = sheet[labels]
    inner = mask & ~along_edge
    if not inner.any() or picture.span(inner) < LINE_SPAN:
        return mask
    depth = ndimage.distance_transform_edt(mask)  # distance to the nearest pixel without ink
    radius = float(np.percentile(depth[inner], 95)) / 2
    if radius < 1.5:  # strokes of a few pixels: too thin to tell lines from strokes
        return mask
    core = depth > radius
    opened = mask & (ndimage.distance_transform_edt(~core) <= radius + 1)
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
    distance = ndimage.distance_transform_edt(~mask)
    return np.maximum(a, np.clip(radius + 0.5 - distance, 0, 1).astype(np.float32))


def _render(a: np.ndarray) -> np.ndarray:
    """Scale the cropped digit so its longer side is BOX px and place it in SIDE x SIDE, centre of mass on CENTRE.

    The scale maps the centres of the outermost ink pixels onto the centres of
    the box's outermost pixels ("align corners"), so the anti-aliased ink spans
    BOX px, as in MNIST, whatever the source resolution; a digit that is
    already BOX px long keeps its size. One anti-aliased resampling scales and
    shifts (Lanczos when shrinking, bicubic when enlarging), the shift in
    fractions of a pixel; an unscaled digit moves by whole pixels, as MNIST's
    did. The shift is limited so that no ink falls outside the field.
    """
    h, w = a.shape
    scale = (BOX - 1) / (max(h, w) - 1) if max(h, w) > 1 else 1.0
    cy, cx = ndimage.center_of_mass(a)
    # Where the crop's top-left corner lands in the output (continuous coordinates, pixel k spans [k, k+1)).
    left = min(max(CENTRE[1] + 0.5 - (cx + 0.5) * scale, 0.0), SIDE - w * scale)
    top = min(max(CENTRE[0] + 0.5 - (cy + 0.5) * scale, 0.0), SIDE - h * scale)
    if scale == 1:
        left, top = round(left), round(top)
    # The source rectangle that maps onto the output field, padded with background where it sticks out.
    x0, x1, y0, y1 = -left / scale, (SIDE - left) / scale, -top / scale, (SIDE - top) / scale
    a = a.astype(np.float32, copy=False)
    # A crop many times the output's size is first averaged over blocks of k x k pixels (what
    # Pillow's reducing_gap does, here before the padding), so that Lanczos reads about
    # REDUCING_GAP source pixels per output pixel: the same picture, a fraction of the work.
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
    out = np.asarray(Image.fromarray(padded, mode="F").resize((SIDE, SIDE), resample, box=box))
    if out.max() <= 0:
        raise _blank()
    out = out * np.float32(1 / out.max())
    # Lanczos rings: faint (< 3%) echoes of the strokes around them; MNIST's background is exactly 0.
    out[out < 0.03] = 0
    return np.minimum(out, 1, out=out)


def _shrink_factor(pixels: np.ndarray, white: float) -> int:
    """How many times a greyscale picture can be shrunk with its digit's box still DIGIT_SIDE px or more.

    ``pixels``: the picture, 0 black to ``white``.

    A cheap first look, on a <= 64 px sample: the largest 8-connected patch
    of visible contrast (> 0.1 from the border's median) is taken for the
    digit, or for a part of it, which only makes the factor smaller. When that
    patch reaches the border band or spans LINE_SPAN of the picture (ruled
    lines, a box, a table, a frame, a digit cut by the edge: what the thin-line
    and edge tests need full size to tell apart), or there is none, the
    picture stays as it is (factor 1).
    """
    h, w = pixels.shape
    if max(h, w) < 2 * DIGIT_SIDE:
        return 1
    step = max(1, math.ceil(max(h, w) / 64))
    sample = pixels[::step, ::step].astype(np.float32)
    edge = _edge_mask(sample.shape)
    visible = np.abs(sample - np.median(sample[edge])) > 0.1 * white
    labels, count = ndimage.label(visible, structure=_EIGHT)
    if count == 0:
        return 1
    patch = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    height, width = patch[_box(patch)].shape
    if (patch & edge).any() or max(height / sample.shape[0], width / sample.shape[1]) >= LINE_SPAN:
        return 1
    return max(1, (max(height, width) - 1) * step // DIGIT_SIDE)  # (n - 1) steps: a lower bound of its size


def _normalise(grey: np.ndarray) -> np.ndarray:
    return _render(_thicken(_strokes(*_ink(grey))))
