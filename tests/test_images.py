"""mnist_dvc.apps.images: any picture of a digit -> the 28x28 MNIST-style input.

The pictures are made here from the fixture digits (scikit-learn's
handwritten digits in MNIST's format, ``conftest.tiny_mnist_arrays``):
enlarged, moved off-centre, inverted, made transparent, JPEG-compressed,
16-bit, palette, EXIF-rotated... Each must come out as nearly the same 28x28
as the original digit itself does.
"""

from __future__ import annotations

import io
import os
import re
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile
from threadpoolctl import threadpool_limits

from helpers import encode, png_header_only, tiny_mnist_arrays
from mnist_dvc.apps import images as images_module
from mnist_dvc.apps.images import CENTRE, MAX_PIXELS, ImageError, load_image, to_mnist, to_png

NOT_AN_IMAGE = "the file is not an image in a supported format (PNG, JPEG, GIF, BMP, WebP, TIFF, ...)"
CORRUPT = "the image could not be decoded: the file is corrupt or truncated"
NO_DIGIT = "no digit found: the image is blank, has a single colour or holds only faint noise"
# Every sentence to_mnist refuses bytes with (a corrupt header may claim any size or pixel format).
REFUSALS = [re.escape(NOT_AN_IMAGE), re.escape(CORRUPT), re.escape(NO_DIGIT), r"the image has no pixels",
            r"the image is too large \(\d+x\d+ pixels; the limit is 40 million\)",
            re.escape("the image is too large (over 40 million pixels)"), re.escape("the image is too large to decode"),
            r"the image's pixel format \(\S+\) is not supported"]

N_DIGITS = 60  # of the fixture's test digits: 9 variants x 60 = 540 pictures, a few seconds
CANVAS_SEVEN = [(90, 60), (190, 60), (120, 220)]  # a "7" as drawn on the web page's 280x280 canvas; its box ~160 px


# --- helpers ---------------------------------------------------------------------------

def enlarge(digit: np.ndarray, scale: int = 6, canvas=(240, 210), at=(40, 15)) -> np.ndarray:
    """The 28x28 uint8 digit enlarged smoothly and placed off-centre on a bigger black canvas; float [0, 1]."""
    big = Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.BICUBIC)
    out = np.zeros((canvas[1], canvas[0]), np.float32)
    out[at[1]:at[1] + 28 * scale, at[0]:at[0] + 28 * scale] = np.asarray(big, np.float32) / 255
    return out


