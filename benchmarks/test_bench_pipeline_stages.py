"""Time of the per-frame stages around the models: decode, landmarks, align, match.

Run: ``pytest benchmarks/test_bench_pipeline_stages.py --benchmark-only``. The frame is a
640x480 JPEG (quality 90) of a real face (skimage's astronaut, face about 105 px); the face
box is the one dlib's detector gives for it, so detection is not timed here
(benchmarks/test_bench_detect.py times it).
"""

from __future__ import annotations

import importlib.resources
import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from pytest_benchmark.fixture import BenchmarkFixture

from facesvc.imaging import DecodeLimits, decode_image
from facesvc.models.alignment import ARCFACE_TEMPLATE_112, dlib_face_chip, warp_to_template
from facesvc.models.dlib.shape_predictor import ShapePredictorLandmarks
from facesvc.models.matching import DEFAULT_RULES, match
from facesvc.models.types import Box, RGBImage

MODELS = Path(str(importlib.resources.files("face_recognition_models") / "models"))
# dlib's HOG box for the astronaut's face in the 640x480 frame below.
FACE_BOX = Box(227.0, 65.0, 331.0, 170.0)


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    frame = Image.fromarray(skimage.data.astronaut()).resize((640, 480), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    frame.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def frame(jpeg: bytes) -> RGBImage:
    return decode_image(jpeg, DecodeLimits())


@pytest.fixture(scope="module", params=["5", "68"])
def predictor(request: pytest.FixtureRequest) -> ShapePredictorLandmarks:
    return ShapePredictorLandmarks.load(
        MODELS / f"shape_predictor_{request.param}_face_landmarks.dat"
    )


def test_decode_640x480_jpeg(benchmark: BenchmarkFixture, jpeg: bytes) -> None:
    image = benchmark(decode_image, jpeg, DecodeLimits())
    assert image.shape == (480, 640, 3)


def test_landmarks(
    benchmark: BenchmarkFixture, predictor: ShapePredictorLandmarks, frame: RGBImage
) -> None:
    benchmark.extra_info["points"] = predictor.num_points
    points = benchmark(predictor.predict, frame, FACE_BOX)
    assert points.shape == (predictor.num_points, 2)


def test_align_dlib_chip(benchmark: BenchmarkFixture, frame: RGBImage) -> None:
    five = ShapePredictorLandmarks.load(MODELS / "shape_predictor_5_face_landmarks.dat")
    points = five.predict(frame, FACE_BOX)
    chip = benchmark(dlib_face_chip, frame, points)
    assert chip.shape == (150, 150, 3)


def test_align_arcface_chip(benchmark: BenchmarkFixture, frame: RGBImage) -> None:
    """The yunet-sface pack's 112x112 chip: YuNet's five points onto ArcFace's template
    (the points are the template moved onto the face; the work does not depend on them)."""
    points = ARCFACE_TEMPLATE_112 * 0.95 + np.float32([225, 60])
    chip = benchmark(warp_to_template, frame, points, ARCFACE_TEMPLATE_112, 112)
    assert chip.shape == (112, 112, 3)


@pytest.mark.parametrize("enrolled", [1, 5])
def test_match_one_descriptor_against_a_template(
    benchmark: BenchmarkFixture, enrolled: int
) -> None:
    """Cosine distance of one 128-d scan descriptor to a template of ``enrolled`` photos."""
    rng = np.random.default_rng(0)
    template = rng.normal(size=(enrolled, 128)).astype(np.float32)
    probe = rng.normal(size=(1, 128)).astype(np.float32)
    score = benchmark(match, template, probe, DEFAULT_RULES)
    assert 0.0 <= score.distance <= 2.0
