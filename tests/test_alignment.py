"""dlib_face_chip cuts the very chip dlib.get_face_chip cuts (small, large, odd-sized, padded
and off-frame faces), and the generic similarity warp puts landmarks on their template."""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facesvc.imaging import DecodeLimits, decode_image
from facesvc.models.alignment import (
    ARCFACE_TEMPLATE_112,
    dlib_face_chip,
    similarity_transform,
    warp_to_template,
)
from facesvc.models.types import RGBImage

dlib = pytest.importorskip("dlib")

MODELS = Path(str(importlib.resources.files("face_recognition_models") / "models"))
# The chip must match dlib's to within one grey level (it has matched exactly so far).
MAX_GREY_DIFF = 1


@pytest.fixture(scope="module")
def predictor() -> Any:
    return dlib.shape_predictor(str(MODELS / "shape_predictor_5_face_landmarks.dat"))


@pytest.fixture(scope="module")
def hog() -> Any:
    return dlib.get_frontal_face_detector()


@pytest.fixture(scope="module")
def astronaut() -> RGBImage:
    data = pytest.importorskip("skimage.data")
    image: RGBImage = np.ascontiguousarray(data.astronaut(), dtype=np.uint8)
    return image


def _points(shape: Any) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def _assert_same_chip(image: RGBImage, shape: Any, size: int = 150, padding: float = 0.25) -> None:
    expected = np.asarray(dlib.get_face_chip(image, shape, size=size, padding=padding))
    got = dlib_face_chip(image, _points(shape), size=size, padding=padding)
    assert got.shape == expected.shape == (size, size, 3) and got.dtype == np.uint8
    diff = int(np.abs(got.astype(int) - expected.astype(int)).max())
    assert diff <= MAX_GREY_DIFF, f"chip differs from dlib's by {diff} grey levels"


def _faces(image: RGBImage, hog: Any, predictor: Any) -> Iterator[Any]:
    for rect in hog(image, 1 if max(image.shape[:2]) < 400 else 0):
        yield predictor(image, rect)


@pytest.mark.parametrize(("size", "padding"), [(150, 0.25), (151, 0.25), (150, 0.4), (112, 0.0)])
def test_chip_equals_dlibs(
    astronaut: RGBImage, hog: Any, predictor: Any, size: int, padding: float
) -> None:
    shapes = list(_faces(astronaut, hog, predictor))
    assert shapes
    for shape in shapes:
        _assert_same_chip(astronaut, shape, size, padding)


