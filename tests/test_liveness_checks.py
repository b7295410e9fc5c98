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
    check_liveness,
    face_thumbnail,
    fit_homography,
    parallax_residual,
)
from facesvc.liveness.geometry import depth_motion
from facesvc.liveness.pose import estimate_pose
from facesvc.models.dense_landmarks import DenseLandmarks
from facesvc.models.pack import ModelPack
from facesvc.models.types import Box, Detection, Points, RGBImage
from tests.engine_support import dense_landmarks
from tests.test_liveness_geometry import PRINT, tilted, view

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


def test_68_points_decide_when_every_frame_has_them() -> None:
    # 5 points of a turning head, but 68 points of a flat picture tilted about a vertical
    # axis: the 68 points measure the poses, and show no turn.
    flat = view(PRINT)
    heads = [project(HEAD), project(HEAD, yaw=40), project(HEAD, yaw=-40)]
    prints = [flat, tilted(flat, 40, 90), tilted(flat, -40, 90)]
    frames = [
        replace(frame(p), landmarks_68=np.asarray(q, dtype=np.float32))
        for p, q in zip(heads, prints, strict=True)
    ]
    assert check_liveness([LEFT, RIGHT], frames, THRESHOLDS).decision is Decision.CHALLENGE_FAILED
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


class Observer:
    """The default pack's detector, 5-point landmarks and embedder on one image, and the
    liveness landmark stage's 68 points."""

    def __init__(self, pack: ModelPack, dense: DenseLandmarks) -> None:
        self.pack = pack
        self.dense = dense

    def detection(self, image: RGBImage) -> Detection:
        detections = self.pack.detector.detect(image, 60)
        assert detections, "no face found"
        return detections[0]

    def five(self, image: RGBImage) -> Points:
        assert self.pack.landmarks is not None
        return self.pack.landmarks.predict(image, self.detection(image).box)

    def sixty_eight(self, image: RGBImage) -> Points:
        return self.dense.predict(image, self.detection(image), self.five(image))

    def observe(self, image: RGBImage, score: float = 0.9) -> FrameObservation:
        box = self.detection(image).box
        points = self.five(image)
        chip = self.pack.embedder.align(image, points)
        descriptor = self.pack.embedder.embed(chip[None])[0]
        return FrameObservation(
            points,
            box,
            descriptor,
            score,
            face_thumbnail(image, box),
            landmarks_68=self.sixty_eight(image),
        )


@pytest.fixture(scope="module")
def observer(model_pack: ModelPack) -> Observer:
    return Observer(model_pack, dense_landmarks())


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
def test_planar_warp_of_a_photo_shows_no_parallax(observer: Observer) -> None:
    face = np.ascontiguousarray(skimage.data.astronaut())
    for yaw, pitch in [(30.0, 0.0), (-30.0, 0.0), (0.0, 25.0), (20.0, -15.0)]:
        warped = _plane_warp(face, yaw, pitch)
        residual = parallax_residual(observer.five(face), observer.five(warped))
        assert residual < THRESHOLDS.min_parallax, (yaw, pitch)
        (motion,) = depth_motion([observer.sixty_eight(face), observer.sixty_eight(warped)])
        assert abs(motion.along) < THRESHOLDS.turn_min_parallax, (yaw, pitch, motion)
        assert abs(motion.down) < THRESHOLDS.look_min_parallax, (yaw, pitch, motion)


POSES_A = "poses/freefield_subject__A_gray_5dir_targets"


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_turning_head_shows_parallax(shared_data: Path, observer: Observer) -> None:
    # image1/6: frontal; image0/5: nose to image right; image2/7: nose to image left.
    folder = shared_data / POSES_A
    for frontal, turned, sign in [("image1", "image0", 1), ("image6", "image2", -1)]:
        a, b = _load(folder / f"{frontal}.jpg"), _load(folder / f"{turned}.jpg")
        assert parallax_residual(observer.five(a), observer.five(b)) > THRESHOLDS.min_parallax
        (motion,) = depth_motion([observer.sixty_eight(a), observer.sixty_eight(b)])
        assert sign * motion.along > THRESHOLDS.turn_min_parallax, (frontal, turned, motion)


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
    assert answered.parallax is not None and answered.parallax > thresholds.turn_min_parallax

    wrong_order = check_liveness([RIGHT, LEFT], frames, thresholds)
    assert wrong_order.decision is Decision.CHALLENGE_FAILED

    still = check_liveness([LEFT, RIGHT], [frontal] * 3, thresholds)
    assert still.decision is Decision.CHALLENGE_FAILED

    # The same turns, but the frontal frame is another man (farhanrbnn's frontal photo).
    other = observer.observe(_load(shared_data / "poses/farhanrbnn__frontal_and_two_turns/1.jpg"))
    mixed = check_liveness([LEFT, RIGHT], [other, nose_right, nose_left], thresholds)
    assert mixed.decision is Decision.NOT_MATCHED
