"""Our landmarks, face chips and whole scans against dlib's own on the same face, side by side.

Run: ``pytest benchmarks/test_bench_vs_dlib.py --benchmark-only --benchmark-timer
time.process_time`` (CPU time: on a shared machine wall time measures the neighbours).
Each benchmark group holds the implementations of one stage, so pytest-benchmark prints
their times next to each other and the ratio is read off one run on one machine at one
moment. Both produce
the same points and pixels (tests/test_shape_predictor.py, tests/test_alignment.py); each
case asserts it on this face too. The frame is a 640x480 webcam-sized picture of a real
face (skimage's astronaut) at two face sizes: ~110 px, and ~220 px where the chip needs
dlib's pyramid_down first (faces wider than the chip).

The "scan" group times one whole scan of a 640x480 JPEG on one thread: ours (decode, detect,
choose, landmarks, align, quality, embed, match) at the default ``QualitySettings`` and with
faces looked for from 140 px (the pyramid entered three levels down), against the
``face_recognition`` library's (HOG detector upsampled once, 5-point landmarks, ResNet:
its defaults), the baseline of issue 3's "5 times the throughput" target.
"""

from __future__ import annotations

import importlib.resources
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image
from pytest_benchmark.fixture import BenchmarkFixture

from facesvc.config import QualitySettings
from facesvc.imaging import DecodeLimits, decode_image
from facesvc.models.alignment import dlib_face_chip
from facesvc.models.dlib.pack import load_dlib_pack
from facesvc.models.dlib.shape_predictor import ShapePredictorLandmarks
from facesvc.models.pack import ModelPack, PackContext
from facesvc.models.pipeline import FacePipeline
from facesvc.models.types import Box, RGBImage

dlib = pytest.importorskip("dlib")

MODELS = Path(str(importlib.resources.files("face_recognition_models") / "models"))
LANDMARKS_5 = MODELS / "shape_predictor_5_face_landmarks.dat"
# The astronaut photo (512x512) scaled so that her face is about this tall, cut to 640x480.
FACE_PX = (110, 220)
_ASTRONAUT_FACE_PX = 95  # dlib's HOG box for her face in the original photo


def _frame(face_px: int) -> RGBImage:
    side = round(512 * face_px / _ASTRONAUT_FACE_PX)
    astronaut = skimage.data.astronaut()  # type: ignore[no-untyped-call]
    image = Image.fromarray(astronaut).resize((side, side), Image.Resampling.BILINEAR)
    canvas = np.zeros((480, 640, 3), dtype=np.uint8)
    crop = np.asarray(image)[:480, :640]
    canvas[: crop.shape[0], : crop.shape[1]] = crop
    return canvas


@pytest.fixture(scope="module")
def predictors() -> tuple[ShapePredictorLandmarks, Any]:
    return ShapePredictorLandmarks.load(LANDMARKS_5), dlib.shape_predictor(str(LANDMARKS_5))


@pytest.fixture(scope="module", params=FACE_PX, ids=lambda px: f"face{px}px")
def face(request: pytest.FixtureRequest) -> tuple[RGBImage, Any]:
    """A frame and dlib's HOG rectangle for the face in it."""
    frame = _frame(request.param)
    (rect,) = dlib.get_frontal_face_detector()(frame, 0)
    return frame, rect


@pytest.mark.benchmark(group="landmarks-5")
@pytest.mark.parametrize("implementation", ["facesvc", "dlib"])
def test_landmarks_side_by_side(
    benchmark: BenchmarkFixture,
    predictors: tuple[ShapePredictorLandmarks, Any],
    face: tuple[RGBImage, Any],
    implementation: str,
) -> None:
    ours, theirs = predictors
    frame, rect = face
    box = Box(rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)
    expected = np.array([[p.x, p.y] for p in theirs(frame, rect).parts()], dtype=np.float32)
    calls: dict[str, Callable[[], Any]] = {
        "facesvc": lambda: ours.predict(frame, box),
        "dlib": lambda: theirs(frame, rect),
    }
    benchmark.extra_info.update(face_px=rect.height())
    benchmark(calls[implementation])
    np.testing.assert_array_equal(ours.predict(frame, box), expected)


@pytest.mark.benchmark(group="chip-150")
@pytest.mark.parametrize("implementation", ["facesvc", "dlib"])
def test_chip_side_by_side(
    benchmark: BenchmarkFixture,
    predictors: tuple[ShapePredictorLandmarks, Any],
    face: tuple[RGBImage, Any],
    implementation: str,
) -> None:
    _, theirs = predictors
    frame, rect = face
    shape = theirs(frame, rect)
    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
    calls: dict[str, Callable[[], Any]] = {
        "facesvc": lambda: dlib_face_chip(frame, points),
        "dlib": lambda: dlib.get_face_chip(frame, shape, 150, 0.25),
    }
    benchmark.extra_info.update(face_px=rect.height())
    benchmark(calls[implementation])
    np.testing.assert_array_equal(
        dlib_face_chip(frame, points), dlib.get_face_chip(frame, shape, 150, 0.25)
    )


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> ModelPack:
    context = PackContext(
        cache_dir=Path(tmp_path_factory.mktemp("models")),
        threads=1,
        calibration_override=None,
        logger=logging.getLogger(__name__),
    )
    return load_dlib_pack(context)


@pytest.mark.benchmark(group="scan-640x480")
@pytest.mark.parametrize("implementation", ["facesvc", "facesvc-detect140", "face_recognition"])
def test_scan_side_by_side(
    benchmark: BenchmarkFixture, pack: ModelPack, implementation: str
) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_frame(165)).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    limits = QualitySettings(min_face_px=140, min_detect_px=140)
    pipeline = FacePipeline(
        pack.detector,
        pack.landmarks,
        pack.embedder,
        limits if implementation == "facesvc-detect140" else QualitySettings(),
    )
    template = pipeline.embed([_analysed_chip(pipeline, jpeg)])

    def ours() -> float:
        descriptor = pipeline.embed([_analysed_chip(pipeline, jpeg)])
        return pack.match(template, descriptor).distance

    def theirs() -> float:
        face_recognition = pytest.importorskip("face_recognition")
        image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        (encoding,) = face_recognition.face_encodings(image, model="small")
        return float(face_recognition.face_distance([encoding], encoding)[0])

    benchmark.extra_info.update(threads=1, face_px=165)
    distance = benchmark(theirs if implementation == "face_recognition" else ours)
    assert distance < 1e-3  # the same photo matches itself


def _analysed_chip(pipeline: FacePipeline, jpeg: bytes) -> RGBImage:
    analysis = pipeline.analyze(decode_image(jpeg, DecodeLimits()))
    assert analysis.chip is not None, analysis.reason
    return analysis.chip
