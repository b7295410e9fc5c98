"""Quality gates for one face: size, sharpness, exposure and head pose, with stated limits.

The limits are the ``quality`` settings (:class:`facesvc.config.QualitySettings`, which
gives the reason for each default).

A scan is only worth matching when the face is large, sharp, well lit and roughly frontal;
otherwise the matcher's error rates (calibrated on good faces) do not hold, and the person
is better served by "come closer" or "face the camera" than by a false NOT_MATCHED.

Measurements (``assess_quality``):

- face size: the geometric mean of the detector box's sides, in source-image pixels
  (``face_size``): dlib's boxes are square, YuNet's and SCRFD's taller than wide around
  the same face, and the mean of the sides measures them alike (on the astronaut photo:
  MMOD 96x95, YuNet 91x111; 95 and 101);
- sharpness: variance of the 4-neighbour Laplacian of the grey aligned chip's central
  region (the face; the chip's margins are background), in grey levels squared at a
  standard contrast (``sharpness``). Because the
  chip has a fixed size, this measures the face's detail at the matcher's scale: a small
  face upsampled into the chip measures blurry, as it is for the matcher;
- exposure: mean grey level (0-255) of the inner face in the source image (the central
  half of the detector's box: eyes, nose and mouth, not dark hair or background) and the
  fraction of it that is clipped (grey <= 5 or >= 250, or outside the frame);
- head pose from five landmarks (``head_pose``), measured against the pack's own frontal
  geometry (``FrontalGeometry``: where its landmark model puts the nose in a frontal face).

Choosing the face (``select_face``), the rule for "exactly one usable face":

- no detection at all: NO_FACE;
- the chosen face is the one with the largest box area;
- another face is *comparable* when its box area is at least
  ``QualitySettings.second_face_area_ratio`` (0.5) times the chosen one's and its size
  is at least ``min_face_px``; any comparable face makes the frame MULTIPLE_FACES (someone
  else close to the camera could be the one scanned). Smaller faces (people in the
  background) are ignored;
- a chosen face smaller than ``min_face_px`` is not NO_FACE but LOW_QUALITY ("come closer").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from facesvc.config import QualitySettings
from facesvc.models.alignment import ARCFACE_TEMPLATE_112, DLIB_MEAN_FACE_5
from facesvc.models.types import Box, Detection, Points, RGBImage

# Head model for ``head_pose``, in units of the distance between the eye centres: the nose
# point lies _NOSE_DEPTH of it in front of the eyes: 26 mm for 58 mm, the depth of the eye
# corners behind the nose in the generic 3D face model used for perspective-n-point head
# pose. (Its drop below the eye line comes from each layout's mean face.)
_NOSE_DEPTH = 0.45


# Sharpness is measured as if the face region had this standard deviation of grey levels
# (typical of an evenly lit face), amplifying a dim face by at most this factor so that
# sensor noise in a nearly flat image is not mistaken for detail.
_STANDARD_CONTRAST = 40.0
_MAX_CONTRAST_GAIN = 4.0


class LandmarkLayout(StrEnum):
    """Which points a landmark array holds."""

    DLIB_5 = "dlib_5"
    """dlib's 5-point model: corners of the image-right eye (0, 1), of the image-left eye
    (2, 3), bottom of the nose (4)."""
    DLIB_68 = "dlib_68"
    """dlib's (iBUG) 68 points: eyes 36-41 and 42-47, bottom of the nose 33."""
    ARCFACE_5 = "arcface_5"
    """SCRFD/ArcFace five points: eyes (0, 1), nose tip (2), mouth corners (3, 4)."""


class Check(StrEnum):
    """The quality checks, as named in a report's issues."""

    FACE_SIZE = "face_size"
    SHARPNESS = "sharpness"
    BRIGHTNESS = "brightness"
    CLIPPING = "clipping"
    YAW = "yaw"
    PITCH = "pitch"


