"""Decoding under limits and preprocessing to KMNIST style: the variants a person might send all land the same."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kmnist import imageprep
from kmnist.errors import ImageError
from kmnist.imageprep import Limits, decode_image, prepare_bytes, prepare_file, read_image_file, to_kmnist_style


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def character() -> np.ndarray:
    """A character already in KMNIST style: ink spans all 28 rows, box centred across, peak 255, black background."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[:, 12:15] = 255  # a stroke from the top row to the bottom row
    image[5:9, 8:19] = 200  # bars 11 pixels wide: the box is columns 8..18, where centring puts it ((28 - 11) // 2)
    image[20:23, 8:19] = 128
    return image


def test_dataset_style_image_is_unchanged(character: np.ndarray) -> None:
    assert np.array_equal(prepare_bytes(encode(Image.fromarray(character))), character)


def test_inverted_rgb_rgba_and_padded_variants_give_the_same_image(character: np.ndarray) -> None:
    dark_on_light = Image.fromarray(255 - character)
    transparent = Image.new("RGBA", (28, 28), (0, 0, 0, 0))  # dark ink on a transparent canvas
    transparent.putalpha(Image.fromarray(character))
    padded = np.zeros((90, 60), dtype=np.uint8)
    padded[7:35, 29:57] = character  # off-centre in a larger frame
    sixteen_bit = Image.fromarray(character.astype(np.uint16) * 257)  # a 16-bit greyscale PNG
    page = Image.new("RGBA", (34, 34), (0, 0, 0, 0))  # an opaque page (dark on light) with transparent margins
    page.paste(dark_on_light.convert("RGBA"), (3, 3))
    for variant in (dark_on_light, dark_on_light.convert("RGB"), transparent, Image.fromarray(padded), sixteen_bit,
                    page):
        assert np.array_equal(prepare_bytes(encode(variant)), character), variant.mode


@pytest.mark.parametrize("paper, ink", [(120, 20), (100, 10), (150, 250)])
def test_ink_on_grey_paper_on_either_side_of_mid_grey_is_found(character: np.ndarray, paper: int, ink: int) -> None:
    # The character's strokes at `ink` on paper at `paper`: dim photos of dark ink, and light ink on grey.
    scale = character.astype(np.float32) / 255
    grey = np.zeros((68, 68), dtype=np.uint8) + paper
    grey[20:48, 20:48] = np.round(paper + (ink - paper) * scale).astype(np.uint8)
    assert np.abs(prepare_bytes(encode(Image.fromarray(grey))).astype(int) - character).max() <= 3


def test_a_float_image_holding_nan_is_refused(character: np.ndarray) -> None:
    values = character.astype(np.float32) / 255
    values[0, 0] = np.nan
    with pytest.raises(ImageError, match="not numbers") as caught:
        prepare_bytes(encode(Image.fromarray(values, "F"), "TIFF"))
    assert caught.value.kind == "not_an_image"


@pytest.mark.parametrize("fmt, options", [("GIF", {}), ("BMP", {}), ("TIFF", {"compression": "tiff_lzw"}),
                                          ("WEBP", {"lossless": True}), ("PPM", {}), ("JPEG", {"quality": 100})])
def test_common_formats_decode(character: np.ndarray, fmt: str, options: dict) -> None:
    result = prepare_bytes(encode(Image.fromarray(character), fmt, **options))
    assert np.abs(result.astype(int) - character).max() <= (40 if fmt == "JPEG" else 0)


def test_upscaled_and_jpeg_variants_stay_close(character: np.ndarray) -> None:
    upscaled = Image.fromarray(character).resize((112, 112), Image.Resampling.BICUBIC)
    jpeg = encode(Image.fromarray(255 - character).convert("RGB"), "JPEG", quality=75)
    for data in (encode(upscaled), jpeg):
        difference = np.abs(prepare_bytes(data).astype(int) - character).mean()
        assert difference < 15, difference  # mean over pixels, of 255 levels; an unrelated character: about 65


