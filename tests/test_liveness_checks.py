"""Liveness checks: challenge steps, identity, duplicates, parallax, passive score.

Unit tests on synthetic landmarks (a small 3D head projected at known poses) always
run; tests on real photos use the default pack's own detector, landmarks and
embedder on ../shared/data/poses (skipped when absent) and skimage's astronaut.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import skimage.data
from PIL import Image

from facesvc.domain import Decision
from facesvc.liveness.challenges import Step
from facesvc.liveness.checks import (
    FrameObservation,
    LivenessThresholds,
    apply_homography,
    check_liveness,
    face_thumbnail,
    fit_homography,
    parallax_residual,
)
from facesvc.liveness.pose import estimate_pose
from facesvc.models.packs import ModelPack
from facesvc.models.shape_predictor import ShapePredictorLandmarks
from facesvc.models.types import Box, Points, RGBImage

# A head in dlib's 5-point order (image-right eye outer, inner, image-left eye
# outer, inner, nose base); x right, y down, z away from the camera, in pixels.
# The nose base stands 27 px in front of the eye corners (0.45 eye distances).
HEAD = np.array(
    [[45.0, 0.0, 0.0], [15.0, 0.0, 0.0], [-45.0, 0.0, 0.0], [-15.0, 0.0, 0.0], [0.0, 35.0, -27.0]]
)
FLAT = HEAD * np.array([1.0, 1.0, 0.0])  # the same face printed on paper

LEFT, RIGHT, UP, CLOSER = Step.TURN_LEFT, Step.TURN_RIGHT, Step.LOOK_UP, Step.COME_CLOSER


def project(
    head: npt.NDArray[np.float64], yaw: float = 0.0, pitch: float = 0.0, scale: float = 1.0
) -> Points:
    """Landmarks of ``head`` turned by ``yaw`` (nose to image right > 0) and ``pitch``
    (chin up > 0) degrees, seen orthographically at ``scale`` around (320, 240)."""
    a, b = math.radians(yaw), math.radians(pitch)
    x = head[:, 0] * math.cos(a) - head[:, 2] * math.sin(a)
    z = head[:, 0] * math.sin(a) + head[:, 2] * math.cos(a)
    y = head[:, 1] * math.cos(b) + z * math.sin(b)
    return np.stack([320 + scale * x, 240 + scale * y], axis=1).astype(np.float32)


def box_of(points: Points) -> Box:
    lo, hi = points.min(axis=0), points.max(axis=0)
    return Box(float(lo[0]) - 30, float(lo[1]) - 50, float(hi[0]) + 30, float(hi[1]) + 40)


PERSON_A = np.eye(128, dtype=np.float32)[0]
PERSON_B = np.eye(128, dtype=np.float32)[1]


def frame(
    points: Points,
    *,
    person: npt.NDArray[np.float32] = PERSON_A,
    score: float | None = 0.9,
    seed: int | None = None,
) -> FrameObservation:
    """An observation with its own random thumbnail (seed None = fresh randomness)."""
    rng = np.random.default_rng(seed)
    return FrameObservation(
        landmarks=points,
        box=box_of(points),
        descriptor=person,
        live_score=score,
        thumbnail=rng.integers(0, 256, (32, 32), dtype=np.uint8),
    )


THRESHOLDS = LivenessThresholds(max_identity_distance=0.3, passive_threshold=0.5)


# ---------------------------------------------------------------- synthetic landmarks


def test_steps_answered_in_order_pass() -> None:
    frames = [frame(project(HEAD)), frame(project(HEAD, yaw=40)), frame(project(HEAD, yaw=-40))]
    result = check_liveness([LEFT, RIGHT], frames, THRESHOLDS)
    assert result.passed, result.reason
    assert result.step_frames == (1, 2)
    assert result.parallax is not None and result.parallax >= THRESHOLDS.min_parallax


def test_steps_in_wrong_order_fail() -> None:
    frames = [frame(project(HEAD)), frame(project(HEAD, yaw=-40)), frame(project(HEAD, yaw=40))]
    result = check_liveness([LEFT, RIGHT], frames, THRESHOLDS)
    assert result.decision is Decision.CHALLENGE_FAILED
    assert "turn your head to your right" in result.reason


def test_missing_step_names_it() -> None:
    frames = [frame(project(HEAD)), frame(project(HEAD, yaw=40)), frame(project(HEAD, yaw=5))]
    result = check_liveness([LEFT, UP], frames, THRESHOLDS)
    assert result.decision is Decision.CHALLENGE_FAILED
    assert "look up" in result.reason


def test_static_photo_repeated_fails_challenge() -> None:
    still = frame(project(HEAD), seed=1)
    result = check_liveness([LEFT, RIGHT], [still] * 4, THRESHOLDS)
    assert result.decision is Decision.CHALLENGE_FAILED


def test_turned_print_shows_no_turn() -> None:
    # A flat picture turned 40 degrees: the nose stays between the eyes.
    frames = [frame(project(FLAT)), frame(project(FLAT, yaw=40)), frame(project(FLAT, yaw=-40))]
    assert check_liveness([LEFT, RIGHT], frames, THRESHOLDS).decision is Decision.CHALLENGE_FAILED


def test_flat_motion_that_passes_a_lax_turn_threshold_is_spoof() -> None:
    # With the pose threshold off, the parallax check alone must catch the print.
    lax = LivenessThresholds(
        max_identity_distance=0.3, passive_threshold=0.5, turn_min_yaw_deg=-90.0
    )
    frames = [frame(project(FLAT)), frame(project(FLAT, yaw=40)), frame(project(FLAT, yaw=-40))]
    result = check_liveness([LEFT, RIGHT], frames, lax)
    assert result.decision is Decision.SPOOF_SUSPECTED
    assert result.parallax is not None and result.parallax < lax.min_parallax


def test_68_points_decide_parallax_when_every_frame_has_them() -> None:
    # 5 points of a turning head, but 68 points that one homography maps between
    # frames (a flat picture): the 68 points win, and show no depth.
    rng = np.random.default_rng(7)
    flat_68 = rng.uniform(200, 440, (68, 2))
    warps = [np.eye(3), np.array([[0.8, 0.05, 60], [0.0, 1.0, 0], [4e-4, 0, 1]])]
    warps.append(np.array([[0.8, -0.05, 10], [0.0, 1.0, 5], [-4e-4, 0, 1]]))
    heads = [project(HEAD), project(HEAD, yaw=40), project(HEAD, yaw=-40)]
    frames = [
        replace(frame(p), landmarks_68=apply_homography(h, flat_68).astype(np.float32))
        for p, h in zip(heads, warps, strict=True)
    ]
    result = check_liveness([LEFT, RIGHT], frames, THRESHOLDS)
    assert result.decision is Decision.SPOOF_SUSPECTED
    assert result.parallax is not None and result.parallax < 1e-6
    # With 68 points missing on one frame the 5 points are used throughout.
    frames[2] = replace(frames[2], landmarks_68=None)
    assert check_liveness([LEFT, RIGHT], frames, THRESHOLDS).passed


def test_two_people_fail_as_not_matched() -> None:
    frames = [
        frame(project(HEAD)),
        frame(project(HEAD, yaw=40), person=PERSON_B),
        frame(project(HEAD, yaw=-40)),
    ]
    result = check_liveness([LEFT, RIGHT], frames, THRESHOLDS)
    assert result.decision is Decision.NOT_MATCHED


def test_duplicate_frames_fail() -> None:
    frames = [
        frame(project(HEAD), seed=3),
        frame(project(HEAD, yaw=40)),
        frame(project(HEAD, yaw=-40)),
        frame(project(HEAD), seed=3),
    ]
    result = check_liveness([LEFT, RIGHT], frames, THRESHOLDS)
    assert result.decision is Decision.CHALLENGE_FAILED
    assert "identical" in result.reason


def test_low_passive_score_is_spoof() -> None:
    frames = [frame(project(HEAD), score=0.2), frame(project(HEAD, yaw=40), score=0.3)]
    result = check_liveness([LEFT], frames, THRESHOLDS)
    assert result.decision is Decision.SPOOF_SUSPECTED
    assert result.passive_score == pytest.approx(0.25)


def test_passive_only_policy_skips_the_challenge() -> None:
    result = check_liveness([], [frame(project(HEAD, yaw=40))], THRESHOLDS)
    assert result.passed
    assert result.parallax is None


def test_mirrored_frames_swap_left_and_right() -> None:
    frames = [frame(project(HEAD)), frame(project(HEAD, yaw=-40))]
    mirrored = LivenessThresholds(
        max_identity_distance=0.3, passive_threshold=0.5, frames_mirrored=True
    )
    assert check_liveness([LEFT], frames, mirrored).passed
    assert not check_liveness([LEFT], frames, THRESHOLDS).passed


def test_look_up_and_come_closer() -> None:
    frames = [
        frame(project(HEAD)),
        frame(project(HEAD, yaw=40)),
        frame(project(HEAD, pitch=25)),
        frame(project(HEAD, scale=1.4)),
    ]
    assert check_liveness([LEFT, UP, CLOSER], frames, THRESHOLDS).passed
    # A turn alone neither looks up nor comes closer.
    turned = [frame(project(HEAD)), frame(project(HEAD, yaw=40))]
    assert not check_liveness([LEFT, UP], turned, THRESHOLDS).passed
    assert not check_liveness([LEFT, CLOSER], turned, THRESHOLDS).passed


def test_first_frame_must_be_frontal() -> None:
    frames = [frame(project(HEAD, yaw=-35)), frame(project(HEAD, yaw=40))]
    result = check_liveness([LEFT], frames, THRESHOLDS)
    assert result.decision is Decision.CHALLENGE_FAILED
    assert "straight at the camera" in result.reason


def test_pose_signs() -> None:
    frontal = estimate_pose(project(HEAD))
    assert abs(frontal.yaw_deg) < 1.0
    assert estimate_pose(project(HEAD, yaw=30)).yaw_deg > 20.0
    assert estimate_pose(project(HEAD, pitch=20)).nose_drop < frontal.nose_drop
    assert estimate_pose(project(HEAD, scale=1.5)).face_scale_px == pytest.approx(
        1.5 * frontal.face_scale_px
    )


def test_homography_fit_recovers_a_known_warp() -> None:
    h = np.array([[1.1, 0.2, 30.0], [-0.1, 0.9, 12.0], [4e-4, -2e-4, 1.0]])
    src = np.random.default_rng(0).uniform(0, 400, (12, 2))
    fitted = fit_homography(src, apply_homography(h, src))
    np.testing.assert_allclose(fitted, h, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- real photos


def _load(path: Path) -> RGBImage:
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB")))


def _plane_warp(image: RGBImage, yaw: float, pitch: float) -> RGBImage:
    """``image`` as a flat print turned by ``yaw`` and tilted by ``pitch`` degrees,
    seen by a pinhole camera (focal 1.2 x width) from the front."""
    h, w = image.shape[:2]
    f = 1.2 * w
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    a, b = math.radians(yaw), math.radians(pitch)
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    plane = np.c_[corners - [w / 2, h / 2], np.zeros(4)] @ (ry @ rx).T + [0, 0, f]
    seen = plane[:, :2] * f / plane[:, 2:3] + [w / 2, h / 2]
    inverse = np.linalg.inv(fit_homography(corners, seen))
    inverse /= inverse[2, 2]
    coeffs = tuple(float(c) for c in inverse.ravel()[:8])
    warped = Image.fromarray(image).transform(
        (w, h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC
    )
    return np.asarray(warped)


def _min_parallax(num_points: int) -> float:
    return THRESHOLDS.min_parallax_68 if num_points == 68 else THRESHOLDS.min_parallax


@pytest.fixture(scope="module")
def landmarks_68() -> ShapePredictorLandmarks:
    import importlib.resources

    models = importlib.resources.files("face_recognition_models") / "models"
    return ShapePredictorLandmarks.load(Path(str(models / "shape_predictor_68_face_landmarks.dat")))


class Observer:
    """The default pack's detector, 5-point landmarks and embedder on one image."""

    def __init__(self, pack: ModelPack) -> None:
        self.pack = pack

    def box(self, image: RGBImage) -> Box:
        detections = self.pack.detector.detect(image, 60)
        assert detections, "no face found"
        return detections[0].box

    def observe(self, image: RGBImage, score: float = 0.9) -> FrameObservation:
        box = self.box(image)
        assert self.pack.landmarks is not None
        points = self.pack.landmarks.predict(image, box)
        chip = self.pack.embedder.align(image, points)
        descriptor = self.pack.embedder.embed(chip[None])[0]
        return FrameObservation(points, box, descriptor, score, face_thumbnail(image, box))