@dataclass(frozen=True, slots=True)
class QualityIssue:
    """A failed check and a sentence for the person in front of the camera."""

    check: Check
    reason: str


@dataclass(frozen=True, slots=True)
class HeadPose:
    """Head rotation in degrees: ``yaw`` positive when the nose points to the image's
    right, ``pitch`` positive when the chin is raised, ``roll`` positive when the eye line
    turns clockwise in the image."""

    yaw: float
    pitch: float
    roll: float


@dataclass(frozen=True, slots=True)
class QualityReport:
    """Every measured value (units in ``assess_quality``) and the checks that failed."""

    face_px: float
    sharpness: float
    brightness: float
    clipped_fraction: float
    pose: HeadPose
    issues: tuple[QualityIssue, ...]

    @property
    def passed(self) -> bool:
        return not self.issues


class FaceChoice(StrEnum):
    """Outcome of ``select_face``."""

    ONE = "ONE"
    NO_FACE = "NO_FACE"
    MULTIPLE_FACES = "MULTIPLE_FACES"


@dataclass(frozen=True, slots=True)
class FaceSelection:
    """``index`` of the chosen detection (None for NO_FACE) and why."""

    choice: FaceChoice
    index: int | None
    reason: str


def face_size(box: Box) -> float:
    """A face's size in pixels: the geometric mean of its box's sides (module doc)."""
    return math.sqrt(max(box.width, 0.0) * max(box.height, 0.0))


def select_face(detections: Sequence[Detection], limits: QualitySettings) -> FaceSelection:
    """Apply the module's "exactly one usable face" rule to one frame's detections."""
    if not detections:
        return FaceSelection(
            FaceChoice.NO_FACE,
            None,
            "no face found: face the camera, close enough for your face to fill a good part "
            "of the picture, in good light",
        )
    areas = [d.box.area for d in detections]
    chosen = max(range(len(detections)), key=lambda i: (areas[i], detections[i].score))
    for i, d in enumerate(detections):
        if i == chosen:
            continue
        comparable = areas[i] >= limits.second_face_area_ratio * areas[chosen]
        if comparable and face_size(d.box) >= limits.min_face_px:
            return FaceSelection(
                FaceChoice.MULTIPLE_FACES,
                chosen,
                "more than one face is close to the camera: only the person scanning "
                "should be in the picture",
            )
    return FaceSelection(FaceChoice.ONE, chosen, "one face")


def assess_quality(
    image: RGBImage,
    detection: Detection,
    landmarks: Points,
    layout: LandmarkLayout,
    chip: RGBImage,
    limits: QualitySettings,
    frontal: FrontalGeometry | None = None,
) -> QualityReport:
    """Measure the face in ``detection`` (box in pixels of the (H, W, 3) uint8 ``image``)
    with its landmarks (image pixels, in ``layout``; ``frontal``: the pack's frontal
    geometry for them) and its aligned (S, S, 3) uint8 chip; the detector's own points, when
    it gives them, also measure the yaw for the profile gate (:func:`profile_yaw`)."""
    face_px = face_size(detection.box)
    sharp = sharpness(_chip_face(_grey(chip)))
    brightness, clipped = exposure(image, detection.box)
    pose = head_pose(landmarks, layout, frontal)

    issues: list[QualityIssue] = []
    if face_px < limits.min_face_px:
        issues.append(
            QualityIssue(
                Check.FACE_SIZE,
                f"the face is {face_px:.0f} px, at least {limits.min_face_px} px is needed: "
                "come closer to the camera",
            )
        )
    if sharp < limits.min_sharpness:
        issues.append(
            QualityIssue(
                Check.SHARPNESS,
                f"the face is blurred (sharpness {sharp:.1f} < {limits.min_sharpness:g}): "
                "hold still and clean the lens",
            )
        )
    if not limits.min_brightness <= brightness <= limits.max_brightness:
        too = "dark" if brightness < limits.min_brightness else "bright"
        issues.append(
            QualityIssue(
                Check.BRIGHTNESS,
                f"the face is too {too} (mean grey {brightness:.0f}, allowed "
                f"{limits.min_brightness:g}-{limits.max_brightness:g}): "
                + ("find more light" if too == "dark" else "avoid direct light on the face"),
            )
        )
    if clipped > limits.max_clipped_fraction:
        issues.append(
            QualityIssue(
                Check.CLIPPING,
                f"{clipped:.0%} of the face is pure black or white (at most "
                f"{limits.max_clipped_fraction:.0%}): even out the light and keep the whole "
                "face in the picture",
            )
        )
    issues.extend(pose_issues(pose, profile_yaw(detection.landmarks), limits))
    return QualityReport(face_px, sharp, brightness, clipped, pose, tuple(issues))


