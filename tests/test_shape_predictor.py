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


def _border_boxes(image: RGBImage) -> list[Box]:
    """Faces-sized boxes across each edge and corner of ``image``, some half outside."""
    h, w = image.shape[:2]
    s = min(h, w) / 3
    return [
        Box(-s / 2, h / 3, s / 2, h / 3 + s),  # left edge
        Box(w - s / 2, h / 3, w + s / 2, h / 3 + s),  # right edge
        Box(w / 3, -s / 2, w / 3 + s, s / 2),  # top edge
        Box(w / 3, h - s / 2, w / 3 + s, h + s / 2),  # bottom edge
        Box(-s / 3, -s / 3, 2 * s / 3, 2 * s / 3),  # top-left corner
        Box(w - 2 * s / 3, h - 2 * s / 3, w + s / 3, h + s / 3),  # bottom-right corner
        Box(w - s + 0.5, h - s + 0.49, w, h),  # flush with the far edges, half pixels
    ]


def test_many_faces_at_once_equal_one_by_one_and_dlib(
    models: tuple[ShapePredictorLandmarks, Any], hog: Any
) -> None:
    """predict_many on the faces of several images of different sizes in one call gives
    every face exactly the points predict gives it alone, and dlib's for dlib's boxes."""
    ours, theirs = models
    images: list[RGBImage] = []
    boxes: list[Box] = []
    expected: dict[int, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for _, image in _bundled_images():
        upsample = 1 if max(image.shape[:2]) < 400 else 0
        for rect in hog(image, upsample):
            expected[len(boxes)] = np.array([(p.x, p.y) for p in theirs(image, rect).parts()])
            box = Box(rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)
            # dlib's box, then the same face in a box moved and scaled by a few pixels.
            shift = rng.uniform(-4, 4, size=4)
            moved = Box(*(np.array([box.left, box.top, box.right, box.bottom]) + shift))
            images += [image, image]
            boxes += [box, moved]
        for box in _border_boxes(image):
            images.append(image)
            boxes.append(box)
    assert len(expected) >= 8 and len(boxes) >= 40
    one_by_one = np.stack([ours.predict(im, b) for im, b in zip(images, boxes, strict=True)])
    together = ours.predict_many(images, boxes)
    assert together.shape == (len(boxes), ours.num_points, 2) and together.dtype == np.float32
    assert np.array_equal(together, one_by_one)
    for i, points in expected.items():
        assert np.abs(together[i] - points).max() <= TOLERANCE_PX
    # Any subset, in any order, gives the same points: a face's result is its own.
    order = rng.permutation(len(boxes))[:5]
    some = ours.predict_many([images[i] for i in order], [boxes[i] for i in order])
    assert np.array_equal(some, one_by_one[order])


def test_walked_trees_equal_the_leaf_table(
    models: tuple[ShapePredictorLandmarks, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trees too deep for a leaf table are walked split by split, to the same leaves."""
    ours, _ = models
    data = pytest.importorskip("skimage.data")
    image = np.ascontiguousarray(data.astronaut(), dtype=np.uint8)
    boxes = [Box(176, 77, 266, 167), *_border_boxes(image)]
    tabled = ours.predict_many([image] * len(boxes), boxes)
    monkeypatch.setattr(ours, "_leaf_tables", {})
    assert np.array_equal(ours.predict_many([image] * len(boxes), boxes), tabled)


def test_predict_many_of_none_and_mismatched_lengths(
    models: tuple[ShapePredictorLandmarks, Any],
) -> None:
    ours, _ = models
    assert ours.predict_many([], []).shape == (0, ours.num_points, 2)
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="1 images but 2 boxes"):
        ours.predict_many([image], [Box(0, 0, 5, 5)] * 2)
    with pytest.raises(ValueError, match="uint8"):
        ours.predict_many([image, image[..., 0]], [Box(0, 0, 5, 5)] * 2)


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
