"""A person's image to a KMNIST-style 28x28 uint8 array: decoding under size limits, then preprocessing.

KMNIST characters are light ink on a black background, and each is scaled so that the longer side of
its bounding box spans the whole 28-pixel frame, with the box centred (measured on the test set; see
docs/serving.md). `to_kmnist_style` maps any greyscale image to that look.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from kmnist.data import IMAGE_SIZE
from kmnist.errors import ImageError

# Raster formats only: Pillow's other plugins (EPS runs Ghostscript, for one) are no part of this job.
# JPEG includes the multi-picture JPEGs (MPO) that many cameras write; PPM includes PGM and PBM.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
INK_THRESHOLD = 0.2  # ink level (0 background, 1 darkest stroke) a pixel needs to count for the bounding box
MIN_CONTRAST = 0.05  # ink range below this (about 13 of 255 levels) is a blank image, not a character
BORDER_FRACTION = 0.02  # width of the border ring that estimates the background, as a fraction of the shorter side
WORKING_SIDE = 1024  # pixels; larger images are reduced first (the character ends up 28 pixels tall anyway)


@dataclass(frozen=True)
class Limits:
    """What an input may cost before it is refused. Pixels are checked from the header, before decoding."""

    max_bytes: int = 20 * 2**20  # file size in bytes
    max_pixels: int = 50_000_000  # width * height; a decompression bomb is refused before it expands


def decode_image(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Encoded bytes -> greyscale float32 (H, W) in [0, 1], as seen (dark ink stays dark).

    Transparency is flattened onto a background that contrasts with the ink, so dark strokes on a
    transparent canvas become dark on white and light strokes light on black.
    """
    if not data:
        raise ImageError("empty file", "empty")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{len(data)} bytes, over the limit of {limits.max_bytes}", "too_large")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageError(f"too many pixels ({error})", "too_many_pixels") from None
    except Exception:  # Pillow raises many types on malformed headers; all mean "not an image"
        raise ImageError(f"not an image in a supported format ({', '.join(FORMATS)})", "not_an_image") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(f"{width}x{height} pixels, over the limit of {limits.max_pixels}", "too_many_pixels")
    if width < 1 or height < 1:
        raise ImageError(f"{width}x{height} pixels", "not_an_image")
    kind = image.format  # the rotated copy below no longer knows it
    try:
        if kind == "JPEG":  # let the decoder scale down by 2, 4 or 8: a phone photo decodes fast
            image.draft(image.mode, (WORKING_SIDE, WORKING_SIDE))
        image = ImageOps.exif_transpose(image)  # phone photos are stored sideways with a rotation tag
        return _greyscale(_shrink(image))
    except Image.DecompressionBombError as error:
        raise ImageError(f"too many pixels ({error})", "too_many_pixels") from None
    except Exception as error:  # truncated or corrupt data; Pillow's decoders raise many exception types
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise ImageError(f"cannot decode the {kind} image ({reason})", "not_an_image") from None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _shrink(image: Image.Image) -> Image.Image:
    """Reduce an image larger than WORKING_SIDE by an integer factor (box average), keeping memory small."""
    if max(image.size) <= WORKING_SIDE:
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):  # palette, bilevel, CMYK: averaging needs levels
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    return image.reduce(math.ceil(max(image.size) / WORKING_SIDE))


def _greyscale(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit or float greyscale
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():  # a float image may hold NaN or infinity: no level to read there
            raise ImageError("pixel values that are not numbers (NaN or infinity)", "not_an_image")
        # Values all <= 255 in a 16-bit image: 8-bit data in a wider container (a true 16-bit image that
        # dark would be black to the eye), so read as 8-bit.
        scale = 1.0 if image.mode == "F" and values.max() <= 1 else 255.0 if values.max() <= 255 else 65535.0
        return np.clip(values / scale, 0, 1)
    if not _has_alpha(image):
        return np.asarray(image.convert("L"), dtype=np.float32) / 255
    grey_alpha = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32) / 255  # (H, W, 2)
    grey, alpha = grey_alpha[..., 0], grey_alpha[..., 1]
    if alpha.min() == 1:
        return grey
    opaque = alpha >= 0.5
    if opaque.mean() >= 0.5:  # mostly opaque: a page (paper and ink) with transparent margins, filled with its paper
        background = float(np.median(grey[opaque]))
    else:  # mostly transparent: what shows is the ink, so the rest becomes whichever of white or black contrasts
        ink_level = float((grey * alpha).sum() / alpha.sum()) if alpha.sum() > 0 else 0.0
        background = 1.0 if ink_level < 0.5 else 0.0
    return grey * alpha + background * (1 - alpha)