def sharpness(grey: npt.NDArray[np.float64]) -> float:
    """Variance of the 4-neighbour Laplacian over the interior of a (H, W) grey image
    (H, W >= 3), in grey levels squared, measured at a standard contrast.

    The image is first scaled to a standard deviation of ``_STANDARD_CONTRAST`` grey levels
    (gain at most ``_MAX_CONTRAST_GAIN``), so that a dim but focused face is reported as
    dark rather than as blurred: the Laplacian's variance grows with the square of contrast.
    """
    spread = float(grey.std())
    gain = min(_STANDARD_CONTRAST / spread, _MAX_CONTRAST_GAIN) if spread > 0 else 1.0
    lap = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    return float(lap.var()) * gain * gain


@dataclass(frozen=True, slots=True)
class FrontalGeometry:
    """Where a pack's nose point sits in a frontal face, for its landmark ``layout``.

    ``nose_drop``: the nose point's distance below the eye line, in eye distances. It
    depends on the landmark model more than on the person: dlib's 5-point model marks the
    bottom of the nose, SCRFD and YuNet the tip, and each model places it its own way, so
    a constant taken from another model's mean face turns a frontal face into a tilted
    one. ``facesvc calibrate`` measures it on the calibration photos (their median) and
    the calibration record carries it; without one, the layout's mean face gives it.
    ``nose_depth``: the nose point's distance in front of the eyes, in eye distances.
    """

    layout: LandmarkLayout
    nose_drop: float
    nose_depth: float = _NOSE_DEPTH

    @staticmethod
    def of_layout(layout: LandmarkLayout) -> FrontalGeometry:
        """The geometry of the layout's mean face (dlib's templates, ArcFace's template)."""
        frontal = _FRONTAL[layout]
        eye_dist = float(np.hypot(*(frontal[0] - frontal[1])))
        drop = float((frontal[2, 1] - (frontal[0, 1] + frontal[1, 1]) / 2) / eye_dist)
        return FrontalGeometry(layout, drop)


def nose_drop(landmarks: Points, layout: LandmarkLayout) -> float:
    """The nose point's distance below the eye line of one face, in eye distances (roll
    removed): what ``FrontalGeometry.nose_drop`` is the frontal value of."""
    _, _, _, nose_y = _eye_frame(np.asarray(landmarks, dtype=np.float64), layout)
    return nose_y


