"""Liveness decision for one scan: challenge steps, identity, duplicates, parallax, passive.

Transport- and Redis-free: the engine consumes the challenge (challenges.py),
runs the models on each frame, and hands this module one ``FrameObservation``
per frame in capture order.

Checks, in the order a participant can best act on them:

1. Challenge (when steps were issued): the first frame is frontal, then every
   step is seen in a later frame, in the issued order, each measured against
   that first frame -> CHALLENGE_FAILED ("we did not see you turn left").
2. Identity: every frame within ``max_identity_distance`` of the first, in the
   pack's metric -> NOT_MATCHED.
3. Duplicates: no two frames near-identical in pixels -> CHALLENGE_FAILED (a
   participant who held perfectly still can cause it too, so it is a retry,
   not a spoof strike).
4. Parallax (when a turn or look-up was answered): points off the face's plane
   must move relative to a homography fitted on the rest; a flat picture does
   not -> SPOOF_SUSPECTED.
5. Passive model: the mean live score of the scored frames at least
   ``passive_threshold`` -> SPOOF_SUSPECTED.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from PIL import Image

from facesvc.domain import Decision
from facesvc.liveness.challenges import Step
from facesvc.liveness.pose import HeadPose, estimate_pose
from facesvc.models.matching import Distance, pairwise_distances
from facesvc.models.types import Box, Points, RGBImage

THUMBNAIL_SIZE = 32
"""Side, in pixels, of the grayscale face thumbnails compared for duplicates."""

# 68-point indices. Anchors lie near one plane (brows, eye corners, mouth
# corners, chin); probes stand out of it (nose ridge and tip).
_ANCHORS_68 = (17, 21, 22, 26, 36, 39, 42, 45, 48, 54, 57, 8)
_PROBES_68 = (27, 28, 29, 30, 33)


@dataclass(frozen=True, slots=True)
class FrameObservation:
    """What the models saw in one frame.

    ``landmarks``: (5, 2) or (68, 2) dlib-layout image pixels, for the pose.
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
    """Optional (68, 2) points of the same face for the parallax check: their
    homography test separates flat pictures from turning heads more widely than
    the 5 points can (module doc of ``parallax_residual``)."""


