"""Depth from 68 landmarks: a rigid head shows parallax a flat picture cannot.

Synthetic points only (always run): a 68-point face given the measured depth profile and
seen by a pinhole camera, against the same face printed flat. The real-photo counterparts
are in tests/test_liveness_attacks.py and tests/test_liveness_checks.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

from facesvc.domain import Decision
from facesvc.liveness.challenges import Step
from facesvc.liveness.checks import (
    FrameObservation,
    LivenessThresholds,
    check_liveness,
    step_evidence,
)
from facesvc.liveness.geometry import (
    FACE_DEPTH_68,
    apply_homography,
    depth_motion,
    depth_profile,
    fit_homography,
)
from facesvc.models.types import Box, Points

F64 = npt.NDArray[np.float64]
LEFT, RIGHT, UP, CLOSER = Step.TURN_LEFT, Step.TURN_RIGHT, Step.LOOK_UP, Step.COME_CLOSER


def face_68() -> F64:
    """A frontal face in dlib's 68-point order, half a face wide = 1, y down."""
    pts = [
        (math.cos(math.pi - k * math.pi / 16), 1.1 * math.sin(math.pi - k * math.pi / 16))
        for k in range(17)
    ]
    pts += [(-0.8 + 0.1625 * k, -0.45) for k in range(5)]
    pts += [(0.15 + 0.1625 * k, -0.45) for k in range(5)]
    pts += [(0.0, -0.3 + 0.1833 * k) for k in range(4)]
    pts += [(-0.2 + 0.1 * k, 0.35) for k in range(5)]
    pts += [(-0.62, -0.2), (-0.5, -0.26), (-0.34, -0.26), (-0.22, -0.2), (-0.34, -0.14)]
    pts += [(-0.5, -0.14), (0.22, -0.2), (0.34, -0.26), (0.5, -0.26), (0.62, -0.2)]
    pts += [(0.5, -0.14), (0.34, -0.14)]
    pts += [(-0.35, 0.65), (-0.2, 0.58), (-0.07, 0.55), (0.0, 0.57), (0.07, 0.55), (0.2, 0.58)]
    pts += [(0.35, 0.65), (0.2, 0.74), (0.07, 0.77), (0.0, 0.78), (-0.07, 0.77), (-0.2, 0.74)]
    pts += [(-0.28, 0.65), (-0.1, 0.62), (0.0, 0.62), (0.1, 0.62), (0.28, 0.65), (0.1, 0.68)]
    pts += [(0.0, 0.69), (-0.1, 0.68)]
    return np.array(pts)


# Twice the unit depth profile: the nose tip then stands about half a face-width out, and a
# 30-degree turn shows the parallax measured on real turns (about 1.5).
HEAD = np.c_[face_68(), -2.0 * FACE_DEPTH_68]  # z toward the camera is negative
PRINT = np.c_[face_68(), np.zeros(68)]


def view(
    points: F64, yaw: float = 0.0, pitch: float = 0.0, distance: float = 8.0, scale: float = 100
) -> Points:
    """``points`` turned by ``yaw`` (nose toward image right > 0) and ``pitch`` (chin up > 0)
    degrees about the face's centre, seen by a pinhole camera from ``distance`` half-face
    widths, ``scale`` pixels per half-face width at that distance."""
    a, b = math.radians(yaw), math.radians(pitch)
    x, y, z = points.T
    x2 = x * math.cos(a) - z * math.sin(a)
    z2 = x * math.sin(a) + z * math.cos(a)
    y2 = y * math.cos(b) + z2 * math.sin(b)
    z3 = -y * math.sin(b) + z2 * math.cos(b)
    d = distance + z3
    return np.c_[320 + scale * distance * x2 / d, 240 + scale * distance * y2 / d].astype(
        np.float32
    )


def tilted(points: Points, tilt_deg: float, axis_deg: float, distance: float = 4.0) -> Points:
    """A flat picture's points after turning the picture ``tilt_deg`` about an axis at
    ``axis_deg`` in its plane, seen in strong perspective: one homography of the original."""
    a = math.radians(axis_deg)
    u = np.array([math.cos(a), math.sin(a), 0.0])
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    t = math.radians(tilt_deg)
    r = np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)
    centred = np.c_[(np.asarray(points, np.float64) - [320, 240]) / 100, np.zeros(len(points))]
    moved = centred @ r.T
    d = distance + moved[:, 2]
    return np.c_[320 + 100 * distance * moved[:, 0] / d, 240 + 100 * distance * moved[:, 1] / d]


