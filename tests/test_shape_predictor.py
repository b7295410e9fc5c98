"""The numpy shape predictor gives dlib's own landmarks (5- and 68-point models) on real
faces, given dlib's detector boxes, and refuses files that are not shape predictors."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from facesvc.imaging import DecodeLimits, decode_image
from facesvc.models.dlib.format import DlibFormatError
from facesvc.models.dlib.shape_predictor import ShapePredictorLandmarks
from facesvc.models.model_cache import ModelCache
from facesvc.models.types import Box, RGBImage

dlib = pytest.importorskip("dlib")

MODELS = Path(str(importlib.resources.files("face_recognition_models") / "models"))
MODEL_FILES = ("shape_predictor_5_face_landmarks.dat", "shape_predictor_68_face_landmarks.dat")
TOLERANCE_PX = 1e-3
# Every how-many-th photo of shared-data faces/ (sorted) to use: dlib's HOG detector and its
# predictor take a while per photo on a shared machine.
SHARED_STRIDE = 6


def _bundled_images() -> Iterator[tuple[str, RGBImage]]:
    data = pytest.importorskip("skimage.data")
    yield "astronaut", np.ascontiguousarray(data.astronaut(), dtype=np.uint8)
    insightface = pytest.importorskip("insightface")
    folder = Path(insightface.__file__).parent / "data" / "images"
    for path in sorted(folder.glob("*")):
        if path.suffix.lower() in {".jpg", ".png"}:
            yield path.name, decode_image(path.read_bytes(), DecodeLimits())


def _shared_images(shared_data: Path) -> Iterator[tuple[str, RGBImage]]:
    photos = sorted(
        p for p in (shared_data / "faces").glob("*/*") if p.suffix.lower() in {".jpg", ".png"}
    )
    for path in photos[::SHARED_STRIDE]:
        yield str(path.relative_to(shared_data)), decode_image(path.read_bytes(), DecodeLimits())


@pytest.fixture(scope="module", params=MODEL_FILES)
def models(request: pytest.FixtureRequest) -> tuple[ShapePredictorLandmarks, Any]:
    path = MODELS / request.param
    return ShapePredictorLandmarks.load(path), dlib.shape_predictor(str(path))


@pytest.fixture(scope="module")
def hog() -> Any:
    return dlib.get_frontal_face_detector()


def _compare(
    models: tuple[ShapePredictorLandmarks, Any], hog: Any, images: Iterator[tuple[str, RGBImage]]
) -> int:
    """Assert ours == dlib's on every HOG face of ``images``; returns the number of faces."""
    ours, theirs = models
    faces = 0
    for name, image in images:
        # Small, tightly cropped photos need dlib's upsampling to find their face.
        upsample = 1 if max(image.shape[:2]) < 400 else 0
        for rect in hog(image, upsample):
            expected = np.array([(p.x, p.y) for p in theirs(image, rect).parts()], dtype=float)
            box = Box(rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)
            got = ours.predict(image, box)
            assert got.shape == (ours.num_points, 2) and got.dtype == np.float32
            error = float(np.abs(got - expected).max())
            assert error <= TOLERANCE_PX, f"{name} {rect}: {error} px from dlib"
            faces += 1
    return faces


def test_landmarks_equal_dlibs_on_bundled_photos(
    models: tuple[ShapePredictorLandmarks, Any], hog: Any
) -> None:
    # astronaut: 2 faces; t1.jpg: a group photo; Tom Hanks; four masked faces.
    assert _compare(models, hog, _bundled_images()) >= 8


@pytest.mark.shared_data
def test_landmarks_equal_dlibs_on_shared_photos(
    models: tuple[ShapePredictorLandmarks, Any], hog: Any, shared_data: Path
) -> None:
    assert _compare(models, hog, _shared_images(shared_data)) >= 15


def test_faces_near_and_over_the_edge_read_zero_outside(
    models: tuple[ShapePredictorLandmarks, Any],
) -> None:
    """A box half outside the frame: out-of-image pixels read 0 in both."""
    ours, theirs = models
    data = pytest.importorskip("skimage.data")
    image = np.ascontiguousarray(data.astronaut()[60:, 200:], dtype=np.uint8)
    rect = dlib.rectangle(-30, 6, 65, 101)
    expected = np.array([(p.x, p.y) for p in theirs(image, rect).parts()], dtype=float)
    got = ours.predict(image, Box(-30, 6, 66, 102))
    assert np.abs(got - expected).max() <= TOLERANCE_PX


def test_cached_arrays_give_the_same_landmarks(tmp_path: Path) -> None:
    """load_cached parses once, stores the arrays, and reads them back on the next load."""
    cache = ModelCache(tmp_path)
    path = MODELS / MODEL_FILES[0]
    first = ShapePredictorLandmarks.load_cached(cache, path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    second = ShapePredictorLandmarks.load_cached(cache, path)
    data = pytest.importorskip("skimage.data")
    image = np.ascontiguousarray(data.astronaut(), dtype=np.uint8)
    box = Box(176, 77, 266, 167)
    expected = ShapePredictorLandmarks.load(path).predict(image, box)
    assert np.array_equal(first.predict(image, box), expected)
    assert np.array_equal(second.predict(image, box), expected)


def test_point_count_is_the_models(models: tuple[ShapePredictorLandmarks, Any]) -> None:
    ours, theirs = models
    blank = np.zeros((20, 20, 3), dtype=np.uint8)
    assert ours.num_points == theirs(blank, dlib.rectangle(2, 2, 17, 17)).num_parts in (5, 68)


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda b: b[: len(b) // 3], "truncated|chain"),
        (lambda b: b[:-1], "truncated|chain"),
        (lambda b: b"\x01\x02" + b[2:], "version 2"),
        (lambda b: b + b"\x01\x00", "unexpected values"),
        (lambda b: b"not a model at all", "version|control"),
    ],
)
def test_broken_files_are_refused(tmp_path: Path, mutate: Any, words: str) -> None:
    original = (MODELS / MODEL_FILES[0]).read_bytes()
    path = tmp_path / "broken.dat"
    path.write_bytes(mutate(original))
    with pytest.raises(DlibFormatError, match=words):
        ShapePredictorLandmarks.load(path)


def test_rejects_images_that_are_not_rgb_uint8() -> None:
    model = ShapePredictorLandmarks.load(MODELS / MODEL_FILES[0])
    with pytest.raises(ValueError, match="uint8"):
        model.predict(np.zeros((10, 10), dtype=np.uint8), Box(0, 0, 5, 5))
