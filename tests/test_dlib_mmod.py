"""The MMOD detector on ONNX Runtime against dlib itself (dlib-bin, test-only).

At full resolution (dlib's ``detector(image, 0)``) the boxes must be dlib's, pixel for pixel,
and the scores within 1e-3 (float32 convolutions summed in another order differ by about
1e-6). The pyramid's resampling is checked bit for bit against ``dlib.resize_image``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from facesvc.imaging import DecodeLimits, decode_image
from facesvc.models.dlib.mmod import (
    MMODFaceDetector,
    _ResizePlan,
    mmod_dat_path,
    non_max_suppression,
    pyramid_level_sizes,
    tile_pyramid,
)
from facesvc.models.model_cache import ModelCache
from facesvc.models.types import Box, Detection, RGBImage

dlib = pytest.importorskip("dlib")

SCORE_TOLERANCE = 1e-3
# Boxes come from integer rounding of dlib's double arithmetic; a float32 score that lands on
# the other side of a rounding edge could move a box by one pixel. None has so far.
BOX_TOLERANCE_PX = 1.0

# A few photos from each shared-data kind: webcam frames (live and printed-photo attacks) and
# press photos with EXIF orientation. dlib's own detector takes seconds per image here.
SHARED_PHOTOS = (
    "pad/live/0001_00_00_02_496.jpg",
    "pad/live/0007_01_05_03_498.jpg",
    "pad/spoof/0002_01_02_02_280.jpg",
    "faces/nuaa__client0004/0004_01_00_02_116.jpg",
    "faces/face_recognition__alex_lacamoire/alex-lacamoire.png",
)


def _insightface_image(name: str) -> RGBImage:
    insightface = pytest.importorskip("insightface")
    path = Path(insightface.__file__).parent / "data" / "images" / name
    if not path.is_file():
        pytest.skip(f"{path} not shipped by this insightface wheel")
    return decode_image(path.read_bytes(), DecodeLimits())


def _astronaut() -> RGBImage:
    data = pytest.importorskip("skimage.data")
    image: RGBImage = np.ascontiguousarray(data.astronaut(), dtype=np.uint8)
    return image


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> MMODFaceDetector:
    return MMODFaceDetector.load(ModelCache(tmp_path_factory.mktemp("models")), threads=2)


@pytest.fixture(scope="module")
def dlib_detector() -> Any:
    return dlib.cnn_face_detection_model_v1(str(mmod_dat_path()))


def _dlib_detections(dlib_detector: Any, image: RGBImage) -> list[Detection]:
    """dlib's detections as ``Detection``s (inclusive right/bottom + 1)."""
    return [
        Detection(
            Box(d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1),
            d.confidence,
        )
        for d in dlib_detector(image, 0)
    ]


def _assert_same_as_dlib(ours: list[Detection], theirs: list[Detection]) -> None:
    assert len(ours) == len(theirs), (ours, theirs)
    unmatched = list(ours)
    for want in theirs:
        got = max(unmatched, key=lambda d: d.box.iou(want.box))
        unmatched.remove(got)
        edges = np.array([got.box.left, got.box.top, got.box.right, got.box.bottom])
        expected = np.array([want.box.left, want.box.top, want.box.right, want.box.bottom])
        assert np.abs(edges - expected).max() <= BOX_TOLERANCE_PX, (got, want)
        assert abs(got.score - want.score) <= SCORE_TOLERANCE, (got, want)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["astronaut", "t1.jpg", "Tom_Hanks_54745.png"])
def test_full_resolution_matches_dlib(
    detector: MMODFaceDetector, dlib_detector: Any, name: str
) -> None:
    image = _astronaut() if name == "astronaut" else _insightface_image(name)
    theirs = _dlib_detections(dlib_detector, image)
    assert theirs, f"dlib finds no face in {name}: the comparison would prove nothing"
    _assert_same_as_dlib(detector.detect_full_resolution(image), theirs)


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("relative", SHARED_PHOTOS)
def test_full_resolution_matches_dlib_on_shared_photos(
    detector: MMODFaceDetector, dlib_detector: Any, shared_data: Path, relative: str
) -> None:
    path = shared_data / relative
    if not path.is_file():
        pytest.skip(f"{relative} not in this copy of the shared data")
    image = decode_image(path.read_bytes(), DecodeLimits())
    _assert_same_as_dlib(
        detector.detect_full_resolution(image), _dlib_detections(dlib_detector, image)
    )


def test_min_face_at_the_window_size_keeps_every_face(detector: MMODFaceDetector) -> None:
    # t1.jpg: six people in a row, boxes 96-137 px tall. Below 96 px the top level stays,
    # only levels shorter than the window go, and the levels are resampled by ONNX Runtime
    # (within 3e-4 of dlib's values): the full-resolution boxes and scores.
    image = _insightface_image("t1.jpg")
    faces = detector.detect(image, min_face_px=90)
    assert len(faces) == 6
    _assert_same_as_dlib(faces, detector.detect_full_resolution(image))


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_image_has_no_face(detector: MMODFaceDetector, value: int) -> None:
    image = np.full((480, 640, 3), value, dtype=np.uint8)
    assert detector.detect_full_resolution(image) == []
    assert detector.detect(image, min_face_px=100) == []