def observe(points: Points, seed: int) -> FrameObservation:
    rng = np.random.default_rng(seed)
    lo, hi = points.min(axis=0), points.max(axis=0)
    return FrameObservation(
        landmarks=points[[45, 42, 36, 39, 33]],
        box=Box(float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])),
        descriptor=np.eye(128, dtype=np.float32)[0],
        live_score=None,
        thumbnail=rng.integers(0, 256, (32, 32), dtype=np.uint8),
        landmarks_68=np.asarray(points, dtype=np.float32),
    )


THRESHOLDS = LivenessThresholds(max_identity_distance=0.3, passive_threshold=0.0)


def scan(*frames: Points) -> list[FrameObservation]:
    return [observe(p, seed=i) for i, p in enumerate(frames)]


# ------------------------------------------------------------------------ the geometry


def test_homography_fit_recovers_a_known_warp() -> None:
    h = np.array([[1.1, 0.2, 30.0], [-0.1, 0.9, 12.0], [4e-4, -2e-4, 1.0]])
    src = np.random.default_rng(0).uniform(0, 400, (12, 2))
    np.testing.assert_allclose(fit_homography(src, apply_homography(h, src)), h, rtol=1e-6)


@pytest.mark.parametrize("axis", [0.0, 45.0, 90.0, 135.0])
@pytest.mark.parametrize("tilt", [-50.0, 30.0])
def test_a_flat_picture_tilted_about_any_axis_shows_no_depth(axis: float, tilt: float) -> None:
    frontal = view(PRINT)
    (motion,) = depth_motion([frontal, tilted(frontal, tilt, axis)])
    assert abs(motion.along) < 1e-6 and abs(motion.down) < 1e-6
    assert motion.plane_rms < 1e-6


def test_a_turning_head_shows_parallax_along_the_turn_and_a_nod_down_the_face() -> None:
    left, right, up = depth_motion(
        [view(HEAD), view(HEAD, yaw=30), view(HEAD, yaw=-30), view(HEAD, pitch=25)]
    )
    assert left.along > 1.2 and abs(left.down) < 0.2 * left.along
    assert right.along < -1.2 and abs(right.down) < 0.2 * abs(right.along)
    assert up.down < -1.0 and abs(up.along) < 0.2 * abs(up.down)
    # The parallax grows with the turn, as a rigid head's must.
    (wider,) = depth_motion([view(HEAD), view(HEAD, yaw=45)])
    assert wider.along > left.along


def test_parallax_does_not_depend_on_size_or_distance() -> None:
    (near,) = depth_motion([view(HEAD, scale=80), view(HEAD, yaw=30, scale=140)])
    (far,) = depth_motion([view(HEAD), view(HEAD, yaw=30)])
    assert near.along == pytest.approx(far.along, rel=0.1)


def test_a_rigid_head_has_a_face_like_depth_profile_and_noise_does_not() -> None:
    frames = [view(HEAD), view(HEAD, yaw=30), view(HEAD, pitch=25)]
    profile = depth_profile(frames, [1, 2])
    assert profile.face_likeness > 0.95 and profile.rigidity > 0.95
    rng = np.random.default_rng(3)
    jitter = [view(PRINT) + rng.normal(0, 1.5, (68, 2)) for _ in range(3)]
    noisy = depth_profile(jitter, [1, 2])
    assert noisy.face_likeness < 0.5 and noisy.rigidity < 0.8


# ------------------------------------------------------------------------ the decision


def test_a_head_answers_turns_and_a_look_up_with_depth() -> None:
    frames = scan(view(HEAD), view(HEAD, yaw=30), view(HEAD, yaw=-30), view(HEAD, pitch=25))
    result = check_liveness([LEFT, RIGHT, UP], frames, THRESHOLDS)
    assert result.passed, result.reason
    assert result.step_frames == (1, 2, 3)
    assert result.parallax is not None and result.parallax > THRESHOLDS.turn_min_parallax
    assert result.face_likeness is not None and result.face_likeness > 0.9


def test_a_turn_the_detectors_own_points_do_not_see_is_flat() -> None:
    # The 68 points show a head turning 30 degrees with its depth, but the detector's five
    # points on the same frames barely moved: the 68-point model drew a turn of its own
    # (a flat picture it lost, docs/liveness.md). With the five points turning too, the
    # same frames pass.
    frames = scan(view(HEAD), view(HEAD, yaw=30))
    seen = [
        replace(frames[0], five_point_yaw_deg=1.0),
        replace(frames[1], five_point_yaw_deg=5.0),
    ]
    assert check_liveness([LEFT], seen, THRESHOLDS).decision is Decision.SPOOF_SUSPECTED
    agreeing = [
        replace(frames[0], five_point_yaw_deg=1.0),
        replace(frames[1], five_point_yaw_deg=29.0),
    ]
    assert check_liveness([LEFT], agreeing, THRESHOLDS).passed
    # A turn the wrong way in the five points is no confirmation either.
    opposite = [agreeing[0], replace(frames[1], five_point_yaw_deg=-29.0)]
    assert check_liveness([LEFT], opposite, THRESHOLDS).decision is Decision.SPOOF_SUSPECTED