def test_small_dark_character_on_unevenly_lit_paper_fills_the_frame() -> None:
    paper = np.tile(np.linspace(150, 230, 300), (200, 1)).astype(np.uint8)  # grey paper, darker on the left
    paper[120:160, 40:60] = 30  # a 40 x 20 block of dark ink, far from the centre
    result = prepare_bytes(encode(Image.fromarray(paper)))
    assert result.dtype == np.uint8 and result.shape == (28, 28)
    rows = np.flatnonzero(result.max(axis=1) > 128)
    columns = np.flatnonzero(result.max(axis=0) > 128)
    assert rows[0] == 0 and rows[-1] == 27  # the longer side fills the frame
    assert 13 <= len(columns) <= 15 and abs((columns[0] + columns[-1]) / 2 - 13.5) <= 0.5  # 2:1, centred
    assert result.max() == 255 and result[:, :5].max() < 30  # full-strength ink; the paper's shading is gone


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "I;16"])
def test_large_image_is_reduced_first_without_changing_the_result(character: np.ndarray, mode: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    large = Image.fromarray(255 - character).resize((2800, 2800), Image.Resampling.NEAREST)  # 100x, dark on white
    large = large.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(large).astype(np.uint16) * 257)
    files = [(encode(large), 934)]  # 2800 / 3, rounded up
    if mode == "RGB":
        files.append((encode(large, "JPEG", quality=95), 700))  # decoded at half size (1400), then halved
    for data, side in files:
        assert decode_image(data).shape == (side, side)
        reduced = prepare_bytes(data)
        with monkeypatch.context() as patch:
            patch.setattr(imageprep, "WORKING_SIDE", 10**6)
            assert decode_image(data).shape == (2800, 2800)
            whole = prepare_bytes(data)
        assert np.abs(reduced.astype(int) - whole).mean() < 3  # of 255 levels


def test_exif_rotation_is_applied() -> None:
    tall = np.zeros((40, 20), dtype=np.uint8)
    tall[2:38, 8:12] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    decoded = decode_image(encode(Image.fromarray(tall), "PNG", exif=exif.tobytes()))
    assert decoded.shape == (20, 40)


def test_blank_image_is_refused() -> None:
    with pytest.raises(ImageError, match="blank") as caught:
        to_kmnist_style(np.full((50, 50), 0.8, dtype=np.float32))
    assert caught.value.kind == "blank_image"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = encode(Image.new("L", (6000, 6000)))  # 36 megapixels in a few kilobytes
    assert len(bomb) < 100_000
    started = time.perf_counter()
    with pytest.raises(ImageError) as caught:
        decode_image(bomb, Limits(max_pixels=1_000_000))
    assert caught.value.kind == "too_many_pixels" and "6000x6000" in str(caught.value)
    assert time.perf_counter() - started < 0.5  # refused from the header, not decoded


@pytest.mark.parametrize("data, kind", [
    (b"", "empty"),
    (b"x" * 2000, "too_large"),
    (b"just some text, not an image", "not_an_image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not_an_image"),  # EPS would run Ghostscript
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not_an_image"),
])
def test_bad_bytes_are_refused_with_a_kind(data: bytes, kind: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(data, Limits(max_bytes=1000))
    assert caught.value.kind == kind


def test_truncated_image_is_refused(character: np.ndarray) -> None:
    data = encode(Image.fromarray(character).resize((200, 200)))
    with pytest.raises(ImageError, match="cannot decode") as caught:
        decode_image(data[: len(data) // 2])
    assert caught.value.kind == "not_an_image"


def test_files(tmp_path: Path, character: np.ndarray) -> None:
    path = tmp_path / "char.png"
    Image.fromarray(character).save(path)
    assert np.array_equal(prepare_file(path), character)
    with pytest.raises(ImageError, match="no such file"):
        read_image_file(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="folder"):
        read_image_file(tmp_path)
    with pytest.raises(ImageError) as caught:
        read_image_file(path, Limits(max_bytes=10))
    assert caught.value.kind == "too_large"
    if Path("/dev/zero").exists():  # a device reports a size of 0 and never ends: read no more than the limit
        with pytest.raises(ImageError) as caught:
            read_image_file("/dev/zero", Limits(max_bytes=1000))
        assert caught.value.kind == "too_large"