@pytest.mark.parametrize("side", [1, 6, 7, 12])
def test_tiny_image_has_no_face(detector: MMODFaceDetector, side: int) -> None:
    # dlib's own convolutions fail below 7x7 px (the canvas adds 2 x 11 px); here: no face.
    image = np.full((side, side, 3), 120, dtype=np.uint8)
    assert detector.detect_full_resolution(image) == []
    assert detector.detect(image, min_face_px=60) == []
    assert detector.detect(image, min_face_px=100) == []


@pytest.mark.parametrize("min_face_px", [60, 100, 110])
def test_min_face_scaling_finds_the_astronaut(detector: MMODFaceDetector, min_face_px: int) -> None:
    # dlib's box for her face is 96 px: at 100 and 110 the image is shrunk by one pyramid
    # level (5/6), at 60 enlarged by two.
    image = _astronaut()
    (full,) = detector.detect_full_resolution(image)
    (scaled,) = detector.detect(image, min_face_px=min_face_px)
    assert scaled.box.iou(full.box) >= 0.8


def test_faces_smaller_than_min_face_are_not_reported(detector: MMODFaceDetector) -> None:
    # The faces of t1.jpg are 96-137 px tall: asking for 300 px leaves none.
    image = _insightface_image("t1.jpg")
    assert detector.detect(image, min_face_px=300) == []


def test_concurrent_calls_give_the_sequential_answer(detector: MMODFaceDetector) -> None:
    image = _insightface_image("Tom_Hanks_54745.png")
    expected = detector.detect_full_resolution(image)
    results: list[list[Detection]] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(3):
            found = detector.detect_full_resolution(image)
            with lock:
                results.append(found)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 9


def test_rejects_what_is_not_an_rgb_image(detector: MMODFaceDetector) -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(np.zeros((100, 100), dtype=np.uint8), min_face_px=80)
    with pytest.raises(ValueError, match="min_face_px"):
        detector.detect(np.zeros((100, 100, 3), dtype=np.uint8), min_face_px=0)


@pytest.mark.parametrize(
    ("src", "dst"),
    [((480, 640), (400, 533)), ((37, 53), (30, 44)), ((6, 7), (5, 5)), ((96, 128), (160, 200))],
)
def test_pyramid_resampling_is_bit_exact_with_dlib(
    src: tuple[int, int], dst: tuple[int, int]
) -> None:
    rng = np.random.default_rng(7)
    plane: npt.NDArray[np.float32] = rng.random(src, dtype=np.float32) - np.float32(0.5)
    out = np.zeros((1, *dst), dtype=np.float32)
    _ResizePlan.create(*src, *dst).apply(plane[None], out)
    np.testing.assert_array_equal(out[0], dlib.resize_image(plane, *dst))


@pytest.mark.parametrize("size", [(480, 640), (512, 512), (886, 1280), (112, 112), (640, 96)])
def test_pyramid_levels_tile_without_overlap(size: tuple[int, int]) -> None:
    sizes = pyramid_level_sizes(*size, min_rows=5)
    layout = tile_pyramid(sizes)
    rects = layout.rects
    assert rects.shape[0] >= 1
    heights = rects[:, 3] - rects[:, 1] + 1
    widths = rects[:, 2] - rects[:, 0] + 1
    assert [(int(h), int(w)) for h, w in zip(heights, widths, strict=True)] == sizes[: len(rects)]
    assert rects[:, :2].min() >= 11
    assert rects[:, 2].max() <= layout.cols - 12 and rects[:, 3].max() <= layout.rows - 12
    for i in range(len(rects)):
        for j in range(i + 1, len(rects)):
            a, b = rects[i], rects[j]
            apart = a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
            assert apart, (i, j, a, b)


def test_nms_uses_dlibs_overlap_rule() -> None:
    # dlib's test_box_overlap: intersection over the *bounding box* of the pair, or the
    # fraction of either box covered; the file's thresholds are IoU 0.338 and covered 1.0.
    best = [100, 100, 199, 199]
    shifted = [140, 100, 239, 199]  # intersection 60x100 over bounding box 140x100: 0.43
    apart = [300, 300, 399, 399]
    inside = [120, 120, 149, 149]  # fully covered (1.0 is not above 1.0), IoU 0.09: kept
    rects = np.array([best, shifted, apart, inside], dtype=np.int64)
    assert non_max_suppression(rects, 0.338, 1.0) == [0, 2, 3]
    assert non_max_suppression(rects, 0.338, 0.99) == [0, 2]


def test_large_photo_is_shrunk_before_the_float_work(detector: MMODFaceDetector) -> None:
    # t1.jpg enlarged 3x (3840x2658, faces 288-411 px): at min_face_px 300 the entry level is
    # 7 (scale 0.28), reached by averaging 3x3 blocks first. Every face is still found, each
    # box on one of the (scaled) full-resolution boxes.
    image = _insightface_image("t1.jpg")
    rows, cols = image.shape[:2]
    big = np.asarray(Image.fromarray(image).resize((3 * cols, 3 * rows), Image.Resampling.BILINEAR))
    expected = [
        Box(3 * f.box.left, 3 * f.box.top, 3 * f.box.right, 3 * f.box.bottom)
        for f in detector.detect(image, min_face_px=90)
    ]
    found = detector.detect(big, min_face_px=300)
    assert len(found) == len(expected) == 6
    for face in found:
        assert max(face.box.iou(box) for box in expected) >= 0.5