def test_a_picture_whose_apparent_turn_has_no_depth_is_a_spoof() -> None:
    # With the pose thresholds off, any movement "answers" the steps: the depth alone
    # must refuse the flat picture, however it was tilted.
    lax = replace(THRESHOLDS, turn_min_yaw_deg=-90.0, look_min_nose_rise=-1.0)
    frontal = view(PRINT)
    frames = scan(frontal, tilted(frontal, 40, 90), tilted(frontal, -40, 45))
    result = check_liveness([LEFT, RIGHT], frames, lax)
    assert result.decision is Decision.SPOOF_SUSPECTED
    assert "flat" in result.reason


def test_a_turn_with_too_little_depth_for_its_apparent_yaw_is_refused() -> None:
    # A head whose nose stands out a fifth as far, turned 70 degrees: the parallax of a
    # real head turned that far would be much larger. That mismatch is what a flat
    # picture distorted into an apparent turn shows.
    lax = replace(THRESHOLDS, turn_min_yaw_deg=-90.0)
    shallow = np.c_[face_68(), -0.4 * FACE_DEPTH_68]
    assert step_evidence(LEFT, view(shallow), view(shallow, yaw=70), lax) == (True, False)
    assert step_evidence(LEFT, view(HEAD), view(HEAD, yaw=30), THRESHOLDS) == (True, True)
    # The parallax must also point the way of the turn asked for.
    assert step_evidence(RIGHT, view(HEAD), view(HEAD, yaw=30), lax) == (True, False)


def test_coming_closer_needs_no_depth_but_the_turn_still_does() -> None:
    frontal = view(HEAD)
    genuine = scan(frontal, view(HEAD, yaw=30), view(HEAD, scale=150))
    assert check_liveness([LEFT, CLOSER], genuine, THRESHOLDS).passed
    lax = replace(THRESHOLDS, turn_min_yaw_deg=-90.0)
    flat = view(PRINT)
    nearer = (flat - np.float32([320, 240])) * np.float32(1.5) + np.float32([320, 240])
    attack = scan(flat, tilted(flat, 45, 90), nearer)
    assert check_liveness([LEFT, CLOSER], attack, lax).decision is Decision.SPOOF_SUSPECTED


def test_a_frame_that_answers_by_pose_but_without_depth_is_skipped_for_a_later_one() -> None:
    # With the pose threshold off every frame "answers" the turn; the first moved frame is
    # the frontal face shifted (no depth), the next a real turn: that one is the answer.
    lax = replace(THRESHOLDS, turn_min_yaw_deg=-90.0)
    shifted = view(HEAD) + np.float32(12.0)
    result = check_liveness([LEFT], scan(view(HEAD), shifted, view(HEAD, yaw=30)), lax)
    assert result.passed, result.reason
    assert result.step_frames == (2,)
    # Without the real turn the step is seen only as a pose: the movement was flat.
    flat = check_liveness([LEFT], scan(view(HEAD), shifted), lax)
    assert flat.decision is Decision.SPOOF_SUSPECTED


def test_turned_frames_may_use_the_packs_turned_face_threshold() -> None:
    other = np.eye(128, dtype=np.float32)
    frames = scan(view(HEAD), view(HEAD, yaw=30))
    # The turned frame's descriptor is 0.6 away (cosine) from the frontal one's.
    tilted_descriptor = (0.4 * other[0] + np.sqrt(1 - 0.16) * other[1]).astype(np.float32)
    frames[1] = replace(frames[1], descriptor=tilted_descriptor)
    assert check_liveness([LEFT], frames, THRESHOLDS).decision is Decision.NOT_MATCHED
    lenient = replace(THRESHOLDS, max_turned_identity_distance=0.7)
    assert check_liveness([LEFT], frames, lenient).passed
    # The frontal frame itself never gets the lenient threshold.
    still = replace(frames[0], thumbnail=frames[1].thumbnail, descriptor=tilted_descriptor)
    assert check_liveness([], [frames[0], still], lenient).decision is Decision.NOT_MATCHED