@dataclass(frozen=True, slots=True)
class LivenessThresholds:
    """Decision thresholds, each measured against the scan's first (frontal) frame.

    The pose and parallax defaults were chosen from measurements on
    ../shared/data/poses with dlib's 5-point landmarks (the default pack's) and
    68-point ones; each field says what was measured. ``max_identity_distance``
    and ``passive_threshold`` belong to the model pack and its calibration.
    """

    max_identity_distance: float
    """Largest distance of any frame's descriptor from the first frame's, in the
    pack's own metric (``identity_metric`` around ``identity_centre``)."""
    passive_threshold: float
    """Mean live score of the scored frames below which the scan is an attack."""
    frontal_max_yaw_deg: float = 20.0
    """The first frame's largest |yaw|, degrees (frontal photos measured up to 14)."""
    turn_min_yaw_deg: float = 24.0
    """Yaw change that answers a turn, degrees: 30-degree turns measured 23.9-59.7
    (1 of 36 below 24); near-frontal talking frames 4 of 110 pairs at 24 or more;
    look up/down and frontal repeats 0 of 48."""
    look_min_nose_rise: float = 0.10
    """Change of ``nose_drop`` that answers LOOK_UP (a rise) or LOOK_DOWN (a fall):
    30-degree look-ups measured 0.106-0.242 (18 of 18 above), other movements 0 of
    66 (largest 0.031) and talking frames 0 of 110 (largest 0.096) above."""
    look_max_yaw_deg: float = 15.0
    """A look up/down frame must stay within this yaw change, degrees: turning
    also moves the nose across the eye line."""
    closer_min_scale_ratio: float = 1.3
    """Growth of ``face_scale_px`` that answers COME_CLOSER: turns and looks at one
    distance measured up to 1.23, talking frames up to 1.06 (no labelled
    approach was available to measure misses)."""
    min_parallax: float = 0.10
    """Smallest off-plane residual (``parallax_residual``) that proves depth with 5
    points. With the default pack's detector: 48 perspective warps of 6 flat photos
    (turned up to 40, tilted up to 25 degrees) measured up to 0.139 (1 of 48 above
    0.10, and that one showed a 22-degree apparent turn, short of a turn step); 38
    real 30-degree turns at least 0.137."""
    min_parallax_68: float = 0.082
    """The same with 68 points (homography residual): the 48 flat warps measured
    at most 0.072, the 38 real turns at least 0.092 and 18 real look-ups at least
    0.152; the threshold sits between."""
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
    The measurements are for audit and tuning (no biometric data).
    """

    decision: Decision | None
    reason: str
    step_frames: tuple[int, ...] = ()
    max_identity_distance: float | None = None
    parallax: float | None = None
    passive_score: float | None = None
    poses: tuple[HeadPose, ...] = field(default=(), repr=False)

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


def face_thumbnail(image: RGBImage, box: Box) -> npt.NDArray[np.uint8]:
    """(32, 32) uint8 grayscale of the face box (clipped to the image)."""
    h, w = image.shape[:2]
    left, top = max(0, int(box.left)), max(0, int(box.top))
    right, bottom = min(w, int(np.ceil(box.right))), min(h, int(np.ceil(box.bottom)))
    face = Image.fromarray(image[top:bottom, left:right]).convert("L")
    size = (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    return np.asarray(face.resize(size, Image.Resampling.BOX), dtype=np.uint8)


def fit_homography(
    src: npt.NDArray[np.float64], dst: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """3x3 homography H with dst ~ H @ src, by normalised DLT over (K >= 4, 2) points."""

    def normaliser(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        # Hartley normalisation: centroid to origin, mean distance sqrt(2);
        # without it the DLT's least squares is badly conditioned in pixels.
        c = p.mean(axis=0)
        d = np.sqrt(((p - c) ** 2).sum(axis=1)).mean()
        s = np.sqrt(2.0) / max(float(d), 1e-12)
        return np.array([[s, 0.0, -s * c[0]], [0.0, s, -s * c[1]], [0.0, 0.0, 1.0]])

    t_src, t_dst = normaliser(src), normaliser(dst)
    a = _homogeneous(src) @ t_src.T
    b = _homogeneous(dst) @ t_dst.T
    rows = []
    for (x, y, w), (u, v, z) in zip(a, b, strict=True):
        rows.append([0.0, 0.0, 0.0, -z * x, -z * y, -z * w, v * x, v * y, v * w])
        rows.append([z * x, z * y, z * w, 0.0, 0.0, 0.0, -u * x, -u * y, -u * w])
    _, _, vt = np.linalg.svd(np.asarray(rows))
    h_norm = vt[-1].reshape(3, 3)
    h: npt.NDArray[np.float64] = np.linalg.inv(t_dst) @ h_norm @ t_src
    out: npt.NDArray[np.float64] = h / h[2, 2]
    return out


def apply_homography(
    h: npt.NDArray[np.float64], points: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """(K, 2) points mapped by the 3x3 homography ``h``."""
    mapped = _homogeneous(points) @ h.T
    out: npt.NDArray[np.float64] = mapped[:, :2] / mapped[:, 2:3]
    return out


def _homogeneous(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = np.hstack([p, np.ones((len(p), 1))])
    return out


def parallax_residual(reference: Points, moved: Points) -> float:
    """Off-plane motion between two frames of one face, over the eye span (unitless).

    68 points: a homography is fitted on near-planar anchors from ``reference``
    to ``moved``; the result is the largest residual of the nose points. A flat
    picture, however it is moved or tilted, gives only landmark noise.
    5 points: four eye corners are too nearly collinear for a homography, so the
    result is the change of the nose's offset along the eye line (over eye span),
    which a flat picture's perspective barely moves.
    """
    ref = np.asarray(reference, dtype=np.float64)
    mov = np.asarray(moved, dtype=np.float64)
    if ref.shape == (68, 2) and mov.shape == (68, 2):
        anchors, probes = list(_ANCHORS_68), list(_PROBES_68)
        h = fit_homography(ref[anchors], mov[anchors])
        err = np.hypot(*(apply_homography(h, ref[probes]) - mov[probes]).T)
        span = np.hypot(*(mov[45] - mov[36]))
        return float(err.max() / span)
    if ref.shape == (5, 2) and mov.shape == (5, 2):
        return abs(_nose_along(ref) - _nose_along(mov))
    raise ValueError(f"landmarks must both be (68, 2) or (5, 2), got {ref.shape}, {mov.shape}")


def _nose_along(p: npt.NDArray[np.float64]) -> float:
    axis = p[0] - p[2]
    span = float(np.hypot(*axis))
    return float((p[4] - p[0:4].mean(axis=0)) @ axis) / span**2


def _answers(step: Step, pose: HeadPose, ref: HeadPose, t: LivenessThresholds) -> bool:
    """Whether ``pose`` shows ``step`` done, measured against the frontal ``ref``."""
    # Image-right nose = the participant's own left in an unmirrored picture.
    d_yaw = pose.yaw_deg - ref.yaw_deg
    if t.frames_mirrored:
        d_yaw = -d_yaw
    if step is Step.TURN_LEFT:
        return d_yaw >= t.turn_min_yaw_deg
    if step is Step.TURN_RIGHT:
        return -d_yaw >= t.turn_min_yaw_deg
    if step in (Step.LOOK_UP, Step.LOOK_DOWN):
        # Looking up brings the nose toward the eye line in the picture.
        rise = ref.nose_drop - pose.nose_drop
        if step is Step.LOOK_DOWN:
            rise = -rise
        return rise >= t.look_min_nose_rise and abs(d_yaw) <= t.look_max_yaw_deg
    return pose.face_scale_px >= t.closer_min_scale_ratio * ref.face_scale_px


def check_liveness(
    steps: Sequence[Step],
    frames: Sequence[FrameObservation],
    thresholds: LivenessThresholds,
) -> LivenessResult:
    """Decide whether ``frames`` (capture order) show a live person doing ``steps``.

    ``steps`` empty means passive-only policy: the challenge and parallax
    checks are skipped, identity, duplicates and the passive score still apply.
    """
    if not frames:
        return LivenessResult(Decision.CHALLENGE_FAILED, "No frames were received. Try again.")
    poses = tuple(estimate_pose(f.landmarks) for f in frames)
    ref = poses[0]

    step_frames: list[int] = []
    if steps:
        if abs(ref.yaw_deg) > thresholds.frontal_max_yaw_deg:
            return LivenessResult(
                Decision.CHALLENGE_FAILED,
                "Start by looking straight at the camera, then follow the instructions.",
                poses=poses,
            )
        at = 0
        for step in steps:
            found = next(
                (
                    i
                    for i in range(at + 1, len(frames))
                    if _answers(step, poses[i], ref, thresholds)
                ),
                None,
            )
            if found is None:
                done = " after the previous step" if step_frames else ""
                return LivenessResult(
                    Decision.CHALLENGE_FAILED,
                    f"We did not see you {_STEP_WORDS[step]}{done}. Try again and follow the "
                    "instructions in the order shown.",
                    step_frames=tuple(step_frames),
                    poses=poses,
                )
            step_frames.append(found)
            at = found

    descriptors = np.stack([np.asarray(f.descriptor, dtype=np.float64) for f in frames])
    distances = pairwise_distances(
        descriptors[:1], descriptors, thresholds.identity_metric, thresholds.identity_centre
    )
    worst = float(distances.max())
    if worst > thresholds.max_identity_distance:
        return LivenessResult(
            Decision.NOT_MATCHED,
            "Not every frame showed the same person. Make sure only you are in front of the "
            "camera for the whole scan.",
            step_frames=tuple(step_frames),
            max_identity_distance=worst,
            poses=poses,
        )

    thumbs = np.stack([f.thumbnail.astype(np.int16) for f in frames])
    for i in range(len(frames)):
        diffs = np.abs(thumbs[i + 1 :] - thumbs[i]).mean(axis=(1, 2))
        if np.any(diffs <= thresholds.duplicate_max_mean_abs_diff):
            return LivenessResult(
                Decision.CHALLENGE_FAILED,
                "Some frames were identical copies. Try again with the live camera, moving as "
                "each instruction asks.",
                step_frames=tuple(step_frames),
                max_identity_distance=worst,
                poses=poses,
            )

    parallax: float | None = None
    # Turns move the nose off the face's plane for any landmark layout; a look
    # up or down does so measurably only for the 68 points' homography (the 5
    # points' measure is the nose's offset along the eye line).
    with_68 = all(f.landmarks_68 is not None for f in frames)
    points = [
        f.landmarks_68 if with_68 and f.landmarks_68 is not None else f.landmarks for f in frames
    ]
    depth_steps = {Step.TURN_LEFT, Step.TURN_RIGHT}
    if points[0].shape[0] == 68:
        depth_steps |= {Step.LOOK_UP, Step.LOOK_DOWN}
    moved = [i for s, i in zip(steps, step_frames, strict=True) if s in depth_steps]
    if moved:
        parallax = max(parallax_residual(points[0], points[i]) for i in moved)
        needed = thresholds.min_parallax_68 if len(points[0]) == 68 else thresholds.min_parallax
        if parallax < needed:
            return LivenessResult(
                Decision.SPOOF_SUSPECTED,
                "Your head movement looked flat, like a picture being moved. Use a live camera "
                "and turn your head, not the device.",
                step_frames=tuple(step_frames),
                max_identity_distance=worst,
                parallax=parallax,
                poses=poses,
            )

    scores = [f.live_score for f in frames if f.live_score is not None]
    passive = float(np.mean(scores)) if scores else None
    if passive is not None and passive < thresholds.passive_threshold:
        return LivenessResult(
            Decision.SPOOF_SUSPECTED,
            "The picture did not look like a live face. Scan in good light, without a screen "
            "or printed photo in front of the camera.",
            step_frames=tuple(step_frames),
            max_identity_distance=worst,
            parallax=parallax,
            passive_score=passive,
            poses=poses,
        )
    return LivenessResult(
        None,
        "Liveness confirmed.",
        step_frames=tuple(step_frames),
        max_identity_distance=worst,
        parallax=parallax,
        passive_score=passive,
        poses=poses,
    )