@pytest.mark.parametrize("factor", [4.0, 7.0])
def test_large_face_chip_uses_dlibs_pyramid(
    astronaut: RGBImage, hog: Any, predictor: Any, factor: float
) -> None:
    """A face of 350 and 610 px: dlib first halves the crop (twice, three times) with its
    Gaussian pyramid, then samples bilinearly."""
    shape = next(_faces(astronaut, hog, predictor))
    side = round(astronaut.shape[0] * factor)
    big = np.asarray(Image.fromarray(astronaut).resize((side, side), Image.Resampling.BILINEAR))
    rect = shape.rect
    scaled = dlib.full_object_detection(
        dlib.rectangle(
            *(round(v * factor) for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
        ),
        [dlib.point(round(p.x * factor), round(p.y * factor)) for p in shape.parts()],
    )
    assert scaled.rect.width() >= 85 * factor  # 350 and 610 px
    _assert_same_chip(big, scaled)


def test_face_running_off_the_frame_is_black_where_dlib_is(
    astronaut: RGBImage, hog: Any, predictor: Any
) -> None:
    shape = next(_faces(astronaut, hog, predictor))
    crop = np.ascontiguousarray(astronaut[100:, 215:])  # cuts through the face
    moved = dlib.full_object_detection(
        dlib.rectangle(0, 0, 10, 10), [dlib.point(p.x - 215, p.y - 100) for p in shape.parts()]
    )
    _assert_same_chip(crop, moved)
    chip = dlib_face_chip(crop, _points(moved))
    assert (chip == 0).all(axis=2).any()  # part of the chip lies outside the frame


def test_bundled_photos(hog: Any, predictor: Any) -> None:
    insightface = pytest.importorskip("insightface")
    folder = Path(insightface.__file__).parent / "data" / "images"
    faces = 0
    for path in sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.png")):
        image = decode_image(path.read_bytes(), DecodeLimits())
        for shape in _faces(image, hog, predictor):
            _assert_same_chip(image, shape)
            faces += 1
    assert faces >= 6


@pytest.mark.shared_data
def test_shared_photos(hog: Any, predictor: Any, shared_data: Path) -> None:
    photos = sorted(
        p for p in (shared_data / "faces").glob("*/*") if p.suffix.lower() in {".jpg", ".png"}
    )
    faces = 0
    for path in photos[::8]:
        image = decode_image(path.read_bytes(), DecodeLimits())
        for shape in _faces(image, hog, predictor):
            _assert_same_chip(image, shape)
            faces += 1
    assert faces >= 10


def test_similarity_transform_recovers_a_known_one() -> None:
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (7, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = scale * np.array(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    )
    m = similarity_transform(src, src @ rot.T + shift)
    assert np.allclose(m[:, :2], rot) and np.allclose(m[:, 2], shift)


def test_similarity_transform_never_reflects() -> None:
    src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mirrored = src * [-1.0, 1.0]
    assert np.linalg.det(similarity_transform(src, mirrored)[:, :2]) > 0


def test_warp_puts_landmarks_on_the_arcface_template() -> None:
    """Five bright dots placed by a known similarity land on the template's points."""
    angle, scale, shift = -0.2, 2.5, np.array([180.0, 90.0])
    rot = scale * np.array(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    )
    landmarks = ARCFACE_TEMPLATE_112.astype(np.float64) @ rot.T + shift
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    for x, y in np.round(landmarks).astype(int):
        image[y - 2 : y + 3, x - 2 : x + 3] = 255
    chip = warp_to_template(image, landmarks, ARCFACE_TEMPLATE_112, 112)
    assert chip.shape == (112, 112, 3) and chip.dtype == np.uint8
    for tx, ty in ARCFACE_TEMPLATE_112:
        x, y = round(float(tx)), round(float(ty))
        assert chip[y, x].min() >= 200, (tx, ty)
    assert chip[5, 5].max() == 0  # background stays black


@pytest.mark.parametrize("seed", range(6))
def test_warp_reads_the_frame_as_if_surrounded_by_black(seed: int) -> None:
    """Every sample of the chip, the frame's edges and the black beyond them included, is
    what bilinear sampling of the frame padded with one black pixel gives (OpenCV's
    ``warpAffine(..., borderValue=0)``), computed here independently."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    # Faces across the frame, some hanging over an edge or a corner, one wholly outside.
    centre = rng.uniform([-60.0, -60.0], [220.0, 180.0]) if seed else np.array([400.0, 300.0])
    angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.4, 1.5)
    rot = scale * np.array(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    )
    landmarks = (ARCFACE_TEMPLATE_112 - 56.0) @ rot.T + centre
    chip = warp_to_template(image, landmarks, ARCFACE_TEMPLATE_112, 112)

    inverse = np.linalg.inv(
        np.vstack([similarity_transform(landmarks, ARCFACE_TEMPLATE_112), [0, 0, 1]])
    )
    rows, cols = np.mgrid[0:112, 0:112].astype(np.float64)
    xs = inverse[0, 0] * cols + inverse[0, 1] * rows + inverse[0, 2]
    ys = inverse[1, 0] * cols + inverse[1, 1] * rows + inverse[1, 2]
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0))).astype(np.float64)
    x0, y0 = np.floor(xs + 1).astype(int), np.floor(ys + 1).astype(int)
    inside = (x0 >= 0) & (y0 >= 0) & (x0 < 161) & (y0 < 121)
    x0, y0 = np.where(inside, x0, 0), np.where(inside, y0, 0)
    fx, fy = (xs + 1 - x0)[..., None], (ys + 1 - y0)[..., None]
    expected = (1 - fy) * ((1 - fx) * padded[y0, x0] + fx * padded[y0, x0 + 1]) + fy * (
        (1 - fx) * padded[y0 + 1, x0] + fx * padded[y0 + 1, x0 + 1]
    )
    expected = np.where(inside[..., None], np.floor(expected + 0.5), 0)
    assert np.abs(chip.astype(int) - expected.astype(int)).max() <= 1  # rounding at .5
    assert (chip.astype(int) != expected.astype(int)).mean() < 0.001


def test_arcface_template_is_the_standard_one() -> None:
    assert ARCFACE_TEMPLATE_112.shape == (5, 2)
    assert ARCFACE_TEMPLATE_112[0].tolist() == pytest.approx([38.2946, 51.6963])
    assert ARCFACE_TEMPLATE_112[4].tolist() == pytest.approx([70.7299, 92.2041])


def test_bad_arguments_are_refused(astronaut: RGBImage) -> None:
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        dlib_face_chip(astronaut, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="K >= 2"):
        similarity_transform(np.zeros((1, 2)), np.zeros((1, 2)))