def read_image_file(path: str | Path, limits: Limits = Limits()) -> np.ndarray:
    """decode_image for a file, refusing an oversized file before reading it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageError(f"{size} bytes, over the limit of {limits.max_bytes}", "too_large")
        with open(path, "rb") as handle:  # at most one byte over the limit: a device file reports no size
            data = handle.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise ImageError(f"over the limit of {limits.max_bytes} bytes", "too_large")
    except FileNotFoundError:
        raise ImageError("no such file", "not_found") from None
    except IsADirectoryError:
        raise ImageError("is a folder", "not_an_image") from None
    except OSError as error:
        raise ImageError(f"cannot read ({error.strerror or error})", "unreadable") from None
    return decode_image(data, limits)


def edges(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Thin strips along the top, bottom, left and right: background, since a character sits inside."""
    ring = max(1, round(BORDER_FRACTION * min(grey.shape)))
    return grey[:ring].ravel(), grey[-ring:].ravel(), grey[:, :ring].ravel(), grey[:, -ring:].ravel()


def background(ink: np.ndarray) -> np.ndarray:
    """The paper's level at each pixel of an ink-is-bright image: a plane through the four edges' levels.

    A plane follows the uneven light of a photo; for an evenly lit image it is the constant border
    level. Each edge's level is its lower quartile, which ignores ink covering up to 3/4 of that edge.
    """
    top, bottom, left, right = (float(np.percentile(strip, 25)) for strip in edges(ink))
    height, width = ink.shape
    rows = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None] * (bottom - top)
    columns = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :] * (right - left)
    return ((top + bottom + left + right) / 4 + rows + columns).astype(np.float32)


def ink_image(grey: np.ndarray) -> np.ndarray:
    """Greyscale -> ink in [0, 1] on a 0 background: dark-on-light is inverted, the background removed, contrast stretched."""
    # The paper is the edges' level: nearer the image's brightest than its darkest, the ink is the darker
    # (dark ink on light paper, or on dim grey paper in a dark photo), and the image is inverted.
    if float(np.median(np.concatenate(edges(grey)))) > (float(grey.min()) + float(grey.max())) / 2:
        grey = 1 - grey
    ink = grey - background(grey)
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise ImageError("no character found (the image is blank)", "blank_image")
    return np.clip(ink / peak, 0, 1)


def ink_bounding_box(ink: np.ndarray, threshold: float = INK_THRESHOLD) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), bottom and right exclusive, of the pixels above threshold."""
    rows = np.flatnonzero((ink > threshold).any(axis=1))
    columns = np.flatnonzero((ink > threshold).any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1


def fit_to_frame(ink: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Crop to the ink, pad to a centred square, resize so the longer side fills `size` pixels."""
    top, bottom, left, right = ink_bounding_box(ink)
    crop = ink[top:bottom, left:right]
    height, width = crop.shape
    side = max(height, width)
    square = np.zeros((side, side), dtype=np.float32)
    row, column = (side - height) // 2, (side - width) // 2
    square[row:row + height, column:column + width] = crop
    if side == size:
        return square
    # Lanczos: sharp when enlarging a small drawing, properly anti-aliased when shrinking a photo.
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0, 1)


def to_kmnist_style(grey: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Greyscale float (H, W) in [0, 1] -> uint8 (size, size): light ink on black, filling the frame, centred."""
    framed = fit_to_frame(ink_image(grey), size)
    peak = float(framed.max())
    if peak > 0:  # shrinking thins strokes; KMNIST's strokes reach full intensity (99% of test images peak at 255)
        framed = framed / peak
    return np.rint(framed * 255).astype(np.uint8)


def prepare_bytes(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Encoded image bytes -> KMNIST-style uint8 (28, 28)."""
    return to_kmnist_style(decode_image(data, limits))


def prepare_file(path: str | Path, limits: Limits = Limits()) -> np.ndarray:
    """An image file -> KMNIST-style uint8 (28, 28)."""
    return to_kmnist_style(read_image_file(path, limits))
