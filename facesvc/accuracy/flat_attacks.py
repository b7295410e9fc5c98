"""Flat-picture attacks rendered from real photos: what a camera sees when someone holds a
print or a phone screen of a face in front of it and moves it to answer a challenge.

The picture is a sheet (a print) or a rigid plane (a screen) in front of a pinhole camera.
It can be held square to the camera, turned or tilted about any axis in its own plane
(horizontal, vertical, any diagonal), rolled in its plane, moved sideways, brought closer
or moved away, and a print can be bent a little (a cylinder of radius several times the
picture's width, about any axis). Each camera pixel's ray is intersected with the sheet
analytically (a plane or a cylinder), so perspective and bending are exact, not
approximated by one homography; where the ray misses the picture the camera sees a plain
background.

A scan page sends each pose as more than one frame, and no hand holds a picture still:
:func:`hand_shake` gives poses a degree or so apart, so an attack's frames are never
pixel copies of each other (which the duplicate check would refuse for another reason).

Evaluation and tests only (``facesvc/accuracy/challenges.py``, tests/); the service
never imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from facesvc.models.types import Box, RGBImage

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Hold:
    """How the picture is held, relative to its start: square to the camera, its face at the
    centre of the frame, at the distance where the face looks ``face_px`` wide.

    ``tilt_deg`` turns the picture about an axis in its own plane through the face's
    centre, at ``axis_deg`` from the picture's horizontal (0: a horizontal axis, the top
    leaning away for positive tilt; 90: a vertical axis, the picture's right edge moving
    away; 45 and 135: the diagonals). ``roll_deg`` turns it in its own plane, clockwise as
    seen. ``distance`` scales the start distance (2/3: brought 1.5 times closer).
    ``shift`` moves it sideways and up/down by fractions of the frame's width and height.
    ``bend`` is the curvature of a print bent into a cylinder, in units of 1 / the face's
    width (0.2: radius five face widths; positive bulges toward the camera), about an axis
    at ``bend_axis_deg`` in the picture's plane (90: a vertical fold line).
    """

    tilt_deg: float = 0.0
    axis_deg: float = 0.0
    roll_deg: float = 0.0
    distance: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    bend: float = 0.0
    bend_axis_deg: float = 90.0

    def describe(self) -> str:
        """A short label for reports ("tilt 30 about 45 deg, 1.5x closer, bent +0.2")."""
        parts = []
        if self.tilt_deg:
            parts.append(f"tilt {self.tilt_deg:+g} about {self.axis_deg:g} deg")
        if self.roll_deg:
            parts.append(f"roll {self.roll_deg:+g}")
        if self.distance != 1.0:
            factor = 1 / self.distance
            parts.append(f"{factor:.2g}x closer" if factor > 1 else f"{1 / factor:.2g}x farther")
        if self.shift != (0.0, 0.0):
            parts.append(f"shift {self.shift[0]:+g},{self.shift[1]:+g}")
        if self.bend:
            parts.append(f"bent {self.bend:+g} about {self.bend_axis_deg:g} deg")
        return ", ".join(parts) or "square"


@dataclass(frozen=True, slots=True)
class Camera:
    """A pinhole camera: ``width`` x ``height`` pixels, focal length ``focal`` times the
    width (0.8-1.0 is a laptop or phone front camera's 55-65 degree field of view)."""

    width: int = 640
    height: int = 480
    focal: float = 0.9
    background: tuple[int, int, int] = (118, 114, 108)

    @property
    def focal_px(self) -> float:
        return self.focal * self.width


def render(
    photo: RGBImage,
    face: Box,
    hold: Hold,
    *,
    camera: Camera = Camera(),
    face_px: float = 200.0,
) -> RGBImage:
    """The (camera.height, camera.width, 3) uint8 frame a camera sees of ``photo`` printed
    (or shown on a screen) and held as ``hold``; ``face`` is the face's box in ``photo``,
    which sets the scale (the face looks ``face_px`` wide when held square at the start)
    and the point the picture turns about."""
    if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
        raise ValueError(f"photo must be (H, W, 3) uint8, got {photo.shape} {photo.dtype}")
    f = camera.focal_px
    # Picture units are the photo's pixels; the start distance puts the face at face_px.
    start = f * face.width / face_px
    centre = np.array(
        [
            hold.shift[0] * camera.width * start * hold.distance / f,
            hold.shift[1] * camera.height * start * hold.distance / f,
            start * hold.distance,
        ]
    )
    rotation = _rotation(hold)
    u, v = np.meshgrid(
        np.arange(camera.width, dtype=np.float64) + 0.5,
        np.arange(camera.height, dtype=np.float64) + 0.5,
    )
    rays = np.stack(
        [(u - camera.width / 2) / f, (v - camera.height / 2) / f, np.ones_like(u)], axis=-1
    )
    # The ray from the camera at the origin, in the picture's frame: origin o, direction d.
    o = rotation.T @ -centre
    d = rays @ rotation  # each row times R, i.e. R^T @ ray
    p, q, hit = _intersect(o, d, hold.bend / face.width, math.radians(hold.bend_axis_deg))
    fx = (face.left + face.right) / 2
    fy = (face.top + face.bottom) / 2
    return _sample(photo, fx + p, fy + q, hit, camera.background)


def _rotation(hold: Hold) -> F64:
    """Columns: the picture's right, down and away-from-camera directions in camera
    coordinates (x right, y down, z forward), after its tilt and roll."""
    a = math.radians(hold.axis_deg)
    axis = np.array([math.cos(a), math.sin(a), 0.0])
    # A positive tilt about the horizontal axis moves the top (y < 0) away (z > 0).
    tilt = _axis_angle(axis, -math.radians(hold.tilt_deg))
    r = math.radians(hold.roll_deg)
    roll = np.array([[math.cos(r), -math.sin(r), 0.0], [math.sin(r), math.cos(r), 0.0], [0, 0, 1]])
    out: F64 = tilt @ roll
    return out


def _axis_angle(axis: F64, angle: float) -> F64:
    """Rodrigues' rotation by ``angle`` radians about the unit ``axis``."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    out: F64 = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)
    return out


def _intersect(
    o: F64, d: F64, curvature: float, bend_axis: float
) -> tuple[F64, F64, npt.NDArray[np.bool_]]:
    """Where rays from ``o`` along ``d`` (H, W, 3) meet the sheet, in the sheet's own
    coordinates (p right, q down, as printed): flat when ``curvature`` is 0, else a cylinder
    of radius 1/|curvature| whose fold line runs at ``bend_axis`` radians in the sheet."""
    if curvature == 0:
        t = -o[2] / d[..., 2]
        hit = t > 0
        return o[0] + t * d[..., 0], o[1] + t * d[..., 1], hit
    # Coordinates across (a) and along (b) the fold line; h stays the sheet's normal.
    c, s = math.cos(bend_axis), math.sin(bend_axis)
    oa, ob = o[0] * s - o[1] * c, o[0] * c + o[1] * s
    da, db = d[..., 0] * s - d[..., 1] * c, d[..., 0] * c + d[..., 1] * s
    radius = 1.0 / abs(curvature)
    # Bulging toward the camera (z < 0 is toward it): the axis lies behind the sheet.
    centre_h = radius if curvature > 0 else -radius
    oh, dh = o[2] - centre_h, d[..., 2]
    qa = da * da + dh * dh
    qb = 2 * (oa * da + oh * dh)
    qc = oa * oa + oh * oh - radius * radius
    disc = qb * qb - 4 * qa * qc
    hit = disc >= 0
    root = np.sqrt(np.where(hit, disc, 0.0))
    # The sheet is the half of the cylinder facing the camera side it bulges to.
    t_near = (-qb - root) / (2 * qa)
    t_far = (-qb + root) / (2 * qa)
    t = t_near if curvature > 0 else t_far
    a = oa + t * da
    h = oh + t * dh  # relative to the cylinder's axis
    b = ob + t * db
    arc = radius * np.arctan2(a, -h if curvature > 0 else h)
    hit &= t > 0
    p = arc * s + b * c
    q = -arc * c + b * s
    return p, q, hit


def _sample(
    photo: RGBImage,
    x: F64,
    y: F64,
    hit: npt.NDArray[np.bool_],
    background: tuple[int, int, int],
) -> RGBImage:
    """Bilinear samples of ``photo`` at pixel-centre coordinates (x, y); the background
    where the ray missed the sheet or landed outside the picture."""
    h, w = photo.shape[:2]
    xs, ys = x - 0.5, y - 0.5
    inside = hit & (xs >= 0) & (ys >= 0) & (xs <= w - 1) & (ys <= h - 1)
    xs = np.clip(np.where(inside, xs, 0), 0, w - 1)
    ys = np.clip(np.where(inside, ys, 0), 0, h - 1)
    x0 = np.minimum(xs.astype(np.intp), w - 2 if w > 1 else 0)
    y0 = np.minimum(ys.astype(np.intp), h - 2 if h > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
    src = photo.astype(np.float64)
    top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx
    bottom = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
    out = top * (1 - fy) + bottom * fy
    out[~inside] = background
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------
# The moves an attacker can make


AXES_DEG = (0.0, 45.0, 90.0, 135.0)
"""Tilt axes in the picture's plane: horizontal, both diagonals, vertical."""


def answering_holds(
    tilts_deg: Sequence[float] = (20.0, 35.0, 50.0),
    distances: Sequence[float] = (1.0, 1 / 1.5),
    bends: Sequence[float] = (0.0, 0.15, -0.15),
) -> Iterator[Hold]:
    """Every hold an attacker could try for one challenge step: each tilt, both ways,
    about each axis of ``AXES_DEG``; each at every distance (held where it started, or
    brought closer to answer COME_CLOSER as well); each flat or bent a little either way
    about the axis it turns about (the way a print flexes when tilted by its edge). A hold
    with no tilt at all (moved closer, or farther) answers COME_CLOSER alone."""
    for distance in (*distances, 1.4):
        if distance != 1.0:
            yield Hold(distance=distance)
    for axis in AXES_DEG:
        for tilt in tilts_deg:
            for sign in (1.0, -1.0):
                for distance in distances:
                    for bend in bends:
                        yield Hold(
                            tilt_deg=sign * tilt,
                            axis_deg=axis,
                            distance=distance,
                            bend=bend,
                            bend_axis_deg=(axis + 90.0) % 180.0 if bend else 90.0,
                        )


def hand_shake(hold: Hold, k: int) -> Hold:
    """The ``k``-th frame of a hand holding ``hold``: half a degree of tilt and roll and a
    pixel or two of drift, different for every ``k`` (0 is ``hold`` itself)."""
    if k == 0:
        return hold
    angle = 2.399963 * k  # the golden angle: successive frames never line up
    return replace(
        hold,
        tilt_deg=hold.tilt_deg + 0.6 * math.cos(angle),
        roll_deg=hold.roll_deg + 0.6 * math.sin(angle),
        shift=(hold.shift[0] + 0.004 * math.sin(angle), hold.shift[1] + 0.004 * math.cos(angle)),
    )