def head_pose(
    landmarks: Points, layout: LandmarkLayout, frontal: FrontalGeometry | None = None
) -> HeadPose:
    """Yaw, pitch and roll of a head from its eye centres and nose point.

    Weak-perspective model: in a frontal face the nose point lies ``frontal.nose_drop``
    below the eye line (default: the layout's mean face) and ``frontal.nose_depth``
    eye-distances in front of the eyes. Yaw comes from the nose's sideways shift against
    the eye distance. Pitch comes from the nose's drop below the eye line, which shrinks
    fast for chin up and slowly for chin down; of the two angles that fit, the smaller one
    is reported, so treat pitch as a coarse gate. On ../shared/data/poses (42 labelled
    photos, 5 people plus 12 AFLW2000 faces) yaw came out with the right sign, up to 1.5
    times too large, and pitch within 9 degrees on average (dlib's 5 points).
    """
    geometry = frontal or FrontalGeometry.of_layout(layout)
    if geometry.layout is not layout:
        raise ValueError(f"frontal geometry for {geometry.layout} applied to {layout} landmarks")
    _, roll, nose_x, nose_y = _eye_frame(np.asarray(landmarks, dtype=np.float64), layout)
    depth, drop = geometry.nose_depth, geometry.nose_drop
    yaw = math.atan(nose_x / depth)
    # nose_y ~ drop*cos(pitch) - depth*sin(pitch) = amp*cos(pitch + shift), in eye
    # distances. The eye distance is taken as seen, not corrected by cos(yaw): the yaw
    # estimate is the less certain one, and correcting by it made turned heads look raised.
    amp = math.hypot(drop, depth)
    shift = math.atan2(depth, drop)
    ratio = min(max(nose_y / amp, -1.0), 1.0)
    spread = math.acos(ratio)
    pitch = min((spread - shift, -spread - shift), key=abs)
    return HeadPose(math.degrees(yaw), math.degrees(pitch), math.degrees(roll))


def profile_yaw(detector_points: Points | None) -> float | None:
    """The yaw in degrees that a detector's own five points (ArcFace layout: YuNet, SCRFD)
    measure, for the profile gate; None when the detector gives no five points.

    A landmark model fitted inside the detector's box draws the points where a face usually
    has them, and on a profile it draws a frontal face: AFLW2000-3D image00475, labelled
    65.6 degrees of yaw, measures 13 degrees from dlib's five points and 71 from YuNet's,
    which the detector finds in the whole picture. Such profiles were the closest impostor
    pairs of the calibration (two profiles of different men at cosine distance 0.55).
    """
    if detector_points is None or len(detector_points) != 5:
        return None
    return head_pose(detector_points, LandmarkLayout.ARCFACE_5).yaw


def pose_issues(
    pose: HeadPose, profile: float | None, limits: QualitySettings
) -> tuple[QualityIssue, ...]:
    """The pose checks that fail for a face: ``pose`` from the pack's landmarks against the
    yaw and pitch gates, ``profile`` (:func:`profile_yaw`, None: not measured) against the
    profile gate."""
    issues: list[QualityIssue] = []
    if abs(pose.yaw) > limits.max_abs_yaw_deg:
        issues.append(
            QualityIssue(
                Check.YAW,
                f"the head is turned {abs(pose.yaw):.0f} degrees sideways (at most "
                f"{limits.max_abs_yaw_deg:g}): look straight at the camera",
            )
        )
    elif profile is not None and abs(profile) > limits.max_profile_yaw_deg:
        issues.append(
            QualityIssue(
                Check.YAW,
                f"the head is turned about {abs(profile):.0f} degrees sideways, in profile "
                f"(at most {limits.max_abs_yaw_deg:g}): look straight at the camera",
            )
        )
    if abs(pose.pitch) > limits.max_abs_pitch_deg:
        issues.append(
            QualityIssue(
                Check.PITCH,
                f"the head is tilted {abs(pose.pitch):.0f} degrees up or down (at most "
                f"{limits.max_abs_pitch_deg:g}): look straight at the camera",
            )
        )
    return tuple(issues)


def _eye_frame(
    points: npt.NDArray[np.float64], layout: LandmarkLayout
) -> tuple[float, float, float, float]:
    """(eye distance in pixels, roll in radians, nose x and nose y in eye distances): the
    nose point relative to the mid-point of the eyes, in the frame of the eye line."""
    eye_a, eye_b, nose = _eyes_and_nose(points, layout)
    # Eye on the image's left first, so a level face has roll 0.
    left, right = (eye_a, eye_b) if eye_a[0] <= eye_b[0] else (eye_b, eye_a)
    eye_vec = right - left
    eye_dist = float(np.hypot(*eye_vec))
    if eye_dist == 0:
        raise ValueError("the two eyes are at the same point: landmarks are degenerate")
    roll = math.atan2(eye_vec[1], eye_vec[0])
    c, s = math.cos(-roll), math.sin(-roll)
    rel = nose - (left + right) / 2
    nose_x = (c * rel[0] - s * rel[1]) / eye_dist
    nose_y = (s * rel[0] + c * rel[1]) / eye_dist
    return eye_dist, roll, nose_x, nose_y


