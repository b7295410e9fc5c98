"""``DecodeLimits.jpeg_reduce_to_side``: large JPEGs decoded at a power-of-two reduction
(libjpeg's DCT scaling), upright, and everything else exactly as before."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from facesvc.imaging import DecodeLimits, decode_image

SIDE = 600
ROOMY = 5_000_000
"""A decoding budget above the 2400x1800 (4.3 MP) photos here, so what these tests see is
the side rule alone (tests/test_imaging_budget.py has the budget)."""


def _photo(width: int, height: int) -> Image.Image:
    astronaut = skimage.data.astronaut()  # type: ignore[no-untyped-call]
    return Image.fromarray(astronaut).resize((width, height), Image.Resampling.BILINEAR)


def _jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, format="JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, format="JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def test_full_size_unless_asked() -> None:
    limits = DecodeLimits(max_decoded_pixels=ROOMY)
    assert decode_image(_jpeg(_photo(2400, 1800)), limits).shape == (1800, 2400, 3)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((2000, 1500), (750, 1000)),  # 1/2 keeps the longer side >= 600, 1/4 would not
        ((2400, 1800), (450, 600)),  # 1/4 leaves exactly 600
        ((4800, 3600), (450, 600)),  # 1/8
        ((1199, 900), (900, 1199)),  # under twice the side: full size
    ],
)
def test_large_jpeg_is_reduced_by_a_power_of_two(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    image = decode_image(_jpeg(_photo(*size)), DecodeLimits(jpeg_reduce_to_side=SIDE))
    assert image.shape == (*expected, 3)


def test_reduced_picture_is_the_same_picture() -> None:
    photo = _photo(2400, 1800)
    reduced = decode_image(_jpeg(photo), DecodeLimits(jpeg_reduce_to_side=SIDE))
    quartered = np.asarray(photo.reduce(4), dtype=np.float64)
    assert np.abs(reduced.astype(np.float64) - quartered).mean() < 3.0


def test_exif_rotated_jpeg_is_reduced_and_upright() -> None:
    # Orientation 6: the stored 2400x1800 picture is shown rotated to portrait.
    data = _jpeg(_photo(2400, 1800), orientation=6)
    full = decode_image(data, DecodeLimits(max_decoded_pixels=ROOMY))
    reduced = decode_image(data, DecodeLimits(jpeg_reduce_to_side=SIDE))
    assert full.shape == (2400, 1800, 3)
    assert reduced.shape == (600, 450, 3)


def test_png_is_never_reduced() -> None:
    buffer = io.BytesIO()
    _photo(2400, 1800).save(buffer, format="PNG", compress_level=1)
    limits = DecodeLimits(max_decoded_pixels=ROOMY, jpeg_reduce_to_side=SIDE)
    assert decode_image(buffer.getvalue(), limits).shape == (1800, 2400, 3)


def test_side_must_be_positive() -> None:
    with pytest.raises(ValueError, match="jpeg_reduce_to_side"):
        DecodeLimits(jpeg_reduce_to_side=0)