@pytest.fixture(scope="module")
def observer(model_pack: ModelPack) -> Observer:
    return Observer(model_pack)


def _pack_thresholds(pack: ModelPack) -> LivenessThresholds:
    if pack.threshold is None or pack.calibration is None:
        pytest.skip("the default pack has no calibrated threshold")
    centre = pack.calibration.centre
    return LivenessThresholds(
        max_identity_distance=pack.threshold,
        passive_threshold=0.0,
        identity_metric=pack.distance,
        identity_centre=None if centre is None else np.asarray(centre, dtype=np.float32),
    )


@pytest.mark.slow
def test_planar_warp_of_a_photo_shows_no_parallax(
    observer: Observer, landmarks_68: ShapePredictorLandmarks
) -> None:
    face = np.ascontiguousarray(skimage.data.astronaut())
    assert observer.pack.landmarks is not None
    for yaw, pitch in [(30.0, 0.0), (-30.0, 0.0), (0.0, 25.0), (20.0, -15.0)]:
        warped = _plane_warp(face, yaw, pitch)
        for model in (observer.pack.landmarks, landmarks_68):
            before = model.predict(face, observer.box(face))
            after = model.predict(warped, observer.box(warped))
            residual = parallax_residual(before, after)
            assert residual < _min_parallax(model.num_points), (yaw, pitch, model.num_points)