def grey_image(ink: np.ndarray, dark_on_light: bool = False) -> Image.Image:
    values = 1 - ink if dark_on_light else ink
    return Image.fromarray(np.round(values * 255).astype(np.uint8), "L")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def bbox(image28: np.ndarray, level: float = 0.0) -> tuple[int, int]:
    rows = np.flatnonzero((image28 > level).any(axis=1))
    cols = np.flatnonzero((image28 > level).any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def centre_of_mass(image28: np.ndarray) -> np.ndarray:
    rows, cols = np.indices(image28.shape)
    return np.array([(rows * image28).sum(), (cols * image28).sum()]) / image28.sum()


# --- the variants -------------------------------------------------------------------------

def variant_shifted(digit):
    return encode(grey_image(enlarge(digit)))


def variant_inverted(digit):
    return encode(grey_image(enlarge(digit), dark_on_light=True))


def variant_transparent(digit):
    """Black ink, opaque where the digit is, on a fully transparent background (an HTML canvas)."""
    ink = np.round(enlarge(digit) * 255).astype(np.uint8)
    rgba = np.zeros(ink.shape + (4,), np.uint8)
    rgba[..., 3] = ink
    return encode(Image.fromarray(rgba, "RGBA"))


def variant_jpeg(digit):
    return encode(grey_image(enlarge(digit), dark_on_light=True).convert("RGB"), "JPEG", quality=75)


def variant_16bit(digit):
    values = np.round((1 - enlarge(digit)) * 65535).astype(np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    return encode(img)


def variant_palette_transparent(digit):
    """Dark ink in a 16-colour palette, the background's palette entry transparent."""
    img = grey_image(enlarge(digit), dark_on_light=True).convert("RGB").quantize(16)
    background = img.getpixel((0, 0))
    return encode(img, transparency=background)


def variant_exif_rotated(digit):
    """Stored lying on its side, with the EXIF tag that says how to stand it upright."""
    upright = grey_image(enlarge(digit), dark_on_light=True).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer rotates the stored picture 90 degrees clockwise
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif)


def variant_blue_on_grey(digit):
    ink = enlarge(digit)[..., None]
    paper, blue = np.array([170, 170, 165]), np.array([20, 30, 140])
    rgb = paper * (1 - ink) + blue * ink
    return encode(Image.fromarray(np.round(rgb).astype(np.uint8), "RGB"))


def variant_photo(digit):
    """Dark ink on paper under uneven light (from 100% to 54%), with grain, as a JPEG."""
    rng = np.random.default_rng(int(digit.sum()))
    ink = enlarge(digit)
    h, w = ink.shape
    light = np.linspace(1.0, 0.6, w)[None, :] * np.linspace(1.0, 0.9, h)[:, None]
    grey = np.clip((0.9 * (1 - ink) + 0.1) * light + rng.normal(0, 0.02, ink.shape), 0, 1)
    return encode(grey_image(grey), "JPEG", quality=80)


VARIANTS = {
    "shifted": variant_shifted,
    "inverted": variant_inverted,
    "transparent": variant_transparent,
    "jpeg": variant_jpeg,
    "16bit": variant_16bit,
    "palette": variant_palette_transparent,
    "exif": variant_exif_rotated,
    "blue_on_grey": variant_blue_on_grey,
    "photo": variant_photo,
}


@pytest.fixture(scope="module")
def fixture_digits():
    arrays = tiny_mnist_arrays()
    return arrays, arrays["test_images"][:N_DIGITS], arrays["test_labels"][:N_DIGITS].astype(np.int64)


@pytest.fixture(scope="module")
def originals(fixture_digits):
    """Each fixture digit's own 28x28 PNG through to_mnist: what every variant must reproduce."""
    _, images, _ = fixture_digits
    return np.stack([to_mnist(encode(Image.fromarray(d))) for d in images])


@pytest.fixture(scope="module")
def processed_variants(fixture_digits):
    _, images, _ = fixture_digits
    return {name: np.stack([to_mnist(make(d)) for d in images]) for name, make in VARIANTS.items()}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_recovers_the_original_28x28(name, originals, processed_variants):
    got = processed_variants[name]
    corr = np.array([correlation(a, b) for a, b in zip(got, originals)])
    mad = np.abs(got - originals).mean(axis=(1, 2))
    # A photo (uneven light, grain, JPEG) loses the faintest edge of these soft,
    # enlarged 8x8 scans to the noise threshold: a little less alike, never unlike.
    floor = 0.85 if name == "photo" else 0.9
    assert (corr > floor).mean() >= 0.95, f"{name}: correlation > {floor} for only {(corr > floor).mean():.0%}"
    assert corr.min() > 0.8, f"{name}: a digit with correlation {corr.min():.2f}"
    assert np.median(mad) < 0.05, f"{name}: median mean-absolute difference {np.median(mad):.3f}"


def test_exif_orientation_is_applied(fixture_digits, originals, processed_variants):
    """Without the tag, the digit would lie on its side: the upright result must match, the sideways not."""
    _, images, _ = fixture_digits
    sideways = np.stack([np.rot90(o) for o in originals])
    got = processed_variants["exif"]
    upright_corr = np.mean([correlation(a, b) for a, b in zip(got, originals)])
    sideways_corr = np.mean([correlation(a, b) for a, b in zip(got, sideways)])
    assert upright_corr > 0.9 > sideways_corr + 0.2


def train_small_mlp(images: np.ndarray, labels: np.ndarray):
    """A one-hidden-layer MLP (784-64-10, ReLU) fitted by full-batch gradient descent in numpy.

    numpy rather than torch: the same kind of model as the project's, without
    torch's import time in a test file that should take seconds.
    """
    rng = np.random.default_rng(0)
    x = images.reshape(len(images), -1).astype(np.float32)
    onehot = np.eye(10, dtype=np.float32)[labels]
    w1, b1 = rng.normal(0, 784 ** -0.5, (784, 64)).astype(np.float32), np.zeros(64, np.float32)
    w2, b2 = rng.normal(0, 64 ** -0.5, (64, 10)).astype(np.float32), np.zeros(10, np.float32)
    for _ in range(300):
        hidden = np.maximum(x @ w1 + b1, 0)
        logits = hidden @ w2 + b2
        p = np.exp(logits - logits.max(1, keepdims=True))
        grad = (p / p.sum(1, keepdims=True) - onehot) / len(x)
        grad_hidden = (grad @ w2.T) * (hidden > 0)
        w2 -= 0.5 * hidden.T @ grad
        b2 -= 0.5 * grad.sum(0)
        w1 -= 0.5 * x.T @ grad_hidden
        b1 -= 0.5 * grad_hidden.sum(0)
    return lambda batch: (np.maximum(batch.reshape(len(batch), -1) @ w1 + b1, 0) @ w2 + b2).argmax(1)


def test_predictions_on_variants_match_the_stored_digits(fixture_digits, processed_variants):
    # The fixture digits are drawn the way MNIST's were (conftest.mnist_style), so a
    # model trained on the stored tensors must read the pictures made from them
    # the same way it reads the stored test tensors themselves.
    arrays, images, labels = fixture_digits
    with threadpool_limits(1):  # BLAS threads only slow small matrices down on a busy machine
        predict = train_small_mlp(arrays["train_images"] / np.float32(255), arrays["train_labels"].astype(np.int64))
    reference = predict(images / np.float32(255))
    assert (reference == labels).mean() > 0.85  # the model learned something: the comparison means something
    for name, got in processed_variants.items():
        agree = (predict(got) == reference).mean()
        assert agree >= 0.95, f"{name}: {agree:.0%} of predictions agree"


# --- the output contract ----------------------------------------------------------------

def test_output_is_mnist_shaped(processed_variants, originals):
    for image in [*originals[:20], *processed_variants["photo"][:20], *processed_variants["transparent"][:20]]:
        assert image.dtype == np.float32 and image.shape == (28, 28)
        assert image.min() == 0.0 and image.max() == pytest.approx(1.0)
        # The ink's box, anti-aliased edges included: 20 px on the longer side, as in MNIST.
        assert 19 <= max(bbox(image)) <= 21 and max(bbox(image, 0.3)) >= 17
        assert np.abs(centre_of_mass(image) - np.array(CENTRE)).max() <= 0.75
        # The background is exactly 0: everything outside the ink's box, and the corners.
        rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
        outside = np.ones_like(image, dtype=bool)
        outside[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = False
        assert outside.sum() >= 28 * 28 - 22 * 22 and not image[outside].any()
        assert image[:3, :3].max() == image[-3:, -3:].max() == 0


def test_centre_is_where_mnist_digits_have_theirs():
    assert CENTRE == (14.0, 14.0)


def test_to_png_round_trips_and_is_deterministic(originals):
    image = originals[0]
    data = to_png(image)
    assert data == to_png(image.copy())
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "L" and img.size == (28, 28)
        back = np.asarray(img, np.float32) / 255
    assert np.abs(back - image).max() <= 0.5 / 255 + 1e-6
    # Saved input, fed back (predict --save-input, then predict on it): the same digit.
    assert correlation(to_mnist(data), image) > 0.95


def test_to_png_rejects_what_is_not_an_image_array():
    with pytest.raises(ValueError, match=re.escape("expected a finite 2-D array, got shape (28, 28, 3)")):
        to_png(np.zeros((28, 28, 3)))
    with pytest.raises(ValueError, match=re.escape("expected a finite 2-D array, got shape (28, 28)")):
        to_png(np.full((28, 28), np.nan))


def test_thin_vertical_bar_stays_a_thin_stroke():
    canvas = np.full((300, 300), 255, np.uint8)
    canvas[50:250, 146:154] = 0  # an 8x200 "1" in black on white
    image = to_mnist(encode(Image.fromarray(canvas)))
    height, width = bbox(image, 0.1)
    assert 19 <= height <= 21
    assert 1 <= width <= 4, f"a blob {width} px wide"
    columns = np.flatnonzero(image.max(axis=0) > 0.5)
    assert abs(columns.mean() - CENTRE[1]) <= 1


def test_hairline_is_thickened_not_lost():
    """A 1-px pen line on a big picture would fade to grey at 20 px: it comes out as a visible stroke."""
    img = Image.new("L", (900, 900), 255)
    ImageDraw.Draw(img).line([(300, 150), (600, 150), (400, 750)], fill=0, width=2)  # a "7"
    image = to_mnist(encode(img))
    assert (image > 0.5).sum() >= 25  # some 30 stroke pixels of a 2-px wide 7


def test_a_speck_does_not_move_the_digit(fixture_digits):
    _, images, _ = fixture_digits
    ink = enlarge(images[0])
    clean = to_mnist(encode(grey_image(ink, dark_on_light=True)))
    ink[260:264, 300:304] = 1.0  # a 4x4 dust speck far from the digit
    specked = to_mnist(encode(grey_image(ink, dark_on_light=True)))
    np.testing.assert_allclose(specked, clean, atol=1e-6)


def test_a_digit_in_two_pieces_keeps_both(fixture_digits):
    _, images, _ = fixture_digits
    ink = enlarge(images[3])
    rows = np.flatnonzero(ink.max(axis=1) > 0)
    middle = (rows[0] + rows[-1]) // 2
    ink[middle - 6:middle + 6] = 0  # a gap across the middle: upper and lower halves
    image = to_mnist(encode(grey_image(ink)))
    assert 19 <= max(bbox(image, 0.3)) <= 21
    assert image[:14].sum() > 0.2 * image.sum() and image[14:].sum() > 0.2 * image.sum()


def test_the_table_beside_the_sheet_is_not_the_digit():
    """A photo whose left edge shows the dark table: the digit is still what comes out."""
    sheet = Image.new("L", (600, 450), 225)
    ImageDraw.Draw(sheet).line([(250, 120), (380, 120), (290, 350)], fill=40, width=15)
    expected = to_mnist(encode(sheet))
    ImageDraw.Draw(sheet).rectangle((0, 0, 80, 450), fill=60)
    assert correlation(to_mnist(encode(sheet, "JPEG", quality=85)), expected) > 0.95


def test_white_strokes_on_a_transparent_canvas():
    canvas = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).line(CANVAS_SEVEN, fill=(255, 255, 255, 255), width=18)
    black = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    ImageDraw.Draw(black).line(CANVAS_SEVEN, fill=(0, 0, 0, 255), width=18)
    # Pillow composites onto the paper in 8 bits: the two differ only by its rounding (< 1/255).
    np.testing.assert_allclose(to_mnist(encode(canvas)), to_mnist(encode(black)), atol=2e-3)


def seven(size=(400, 400), width=18, ink=(20, 20, 40), paper=(250, 250, 245)) -> Image.Image:
    """A pen "7" in the middle of a sheet."""
    img = Image.new("RGB", size, paper)
    w, h = size
    ImageDraw.Draw(img).line([(0.38 * w, 0.3 * h), (0.62 * w, 0.3 * h), (0.45 * w, 0.72 * h)], fill=ink, width=width)
    return img


@pytest.mark.parametrize("paper", ["ruled", "ruled, tilted", "squared", "a box around it"])
def test_thin_lines_across_the_paper_are_not_the_digit(paper):
    """Ruled or squared paper, a margin, a form's box: thin lines join the digit, and it came out tiny."""
    clean = seven()
    expected = to_mnist(encode(clean))
    img = clean.copy()
    draw = ImageDraw.Draw(img)
    blue, red = (120, 160, 230), (230, 100, 100)
    if paper.startswith("ruled"):
        tilt = 12 if "tilted" in paper else 0  # a photo is rarely square to the lines
        for y in range(20, 400, 30):
            draw.line([(0, y), (400, y + tilt)], fill=blue, width=2)
        draw.line([(60, 0), (60 + tilt // 3, 400)], fill=red, width=2)
    elif paper == "squared":
        for k in range(10, 400, 25):
            draw.line([(0, k), (400, k)], fill=blue, width=1)
            draw.line([(k, 0), (k, 400)], fill=blue, width=1)
    else:
        draw.rectangle((12, 12, 387, 387), outline=(0, 0, 0), width=5)
    img.paste(clean.crop((130, 100, 270, 300)), (130, 100))  # the ink lies over the lines
    assert correlation(to_mnist(encode(img)), expected) > 0.9


def test_a_tightly_cropped_digit_keeps_its_full_width_bar():
    """A "7" cropped to its ink: its bar spans the picture like a ruled line, and is thinner
    than the down-stroke (a calligraphic pen), but removing it would not free a digit in a box."""
    img = Image.new("RGB", (400, 400), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    draw.line([(152, 120), (248, 120)], fill=(20, 20, 40), width=5)
    draw.line([(240, 120), (180, 288)], fill=(20, 20, 40), width=18)
    crop = img.crop((148, 115, 252, 292))  # the bar touches both sides
    image = to_mnist(encode(crop))
    assert (image[4:9].max(axis=0) > 0.3).sum() >= 10  # the bar is there, across the top
    assert correlation(image, to_mnist(encode(img))) > 0.95


def test_a_dark_frame_all_around_is_not_the_paper():
    """A thick black frame (a photo's dark surround, a bordered card) filled the border band."""
    img = seven(size=(300, 300)).convert("L")
    expected = to_mnist(encode(img))
    ImageDraw.Draw(img).rectangle((0, 0, 299, 299), outline=0, width=15)
    assert correlation(to_mnist(encode(img)), expected) > 0.95


def test_faint_white_strokes_on_a_transparent_canvas_and_a_dark_speck():
    black = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    ImageDraw.Draw(black).line(CANVAS_SEVEN, fill=(0, 0, 0, 255), width=18)
    expected = to_mnist(encode(black))
    for alpha, speck in [(100, False), (255, True)]:
        canvas = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
        draw = ImageDraw.Draw(canvas)
        draw.line(CANVAS_SEVEN, fill=(255, 255, 255, alpha), width=18)
        if speck:
            draw.rectangle((30, 240, 31, 241), fill=(0, 0, 0, 255))  # a dark 2x2 dot
        assert correlation(to_mnist(encode(canvas)), expected) > 0.95, (alpha, speck)


@pytest.mark.parametrize("fmt, mode, kwargs", [
    ("GIF", "P", {}), ("BMP", "RGB", {}), ("WEBP", "RGB", {"lossless": True}), ("WEBP", "RGBA", {"quality": 80}),
    ("TIFF", "CMYK", {}), ("JPEG", "CMYK", {}), ("TIFF", "YCbCr", {}), ("TIFF", "LAB", {}), ("TIFF", "F", {}),
    ("TIFF", "I", {}), ("TIFF", "I;16B", {}), ("PNG", "1", {}), ("PNG", "LA", {}), ("PPM", "L", {}),
    ("TIFF", "RGBA", {"compression": "tiff_lzw"}),
])
def test_formats_and_modes(fmt, mode, kwargs, fixture_digits, originals):
    _, images, _ = fixture_digits
    ink = enlarge(images[1], scale=4, canvas=(150, 130), at=(10, 5))
    grey = grey_image(ink, dark_on_light=True)
    if mode == "F":
        img = Image.fromarray((1 - ink) * 1000 - 5)  # any range: scaled by its own
    elif mode == "I":
        img = Image.fromarray(((1 - ink) * 100_000).astype(np.int32))
    elif mode == "I;16B":
        img = Image.frombytes("I;16B", grey.size, np.round((1 - ink) * 4095).astype(">u2").tobytes())  # 12-bit data
    elif mode == "LA":
        img = Image.merge("LA", (Image.new("L", grey.size, 0), Image.fromarray(np.round(ink * 255).astype(np.uint8))))
    elif mode == "RGBA":
        img = grey.convert("RGBA")
    elif mode == "1":
        img = grey.convert("1", dither=Image.Dither.NONE)  # a thresholded scan
    else:
        img = grey.convert(mode)
    data = encode(img, fmt, **kwargs)
    with Image.open(io.BytesIO(data)) as check:
        assert check.format == fmt
    expected = to_mnist(encode(grey))
    got = to_mnist(data)
    assert correlation(got, expected) > 0.95, f"{fmt}/{mode}"
    assert correlation(got, originals[1]) > 0.85


def test_multi_frame_gif_uses_the_first_frame(fixture_digits, originals):
    _, images, _ = fixture_digits
    frames = [grey_image(enlarge(d, scale=4, canvas=(150, 130), at=(10, 5))) for d in images[:2]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert correlation(to_mnist(data), originals[0]) > 0.9


def peak_memory(function, *args):
    """``function(*args)`` and the most memory (bytes, as tracemalloc counts it: numpy's arrays too) it held at once."""
    tracing = tracemalloc.is_tracing()  # e.g. python -X tracemalloc: leave it on afterwards
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = function(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        if not tracing:
            tracemalloc.stop()


def test_large_photo_is_shrunk_before_the_float_work(fixture_digits, originals):
    """A 2400x2000 JPEG is decoded at a reduced size (DCT scaling) and shrunk before the float work:
    reading it never holds as much as an 8-bit copy of the full picture (4.8 MB)."""
    _, images, _ = fixture_digits
    big = Image.fromarray(images[2]).resize((1800, 1800), Image.BICUBIC)
    paper = Image.new("L", (2400, 2000), 0)
    paper.paste(big, (300, 100))
    data = encode(Image.eval(paper, lambda v: 255 - v).convert("RGB"), "JPEG", quality=85)
    to_mnist(data)  # the first call's lazy imports are not the picture's memory
    image, peak = peak_memory(to_mnist, data)
    assert peak < 2400 * 2000, f"to_mnist held {peak / 1e6:.1f} MB"
    assert correlation(image, originals[2]) > 0.9


def test_a_big_digit_is_worked_on_shrunk_and_reads_the_same(monkeypatch):
    """A canvas drawing's digit, ~160 px, is worked on at half size (still over DIGIT_SIDE): exactly the
    28x28 of the same drawing given at half size, and nearly that of the drawing worked on at full size."""
    canvas = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).line(CANVAS_SEVEN, fill=(0, 0, 0, 255), width=18)
    on_paper = Image.new("L", (280, 280), 255)  # the same drawing, its transparency as white paper
    ImageDraw.Draw(on_paper).line(CANVAS_SEVEN, fill=0, width=18)
    shrunk = to_mnist(encode(canvas))
    np.testing.assert_array_equal(shrunk, to_mnist(encode(on_paper.reduce(2))))
    monkeypatch.setattr(images_module, "DIGIT_SIDE", 280)  # no box in a 280 px picture is that long: nothing is shrunk
    full_size = to_mnist(encode(canvas))
    assert correlation(shrunk, full_size) > 0.98 and np.abs(shrunk - full_size).max() < 0.2


def test_lines_across_the_picture_keep_it_full_size(monkeypatch):
    """Ruled lines reach the border: the first look cannot tell the digit's size, so nothing is shrunk."""
    clean = seven(size=(600, 600), width=30)
    lined = clean.copy()
    draw = ImageDraw.Draw(lined)
    for y in range(20, 600, 40):
        draw.line([(0, y), (600, y)], fill=(60, 90, 200), width=2)
    pictures = [encode(clean), encode(lined)]
    as_read = [to_mnist(data) for data in pictures]
    monkeypatch.setattr(images_module, "DIGIT_SIDE", 600)  # no box in a 600 px picture is that long: nothing is shrunk
    full_size = [to_mnist(data) for data in pictures]
    assert not np.array_equal(as_read[0], full_size[0])  # the clean sheet was worked on shrunk ...
    assert correlation(as_read[0], full_size[0]) > 0.98  # ... and reads the same
    np.testing.assert_array_equal(as_read[1], full_size[1])  # the lined one at full size


# --- bad input: only ImageError, with one clear sentence ------------------------------

def small_png() -> bytes:
    img = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(img).ellipse((16, 8, 48, 56), outline=0, width=6)
    return encode(img)


def small_jpeg() -> bytes:
    img = Image.new("RGB", (128, 128), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((32, 16, 96, 112), outline=(0, 0, 0), width=10)
    return encode(img, "JPEG", quality=90)


def assert_refused(data, message: str) -> None:
    """to_mnist(data) raises ImageError, and its text is exactly ``message``."""
    with pytest.raises(ImageError) as info:
        to_mnist(data)
    assert str(info.value) == message


def test_random_bytes_are_not_an_image():
    assert_refused(np.random.default_rng(0).bytes(5000), NOT_AN_IMAGE)


def test_a_text_file_is_not_an_image():
    assert_refused(b"7\nthis is a text file, not a picture\n", NOT_AN_IMAGE)


def test_empty_file():
    assert_refused(b"", "the file is empty (0 bytes)")


@pytest.mark.parametrize("make", [small_png, small_jpeg])
def test_truncated_files(make):
    data = make()
    assert_refused(data[: len(data) * 2 // 3], CORRUPT)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("colour", [0, 255, 128])
def test_one_colour_image(colour):
    assert_refused(encode(Image.new("L", (200, 150), colour)), NO_DIGIT)
    assert_refused(encode(Image.new("RGB", (200, 150), (colour, 90, 40)), "JPEG"), NO_DIGIT)


def test_fully_transparent_image():
    assert_refused(encode(Image.new("RGBA", (280, 280), (0, 0, 0, 0))), NO_DIGIT)
    assert_refused(encode(Image.new("RGBA", (280, 280), (255, 255, 255, 0))), NO_DIGIT)


def test_only_noise_or_a_lighting_gradient():
    rng = np.random.default_rng(1)
    paper = np.clip(200 + rng.normal(0, 4, (300, 400)), 0, 255).astype(np.uint8)
    assert_refused(encode(Image.fromarray(paper)), NO_DIGIT)
    gradient = np.linspace(120, 240, 400)[None, :] * np.ones((300, 1))
    assert_refused(encode(Image.fromarray(gradient.astype(np.uint8)), "JPEG"), NO_DIGIT)
    one_pixel = np.full((300, 400), 255, np.uint8)
    one_pixel[100, 100] = 0
    assert_refused(encode(Image.fromarray(one_pixel)), NO_DIGIT)


def no_decoding(monkeypatch) -> None:
    """Make any decoding of pixel data fail (to_mnist would then say "corrupt", not "too large")."""
    def load(self):
        raise AssertionError("the pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_decompression_bomb_is_refused_from_its_header(monkeypatch):
    no_decoding(monkeypatch)
    assert_refused(png_header_only(50_000, 50_000), "the image is too large (over 40 million pixels)")
    # Between our limit and Pillow's own (89M pixels): refused by MAX_PIXELS.
    assert_refused(png_header_only(8_000, 6_000), "the image is too large (8000x6000 pixels; the limit is 40 million)")
    assert 8_000 * 6_000 > MAX_PIXELS == 40_000_000


def test_a_real_bomb_is_refused_without_decoding(monkeypatch):
    """A complete, valid 7000x7000 1-bit PNG (a few KB): over MAX_PIXELS."""
    data = encode(Image.new("1", (7000, 7000), 1), optimize=False)
    assert len(data) < 100_000
    no_decoding(monkeypatch)
    assert_refused(data, "the image is too large (7000x7000 pixels; the limit is 40 million)")


def test_corrupted_files_raise_only_image_error():
    """Bytes flipped or cut at random in valid files of several formats: ImageError or a result, nothing else."""
    rng = np.random.default_rng(2)
    img = Image.new("RGB", (96, 96), (240, 240, 240))
    ImageDraw.Draw(img).line([(30, 20), (70, 20), (40, 80)], fill=(10, 10, 60), width=8)
    valid = [encode(img, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]
    for data in valid:
        for _ in range(25):
            broken = bytearray(data)
            for position in rng.integers(0, len(broken), rng.integers(1, 8)):
                broken[position] = rng.integers(0, 256)
            if rng.random() < 0.3:
                broken = broken[: rng.integers(1, len(broken))]
            try:
                image = to_mnist(bytes(broken))
            except ImageError as exc:
                assert any(re.fullmatch(sentence, str(exc)) for sentence in REFUSALS), str(exc)
            else:
                assert image.shape == (28, 28) and image.dtype == np.float32


def test_wrong_argument_type():
    with pytest.raises(ImageError, match="^expected the bytes of an image file, got str$"):
        to_mnist("digit.png")


def test_pillow_settings_are_left_alone():
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    to_mnist(small_png())
    with pytest.raises(ImageError):
        to_mnist(png_header_only(50_000, 50_000))
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == before


# --- load_image ---------------------------------------------------------------------------

def test_load_image_reads_a_file(tmp_path):
    path = tmp_path / "seven.png"
    path.write_bytes(small_png())
    expected = to_mnist(small_png())
    np.testing.assert_array_equal(load_image(path), expected)
    np.testing.assert_array_equal(load_image(str(path)), expected)


def test_load_image_missing_file(tmp_path):
    with pytest.raises(ImageError, match=f"^{re.escape(str(tmp_path / 'nope.png'))} does not exist$"):
        load_image(tmp_path / "nope.png")


def test_load_image_directory(tmp_path):
    with pytest.raises(ImageError, match=f"^{re.escape(str(tmp_path))} is a directory, not an image file$"):
        load_image(tmp_path)


def test_load_image_not_a_regular_file():
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero here")
    with pytest.raises(ImageError, match="^/dev/zero is not a regular file$"):
        load_image("/dev/zero")  # would never finish reading


def test_load_image_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a picture")
    with pytest.raises(ImageError, match=f"^{re.escape(NOT_AN_IMAGE)}$"):
        load_image(path)
