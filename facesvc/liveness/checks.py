"""Liveness decision for one scan: challenge steps, identity, duplicates, depth, passive.

Transport- and Redis-free: the engine consumes the challenge (challenges.py),
runs the models on each frame, and hands this module one ``FrameObservation``
per frame in capture order.

Checks, in the order a participant can best act on them:

1. Challenge (when steps were issued): the first frame is frontal, then every
   step is seen in a later frame, in the issued order, each measured against
   that first frame -> CHALLENGE_FAILED ("we did not see you turn left").
2. Identity: every frame within ``max_identity_distance`` of the first (turned
   frames within ``max_turned_identity_distance`` when the pack states one), in
   the pack's metric -> NOT_MATCHED.
3. Duplicates: no two frames near-identical in pixels -> CHALLENGE_FAILED (a
   participant who held perfectly still can cause it too, so it is a retry,
   not a spoof strike).
4. Depth (when a turn or a look up/down was asked): the frame that answers such
   a step must show the parallax of a head, not only its apparent pose
   (``facesvc.liveness.geometry``), and one depth profile fitted across all
   frames must have a face's depth order -> SPOOF_SUSPECTED ("your movement
   looked flat").
5. Passive model, where the policy uses it: the mean live score of the scored
   frames at least ``passive_threshold`` -> SPOOF_SUSPECTED, marked
   ``passive_only`` (the engine neither counts such a scan as an attempt nor as
   a spoof strike: the model refuses too many real people, docs/liveness.md).

With 68 points on every frame (the engine's liveness landmark stage,
``facesvc.models.dense_landmarks``) the poses and the depth come from them, whatever
the pack's detector; without them (a caller of this module that has only five
points), from the five points, with the older nose-offset parallax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
from PIL import Image

from facesvc.domain import Decision
from facesvc.liveness.challenges import Step
from facesvc.liveness.geometry import (
    DepthMotion,
    apply_homography,
    depth_motion,
    depth_profile,
    fit_homography,
)
from facesvc.liveness.pose import HeadPose, estimate_pose
from facesvc.models.matching import Distance, pairwise_distances
from facesvc.models.types import Box, Points, RGBImage

__all__ = [
    "FrameObservation",
    "LivenessResult",
    "LivenessThresholds",
    "apply_homography",
    "check_liveness",
    "face_thumbnail",
    "fit_homography",
    "parallax_residual",
    "step_evidence",
]

THUMBNAIL_SIZE = 32
"""Side, in pixels, of the grayscale face thumbnails compared for duplicates."""

DEPTH_STEPS = frozenset({Step.TURN_LEFT, Step.TURN_RIGHT, Step.LOOK_UP, Step.LOOK_DOWN})
"""Steps whose frames must show depth: a head turning or nodding, not a picture tilted."""


@dataclass(frozen=True, slots=True)
class FrameObservation:
    """What the models saw in one frame.

    ``landmarks``: the pack's (5, 2) or (68, 2) points in image pixels.
    ``descriptor``: (D,) the pack's embedding. ``live_score``: passive model score in [0, 1], or
    None when this frame was not scored. ``thumbnail``: (32, 32) uint8 grayscale
    of the face box, from ``face_thumbnail``.
    """

    landmarks: Points
    box: Box
    descriptor: npt.NDArray[np.float32]
    live_score: float | None
    thumbnail: npt.NDArray[np.uint8]
    landmarks_68: Points | None = None
    """(68, 2) points of the same face from the liveness landmark stage: when every
    frame has them, they measure the poses and the depth."""
    five_point_yaw_deg: float | None = None
    """The head's yaw from the detector's own five points (``five_point_yaw``): a second
    measure of a turn, independent of the 68-point model."""


@dataclass(frozen=True, slots=True)
class LivenessThresholds:
    """Decision thresholds, each measured against the scan's first (frontal) frame.

    The pose and depth defaults were chosen on ../shared/data/poses (calibration
    identities: the freefield man's sets A-C and farhanrbnn) and on flat-picture attacks
    rendered from ten photos (``facesvc.accuracy.flat_attacks``) with the liveness landmark
    stage's 68 points; docs/liveness.md reports them on other people and photos. Each
    field says what was measured. ``max_identity_distance`` and ``passive_threshold``
    belong to the model pack and the passive model's calibration.
    """

    max_identity_distance: float
    """Largest distance of any frame's descriptor from the first frame's, in the
    pack's own metric (``identity_metric`` around ``identity_centre``)."""
    passive_threshold: float
    """Mean live score of the scored frames below which the scan is an attack."""
    max_turned_identity_distance: float | None = None
    """The same for frames turned ``turned_from_yaw_deg`` or more from the first: a
    recogniser's distance grows with the turn, so a pack may state a threshold calibrated
    on turned faces (None: ``max_identity_distance`` for every frame)."""
    turned_from_yaw_deg: float = 15.0
    """Yaw change from the first frame, degrees, from which a frame counts as turned."""
    frontal_max_yaw_deg: float = 20.0
    """The first frame's largest |yaw|, degrees (frontal photos measured up to 14)."""
    turn_min_yaw_deg: float = 24.0
    """Apparent yaw change that answers a turn, degrees. From the 68 points: 30-degree
    turns measured 33-52 (two 60-degree turns, whose points the model loses, 25);
    from 5 points 23.9-59.7 and near-frontal talking frames up to 31.6."""
    turn_parallax_per_sin_yaw: float = 1.75
    """Smallest parallax along the eye line (``DepthMotion.along``, toward the turn) of a
    frame that answers a turn, per sine of its apparent yaw: a rigid head that looks turned
    by an angle shows the parallax of its depth at that angle, a flat picture distorted
    into an apparent turn does not. On the calibration identities real turns of 33-52
    degrees measured 2.12-3.32; flat pictures of ten photos that faked an apparent turn at
    most 1.65. First set at 1.85, midway; then lowered once, after the held-out webcam clips
    measured 1.70-2.26 (one man's median 1.82): the margin is thin (docs/liveness.md)."""
    turn_min_five_point_share: float = 0.5
    """A frame that answers a turn with the 68 points' yaw must also be turned, the same
    way, by at least this share of it in the detector's own five points. The 68-point model
    was trained on real faces: on a flat picture tilted in perspective, or one it loses, it
    draws a turned head of its own. Measured on the calibration data (yunet-sface): real
    turns 0.64-1.14 (48 frontal-turned pairs); flat-picture frames that looked turned to
    the 68 points -0.37-0.97 (median 0.24, 207 frames); docs/liveness.md."""
    turn_min_parallax: float = 0.5
    """And at least this parallax whatever the apparent yaw: a floor for a configuration
    with a small ``turn_min_yaw_deg``. At the default 24 degrees the ratio above asks for
    more (0.75). A floor of 0.9 refused no flat picture of the calibration photos that the
    ratio let through, but refused real 25-30 degree turns of webcam clips (parallax
    0.82-0.97; docs/liveness.md)."""
    look_min_nose_rise: float = 0.10
    """Change of ``nose_drop`` that answers LOOK_UP (a rise) or LOOK_DOWN (a fall):
    30-degree look-ups measured 0.106-0.242 (18 of 18 above), other movements 0 of
    66 (largest 0.031) and talking frames 0 of 110 (largest 0.096) above."""
    look_max_yaw_deg: float = 15.0
    """A look up/down frame must stay within this yaw change, degrees: turning
    also moves the nose across the eye line."""
    look_min_parallax: float = 1.0
    """Smallest parallax down the face (``DepthMotion.down``, up for LOOK_UP) of a frame
    that answers a look: 24 real look-ups measured 1.25-2.31; flat pictures that faked
    the nose rise at most 0.85."""
    min_face_likeness: float = 0.5
    """Least ``DepthProfile.face_likeness`` of the depth profile fitted across all
    frames: real movements measured 0.74-0.99."""
    closer_min_scale_ratio: float = 1.3
    """Growth of ``face_scale_px`` that answers COME_CLOSER: turns and looks at one
    distance measured up to 1.23, talking frames up to 1.06 (no labelled
    approach was available to measure misses)."""
    min_parallax: float = 0.10
    """Five points only: smallest change of the nose's offset along the eye line
    (``parallax_residual``) that proves depth. With the default pack's detector: 48
    perspective warps of 6 flat photos measured up to 0.139, 38 real turns at least
    0.137."""
    duplicate_max_mean_abs_diff: float = 0.5
    """Mean absolute thumbnail difference (gray levels) at or below which two
    frames are copies. Measured: a frame and its JPEG (q70) re-encoding differ by
    up to 0.96; consecutive 25 fps frames of a still person by 0.01-0.2."""
    frames_mirrored: bool = False
    """True when the client mirrors frames (selfie view): swaps image left/right."""
    identity_metric: Distance = Distance.COSINE
    """The pack's descriptor distance."""
    identity_centre: npt.NDArray[np.float32] | None = field(default=None, compare=False)
    """The pack's calibrated centre (D,) for centred cosine, or None."""


@dataclass(frozen=True, slots=True)
class LivenessResult:
    """Outcome of the liveness checks.

    ``decision`` is None when every check passed, else CHALLENGE_FAILED,
    NOT_MATCHED or SPOOF_SUSPECTED with ``reason`` for the participant.
    ``passive_only``: the decision came from the passive model alone (no geometry
    check failed). The measurements are for audit and tuning (no biometric data).
    """

    decision: Decision | None
    reason: str
    step_frames: tuple[int, ...] = ()
    max_identity_distance: float | None = None
    parallax: float | None = None
    """The weakest depth evidence among the depth steps' frames: the parallax toward the
    step (68 points) or the nose-offset change (5 points)."""
    passive_score: float | None = None
    passive_only: bool = False
    face_likeness: float | None = None
    poses: tuple[HeadPose, ...] = field(default=(), repr=False)
    depth: tuple[DepthMotion, ...] = field(default=(), repr=False)

    @property
    def passed(self) -> bool:
        return self.decision is None


_STEP_WORDS = {
    Step.TURN_LEFT: "turn your head to your left",
    Step.TURN_RIGHT: "turn your head to your right",
    Step.LOOK_UP: "look up",
    Step.LOOK_DOWN: "look down",
    Step.COME_CLOSER: "come closer to the camera",
}

_FLAT = (
    "Your head movement looked flat, like a picture being moved. Use a live camera and "
    "turn your own head, not the device."
)


def face_thumbnail(image: RGBImage, box: Box) -> npt.NDArray[np.uint8]:
    """(32, 32) uint8 grayscale of the face box (clipped to the image)."""
    h, w = image.shape[:2]
    left, top = max(0, int(box.left)), max(0, int(box.top))
    right, bottom = min(w, int(np.ceil(box.right))), min(h, int(np.ceil(box.bottom)))
    face = Image.fromarray(image[top:bottom, left:right]).convert("L")
    size = (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    return np.asarray(face.resize(size, Image.Resampling.BOX), dtype=np.uint8)


def parallax_residual(reference: Points, moved: Points) -> float:
    """Five points' depth evidence between two frames of one face: the change of the
    nose's offset along the eye line, over the eye span (unitless). Four eye corners are
    too nearly collinear for a homography; a flat picture's perspective barely moves the
    nose along the eye line, a turning head moves it a lot. (With 68 points,
    ``facesvc.liveness.geometry.depth_motion`` measures depth instead.)"""
    ref = np.asarray(reference, dtype=np.float64)
    mov = np.asarray(moved, dtype=np.float64)
    if ref.shape != (5, 2) or mov.shape != (5, 2):
        raise ValueError(f"landmarks must both be (5, 2), got {ref.shape}, {mov.shape}")
    return abs(_nose_along(ref) - _nose_along(mov))


def _nose_along(p: npt.NDArray[np.float64]) -> float:
    axis = p[0] - p[2]
    span = float(np.hypot(*axis))
    return float((p[4] - p[0:4].mean(axis=0)) @ axis) / span**2


def _turn_sign(step: Step, t: LivenessThresholds) -> float:
    """+1 when ``step`` turns the nose toward image right (the participant's own left in
    an unmirrored picture), -1 toward image left."""
    sign = 1.0 if step is Step.TURN_LEFT else -1.0
    return -sign if t.frames_mirrored else sign


def _answers(step: Step, pose: HeadPose, ref: HeadPose, t: LivenessThresholds) -> bool:
    """Whether ``pose`` looks like ``step`` done, measured against the frontal ``ref``."""
    d_yaw = pose.yaw_deg - ref.yaw_deg
    if step in (Step.TURN_LEFT, Step.TURN_RIGHT):
        return _turn_sign(step, t) * d_yaw >= t.turn_min_yaw_deg
    if step in (Step.LOOK_UP, Step.LOOK_DOWN):
        # Looking up brings the nose toward the eye line in the picture.
        rise = ref.nose_drop - pose.nose_drop
        if step is Step.LOOK_DOWN:
            rise = -rise
        return rise >= t.look_min_nose_rise and abs(d_yaw) <= t.look_max_yaw_deg
    return pose.face_scale_px >= t.closer_min_scale_ratio * ref.face_scale_px


def _depth_of(
    step: Step,
    motion: DepthMotion,
    pose: HeadPose,
    ref: HeadPose,
    t: LivenessThresholds,
    five_point_turn_deg: float | None = None,
) -> float | None:
    """The parallax toward ``step`` of a frame whose pose answers it, or None when it is
    not the depth a head shows for that pose (a flat picture moved). ``five_point_turn_deg``:
    the frame's yaw change from the first frame in the detector's five points (None: not
    known, not checked)."""
    if step in (Step.TURN_LEFT, Step.TURN_RIGHT):
        sign = _turn_sign(step, t)
        if five_point_turn_deg is not None and sign * five_point_turn_deg < (
            t.turn_min_five_point_share * sign * (pose.yaw_deg - ref.yaw_deg)
        ):
            return None
        along = sign * motion.along
        yaw = abs(pose.yaw_deg - ref.yaw_deg)
        per_yaw = t.turn_parallax_per_sin_yaw * math.sin(math.radians(min(yaw, 90.0)))
        needed = max(t.turn_min_parallax, per_yaw)
        return along if along >= needed else None
    up = -motion.down if step is Step.LOOK_UP else motion.down
    return up if up >= t.look_min_parallax else None


def step_evidence(
    step: Step, reference: Points, moved: Points, thresholds: LivenessThresholds
) -> tuple[bool, bool]:
    """Whether the frame with 68 points ``moved`` shows ``step`` against the frontal frame's
    ``reference`` points: (its pose answers the step, and it also shows the depth a head
    would), as ``check_liveness`` judges each frame. Evaluation uses it to skip scans that
    cannot pass (``facesvc.accuracy.challenges``)."""
    ref, pose = estimate_pose(reference), estimate_pose(moved)
    posed = _answers(step, pose, ref, thresholds)
    if not posed or step not in DEPTH_STEPS:
        return posed, posed
    (motion,) = depth_motion([reference, moved])
    return True, _depth_of(step, motion, pose, ref, thresholds) is not None


def check_liveness(
    steps: Sequence[Step],
    frames: Sequence[FrameObservation],
    thresholds: LivenessThresholds,
) -> LivenessResult:
    """Decide whether ``frames`` (capture order) show a live person doing ``steps``.

    ``steps`` empty means passive-only policy: the challenge and depth checks are skipped,
    identity, duplicates and the passive score still apply.
    """
    if not frames:
        return LivenessResult(Decision.CHALLENGE_FAILED, "No frames were received. Try again.")
    t = thresholds
    dense = all(f.landmarks_68 is not None for f in frames)
    points = [
        f.landmarks_68 if dense and f.landmarks_68 is not None else f.landmarks for f in frames
    ]
    poses = tuple(estimate_pose(p) for p in points)
    ref = poses[0]
    depth_asked = dense and any(s in DEPTH_STEPS for s in steps)
    motions = depth_motion(points) if depth_asked else ()

    # Each step: the first frame after the previous step's that shows it with a head's
    # depth; a step seen only as a pose (a picture tilted) is remembered as flat.
    step_frames: list[int] = []
    flat: list[Step] = []
    depths: list[float] = []
    if steps:
        if abs(ref.yaw_deg) > t.frontal_max_yaw_deg:
            return LivenessResult(
                Decision.CHALLENGE_FAILED,
                "Start by looking straight at the camera, then follow the instructions.",
                poses=poses,
            )
        at = 0
        for step in steps:
            posed = [i for i in range(at + 1, len(frames)) if _answers(step, poses[i], ref, t)]
            if not posed:
                done = " after the previous step" if step_frames else ""
                return LivenessResult(
                    Decision.CHALLENGE_FAILED,
                    f"We did not see you {_STEP_WORDS[step]}{done}. Try again and follow the "
                    "instructions in the order shown.",
                    step_frames=tuple(step_frames),
                    poses=poses,
                    depth=motions,
                )
            found = posed[0]
            if depth_asked and step in DEPTH_STEPS:
                shown = [
                    (i, _depth_of(step, motions[i - 1], poses[i], ref, t, _five_turn(frames, i)))
                    for i in posed
                ]
                deep = [(i, d) for i, d in shown if d is not None]
                if deep:
                    found = deep[0][0]
                    depths.append(deep[0][1])
                else:
                    flat.append(step)
            step_frames.append(found)
            at = found

    base = LivenessResult(
        None, "Liveness confirmed.", step_frames=tuple(step_frames), poses=poses, depth=motions
    )
    distances = _identity_distances(frames, t)
    base = replace(base, max_identity_distance=float(distances.max()))
    if np.any(distances > _identity_limits(poses, t)):
        return replace(
            base,
            decision=Decision.NOT_MATCHED,
            reason="Not every frame showed the same person. Make sure only you are in front "
            "of the camera for the whole scan.",
        )
    if _has_duplicates(frames, t):
        return replace(
            base,
            decision=Decision.CHALLENGE_FAILED,
            reason="Some frames were identical copies. Try again with the live camera, moving "
            "as each instruction asks.",
        )

    if flat:
        return replace(base, decision=Decision.SPOOF_SUSPECTED, reason=_FLAT)
    if depth_asked:
        base = replace(base, parallax=min(depths) if depths else None)
        # Across all frames at once: one depth per point must explain every frame's
        # parallax, and in a face's order.
        profile = depth_profile(points, range(1, len(points)))
        base = replace(base, face_likeness=profile.face_likeness)
        if profile.face_likeness < t.min_face_likeness:
            return replace(base, decision=Decision.SPOOF_SUSPECTED, reason=_FLAT)
    elif steps:
        # Five points only: the nose's offset along the eye line on the turns.
        turned = [i for s, i in zip(steps, step_frames, strict=True) if s in _TURNS]
        if turned:
            parallax = max(parallax_residual(points[0], points[i]) for i in turned)
            base = replace(base, parallax=parallax)
            if parallax < t.min_parallax:
                return replace(base, decision=Decision.SPOOF_SUSPECTED, reason=_FLAT)

    scores = [f.live_score for f in frames if f.live_score is not None]
    passive = float(np.mean(scores)) if scores else None
    base = replace(base, passive_score=passive)
    if passive is not None and passive < t.passive_threshold:
        return replace(
            base,
            decision=Decision.SPOOF_SUSPECTED,
            reason="The picture did not look like a live face. Scan in good light, without a "
            "screen or printed photo in front of the camera.",
            passive_only=True,
        )
    return base


_TURNS = frozenset({Step.TURN_LEFT, Step.TURN_RIGHT})


def _five_turn(frames: Sequence[FrameObservation], i: int) -> float | None:
    """Frame ``i``'s yaw change from the first frame in the detector's five points."""
    now, first = frames[i].five_point_yaw_deg, frames[0].five_point_yaw_deg
    return None if now is None or first is None else now - first


def _identity_distances(
    frames: Sequence[FrameObservation], t: LivenessThresholds
) -> npt.NDArray[np.float64]:
    """(F,) each frame's descriptor distance from the first frame's, in the pack's metric."""
    descriptors = np.stack([np.asarray(f.descriptor, dtype=np.float64) for f in frames])
    distances = pairwise_distances(
        descriptors[:1], descriptors, t.identity_metric, t.identity_centre
    )
    return np.asarray(distances, dtype=np.float64).reshape(-1)


def _identity_limits(poses: Sequence[HeadPose], t: LivenessThresholds) -> npt.NDArray[np.float64]:
    """(F,) the identity threshold of each frame: the turned-face one for turned frames
    when the pack states one."""
    turned_limit = t.max_turned_identity_distance
    return np.array(
        [
            turned_limit
            if turned_limit is not None
            and abs(p.yaw_deg - poses[0].yaw_deg) >= t.turned_from_yaw_deg
            else t.max_identity_distance
            for p in poses
        ]
    )


def _has_duplicates(frames: Sequence[FrameObservation], t: LivenessThresholds) -> bool:
    thumbs = np.stack([f.thumbnail.astype(np.int16) for f in frames])
    for i in range(len(frames)):
        diffs = np.abs(thumbs[i + 1 :] - thumbs[i]).mean(axis=(1, 2))
        if np.any(diffs <= t.duplicate_max_mean_abs_diff):
            return True
    return False
