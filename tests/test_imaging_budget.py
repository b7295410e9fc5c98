"""The decoding budget (``DecodeLimits.max_decoded_pixels``) and ``fit_pixels``: no format
is decoded into more pixels than the budget, a PNG or WebP above it is refused before its
pixels are decoded, and face work sees at most ``max_analyze_pixels`` of any frame.

Issue 18.1: an 80 KB 4900x4900 PNG took 19.7 s of CPU and left the server 4 GB larger."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from facesvc.imaging import DecodeLimits, ImageRejected, decode_image, fit_pixels
from tests.engine_support import astronaut

LIMITS = DecodeLimits()


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_with_garbage_pixels(width: int, height: int) -> bytes:
    """A PNG whose header is valid and whose pixel data is not zlib at all: decoding it
    would fail with "corrupt", so a refusal that names the size proves nothing was
    decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"not deflate data" * 4)
        + chunk(b"IEND", b"")
    )


def test_png_over_the_budget_is_refused_before_any_pixel_is_decoded() -> None:
    # 24 MP is under the 25 MP header limit: before the budget this PNG was decoded.
    data = _png_with_garbage_pixels(4900, 4900)
    with pytest.raises(ImageRejected, match=r"4900x4900 = 24\.0 MP; a PNG image may have at most"):
        decode_image(data, LIMITS)


def test_png_within_the_budget_still_decodes_in_full() -> None:
    data = _encode(Image.new("RGB", (2048, 2048), (10, 20, 30)), "PNG")
    assert decode_image(data, LIMITS).shape == (2048, 2048, 3)
    with pytest.raises(ImageRejected, match="2049x2048"):
        decode_image(_encode(Image.new("RGB", (2049, 2048)), "PNG"), LIMITS)


def test_flat_webp_bomb_is_refused() -> None:
    data = _encode(Image.new("RGB", (4900, 4900), (120, 130, 140)), "WEBP", lossless=True)
    assert len(data) < 4096  # 24 MP in a few kilobytes
    with pytest.raises(ImageRejected, match=r"4900x4900 = 24\.0 MP; a WEBP image"):
        decode_image(data, LIMITS)


def test_large_jpeg_is_decoded_at_the_weakest_reduction_within_the_budget() -> None:
    big = _encode(Image.new("RGB", (5000, 5000), (90, 90, 90)), "JPEG", quality=50)
    # 1/2 would be 6.25 MP, over 4.2: 1/4 it is, never the full 25 MP.
    assert decode_image(big, LIMITS).shape == (1250, 1250, 3)
    just_over = _encode(Image.new("RGB", (2100, 2100)), "JPEG")
    assert decode_image(just_over, LIMITS).shape == (1050, 1050, 3)
    within = _encode(Image.new("RGB", (2048, 2048)), "JPEG")
    assert decode_image(within, LIMITS).shape == (2048, 2048, 3)


def test_jpeg_that_cannot_fit_even_at_one_eighth_is_refused() -> None:
    data = _encode(Image.new("RGB", (1000, 1000)), "JPEG")
    with pytest.raises(ImageRejected, match="1000x1000 = 1 MP, more than 8x8 times"):
        decode_image(data, DecodeLimits(max_decoded_pixels=10_000))
    # 1000/8 = 125: 15,625 pixels fit a budget of that.
    assert decode_image(data, DecodeLimits(max_decoded_pixels=15_625)).shape == (125, 125, 3)


def test_progressive_jpeg_over_the_budget_is_refused() -> None:
    # libjpeg keeps all of a progressive JPEG's coefficients whatever the output scale.
    # It costs about twice a baseline JPEG per pixel: half the budget (2.1 MP).
    data = _encode(Image.new("RGB", (1500, 1500)), "JPEG", progressive=True)
    with pytest.raises(ImageRejected, match=r"progressive JPEG of 1500x1500 = 2\.2 MP"):
        decode_image(data, LIMITS)
    small = _encode(Image.new("RGB", (1400, 1400)), "JPEG", progressive=True)
    assert decode_image(small, LIMITS).shape == (1400, 1400, 3)


def test_side_reduction_and_budget_take_the_stronger() -> None:
    data = _encode(Image.new("RGB", (2400, 1800)), "JPEG")
    # The side rule alone (600) gives 1/4; the budget alone 1/2.
    assert decode_image(data, DecodeLimits(jpeg_reduce_to_side=600)).shape == (450, 600, 3)
    assert decode_image(data, DecodeLimits(jpeg_reduce_to_side=1000)).shape == (900, 1200, 3)


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_decoded_pixels"):
        DecodeLimits(max_decoded_pixels=0)


def test_fit_pixels_scales_down_keeping_proportions() -> None:
    photo = astronaut()  # 512x512
    assert fit_pixels(photo, 512 * 512) is photo
    small = fit_pixels(photo, 100 * 100)
    assert small.shape == (100, 100, 3) and small.dtype == np.uint8
    wide = np.zeros((720, 1280, 3), dtype=np.uint8)
    fitted = fit_pixels(wide, 2 * 640 * 480)
    assert fitted.shape[0] * fitted.shape[1] <= 2 * 640 * 480
    assert fitted.shape[:2] == (587, 1045)
    # The picture, not just its size: the mean brightness survives the scaling.
    assert abs(float(small.mean()) - float(photo.mean())) < 2.0