POSES_A = "poses/freefield_subject__A_gray_5dir_targets"


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_turning_head_shows_parallax(
    shared_data: Path, observer: Observer, landmarks_68: ShapePredictorLandmarks
) -> None:
    # image1/6: frontal; image0/5: nose to image right; image2/7: nose to image left.
    folder = shared_data / POSES_A
    assert observer.pack.landmarks is not None
    for model in (observer.pack.landmarks, landmarks_68):
        for frontal, turned in [("image1", "image0"), ("image6", "image2"), ("image1", "image7")]:
            a, b = _load(folder / f"{frontal}.jpg"), _load(folder / f"{turned}.jpg")
            residual = parallax_residual(
                model.predict(a, observer.box(a)), model.predict(b, observer.box(b))
            )
            assert residual > _min_parallax(model.num_points), (frontal, turned, model.num_points)


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_photos_challenge(shared_data: Path, observer: Observer) -> None:
    folder = shared_data / POSES_A
    frontal, nose_right, nose_left = (
        observer.observe(_load(folder / f"{name}.jpg")) for name in ("image1", "image0", "image2")
    )
    thresholds = _pack_thresholds(observer.pack)
    # Unmirrored: the nose toward image right is the participant's own left.
    frames = [frontal, nose_right, nose_left]
    answered = check_liveness([LEFT, RIGHT], frames, thresholds)
    assert answered.passed, answered.reason
    assert answered.parallax is not None and answered.parallax > thresholds.min_parallax

    wrong_order = check_liveness([RIGHT, LEFT], frames, thresholds)
    assert wrong_order.decision is Decision.CHALLENGE_FAILED

    still = check_liveness([LEFT, RIGHT], [frontal] * 3, thresholds)
    assert still.decision is Decision.CHALLENGE_FAILED

    # The same turns, but the frontal frame is another man (farhanrbnn's frontal photo).
    other = observer.observe(_load(shared_data / "poses/farhanrbnn__frontal_and_two_turns/1.jpg"))
    mixed = check_liveness([LEFT, RIGHT], [other, nose_right, nose_left], thresholds)
    assert mixed.decision is Decision.NOT_MATCHED
