"""Hostile and odd uploads either decode to the right upright RGB picture or are refused with
an ImageRejected that says what to send instead."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from facesvc.imaging import DecodeLimits, ImageRejected, decode_image

LIMITS = DecodeLimits()


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bomb_png(side: int) -> bytes:
    """A valid 1-bit greyscale PNG of side x side black pixels, built row by row so the test
    never holds the decoded image in memory."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"hello, this is not a picture", "not a JPEG, PNG, WebP image"),
        (_encode(Image.new("RGB", (8, 8)), "GIF"), "not a JPEG, PNG, WebP image"),
        (_encode(Image.new("RGB", (8, 8)), "BMP"), "not a JPEG, PNG, WebP image"),
    ],
)
def test_non_images_and_other_formats_are_refused(data: bytes, words: str) -> None:
    with pytest.raises(ImageRejected, match=words):
        decode_image(data, LIMITS)


def test_too_many_bytes_is_refused_before_decoding() -> None:
    data = _encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageRejected, match=r"the limit is .* MiB: send a smaller"):
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1))


# Pillow warns past 89 MP when it opens the header; the refusal is ours.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_png_is_refused_from_its_header() -> None:
    bomb = _bomb_png(10_000)
    assert len(bomb) < 64_000  # 100 megapixels in a few kilobytes
    with pytest.raises(ImageRejected, match=r"10000x10000 = 100 MP; the limit is 25 MP"):
        decode_image(bomb, LIMITS)


def test_pixel_limit_applies_to_ordinary_images_too() -> None:
    data = _encode(Image.new("RGB", (100, 60)), "PNG")
    with pytest.raises(ImageRejected, match="100x60"):
        decode_image(data, DecodeLimits(max_pixels=5_999))
    assert decode_image(data, DecodeLimits(max_pixels=6_000)).shape == (60, 100, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_data_is_an_error_not_a_padded_picture(fmt: str) -> None:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    data = _encode(noise, fmt)
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        decode_image(data[: len(data) * 2 // 3], LIMITS)


def test_truncated_images_are_refused_even_if_pillow_was_told_to_accept_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(_encode(Image.new("RGB", (8, 8)), "PNG"), LIMITS)


def test_animated_png_is_refused() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    data = _encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageRejected, match="single still photo"):
        decode_image(data, LIMITS)


def test_one_pixel_image_decodes() -> None:
    out = decode_image(_encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), LIMITS)
    assert out.shape == (1, 1, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [10, 20, 30]


def test_greyscale_becomes_three_equal_channels() -> None:
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = decode_image(_encode(Image.fromarray(grey, "L"), "PNG"), LIMITS)
    assert out.shape == (16, 16, 3) and out.flags.c_contiguous
    for c in range(3):
        assert np.array_equal(out[:, :, c], grey)


def test_rgba_is_composited_on_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (200, 10, 10, 255)  # opaque red
    rgba[2:] = (0, 0, 0, 0)  # fully transparent black
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMITS)
    assert out[0, 0].tolist() == [200, 10, 10]
    assert out[3, 3].tolist() == [255, 255, 255]


def test_palette_with_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    image.paste(0, (0, 0, 2, 4))
    data = _encode(image, "PNG", transparency=0)
    out = decode_image(data, LIMITS)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 3].tolist() == [0, 128, 0]


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    wide = np.array([[0, 257 * 100, 65535, 32896]], dtype=np.uint16)
    image = Image.frombytes("I;16", (4, 1), wide.astype("<u2").tobytes())
    data = _encode(image, "PNG")
    out = decode_image(data, LIMITS)
    assert out[0, :, 0].tolist() == [0, 100, 255, 128]


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in print colours
    out = decode_image(_encode(cmyk, "JPEG", quality=95), LIMITS)
    assert out.shape == (32, 32, 3)
    assert np.abs(out[16, 16].astype(int) - (255, 0, 0)).max() <= 8


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_decodes() -> None:
    out = decode_image(_encode(_halves(32, 16), "WEBP", lossless=True), LIMITS)
    assert out.shape == (16, 32, 3)
    assert out[8, 4].tolist() == [255, 0, 0] and out[8, 28].tolist() == [0, 0, 255]


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [(1, None, None), (6, (255, 0, 0), (0, 0, 255)), (8, (0, 0, 255), (255, 0, 0))],
)
def test_exif_orientation_is_applied(
    orientation: int, top: tuple[int, int, int] | None, bottom: tuple[int, int, int] | None
) -> None:
    """A 40x20 picture stored sideways: orientation 6 turns it 90 degrees clockwise for
    display (its left edge goes to the top), 8 counter-clockwise (left edge to the bottom)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_halves(40, 20), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, LIMITS)
    if top is None or bottom is None:
        assert out.shape == (20, 40, 3)
        return
    assert out.shape == (40, 20, 3)
    assert np.abs(out[5, 10].astype(int) - top).max() <= 8
    assert np.abs(out[35, 10].astype(int) - bottom).max() <= 8


def test_limits_reject_unknown_formats() -> None:
    with pytest.raises(ValueError, match="unsupported formats"):
        DecodeLimits(formats=frozenset({"GIF"}))


def test_a_png_only_service_refuses_jpeg() -> None:
    data = _encode(Image.new("RGB", (8, 8)), "JPEG")
    with pytest.raises(ImageRejected, match="not a PNG image"):
        decode_image(data, DecodeLimits(formats=frozenset({"PNG"})))