# Mean-face positions of (eye, eye, nose) for each layout, any consistent unit.
_FRONTAL: dict[LandmarkLayout, npt.NDArray[np.float64]] = {
    LandmarkLayout.DLIB_5: np.stack(
        [
            DLIB_MEAN_FACE_5[0:2].mean(axis=0),
            DLIB_MEAN_FACE_5[2:4].mean(axis=0),
            DLIB_MEAN_FACE_5[4],
        ]
    ),
    # dlib's 68-point mean face (get_face_chip_details): eye centres and point 33.
    LandmarkLayout.DLIB_68: np.array(
        [[0.225492, 0.215990], [0.754761, 0.215990], [0.490127, 0.628106]]
    ),
    LandmarkLayout.ARCFACE_5: ARCFACE_TEMPLATE_112[:3].astype(np.float64),
}
_POINT_COUNTS = {LandmarkLayout.DLIB_5: 5, LandmarkLayout.DLIB_68: 68, LandmarkLayout.ARCFACE_5: 5}


def _eyes_and_nose(
    points: npt.NDArray[np.float64], layout: LandmarkLayout
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Both eye centres and the nose point of one face."""
    if points.shape != (_POINT_COUNTS[layout], 2):
        raise ValueError(
            f"{layout} landmarks must be ({_POINT_COUNTS[layout]}, 2), got {points.shape}"
        )
    if layout is LandmarkLayout.DLIB_5:
        return points[0:2].mean(axis=0), points[2:4].mean(axis=0), points[4]
    if layout is LandmarkLayout.DLIB_68:
        return points[36:42].mean(axis=0), points[42:48].mean(axis=0), points[33]
    return points[0], points[1], points[2]


def exposure(image: RGBImage, box: Box) -> tuple[float, float]:
    """Mean grey level (0-255) and clipped fraction of the inner face: the central half (in
    width and height) of the detector's ``box`` in the (H, W, 3) uint8 ``image``, which holds
    eyes, nose and mouth but not the hair or background. Clipped pixels are grey <= 5 or
    >= 250; the part of the region outside the frame counts as clipped."""
    cx, cy = (box.left + box.right) / 2, (box.top + box.bottom) / 2
    half_w, half_h = box.width / 4, box.height / 4
    left, right = round(cx - half_w), round(cx + half_w)
    top, bottom = round(cy - half_h), round(cy + half_h)
    area = max(right - left, 1) * max(bottom - top, 1)
    height, width = image.shape[:2]
    region = image[
        max(top, 0) : max(min(bottom, height), 0), max(left, 0) : max(min(right, width), 0)
    ]
    if not region.size:
        return 0.0, 1.0
    grey = _grey(region)
    clipped = int(np.count_nonzero((grey <= 5) | (grey >= 250))) + area - grey.size
    return float(grey.mean()), clipped / area


def _grey(rgb: RGBImage) -> npt.NDArray[np.float64]:
    """(H, W) float64 luma (ITU-R BT.601) of (H, W, 3) RGB pixels."""
    values = rgb.astype(np.float64)
    return 0.299 * values[..., 0] + 0.587 * values[..., 1] + 0.114 * values[..., 2]


def _chip_face(grey: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The central two thirds of an aligned chip: the face without the chip's margins."""
    h, w = grey.shape
    return grey[h // 6 : h - h // 6, w // 6 : w - w // 6]
