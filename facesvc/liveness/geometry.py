"""Depth from a scan's landmarks: what a flat picture cannot show, however it is moved.

A flat picture (a print or a screen), however it is held, tilted, turned or brought closer,
maps between two camera frames by one homography. A real head turning shows parallax:
points that stand out of the face (the nose) or lie behind it (the jaw line, the temples)
move against the homography that carries the rest. With an affine camera this is the
plane-plus-parallax model

    x_ij = H_i(x_0j) + g_j * d_i

for landmark j in frame i against the scan's first (frontal) frame 0: ``g_j`` is the point's
depth off the face's plane, one value per point for every frame (the head is rigid), and
``d_i`` one 2D vector per frame, which grows with the head's rotation from frame 0 and
points along the turn (across the eye line for a turn, down the face for a look up).

:func:`depth_motion` fits that model for every frame against frame 0, with ``g`` the depth
profile of a real face in dlib's 68-point layout (``FACE_DEPTH_68``), and reports ``d_i`` in
the frontal face's own axes. A turn is then measured as parallax, not as the apparent yaw of
five points, which a tilted flat picture fakes by perspective alone (a print tilted 50
degrees about a diagonal measured an apparent yaw of 27-38 degrees). :func:`depth_profile`
fits ``g`` freely across all moved frames at once (one rank-1 factorisation of every
frame's residual) and compares its shape with a real face's: the inter-point depth order
(nose in front of the eye corners, the jaw line behind) that a rigid head shows in every
frame, and that a landmark model's guesses on a distorted flat face need not.

Units: each frame's points are centred and scaled to unit RMS radius before fitting, so
``d`` is independent of the face's size in the frame and of coming closer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from facesvc.models.types import Points

F64 = npt.NDArray[np.float64]

# 68-point (iBUG) index pairs swapped by a left-right mirror of the face.
# fmt: off
_MIRROR_68 = np.array([
    16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,  # jaw
    26, 25, 24, 23, 22, 21, 20, 19, 18, 17,  # brows
    27, 28, 29, 30, 35, 34, 33, 32, 31,  # nose
    45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,  # eyes
    54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,  # outer lips
    64, 63, 62, 61, 60, 67, 66, 65,  # inner lips
])
# fmt: on

# fmt: off
_FACE_DEPTH_MEASURED = np.array([
    -0.2600, -0.2485, -0.2481, -0.2425, -0.2063, -0.1495, -0.0854, -0.0210, 0.0012, -0.0210,
    -0.0854, -0.1495, -0.2063, -0.2425, -0.2481, -0.2485, -0.2600, -0.0172, 0.0113, 0.0319,
    0.0513, 0.0693, 0.0693, 0.0513, 0.0319, 0.0113, -0.0172, 0.0757, 0.1215, 0.1727,
    0.2246, 0.1022, 0.1174, 0.1302, 0.1174, 0.1022, -0.0227, -0.0104, -0.0171, -0.0272,
    -0.0183, -0.0116, -0.0272, -0.0171, -0.0104, -0.0227, -0.0116, -0.0183, 0.0149, 0.0857,
    0.1250, 0.1290, 0.1250, 0.0857, 0.0149, 0.0649, 0.0942, 0.0972, 0.0942, 0.0649,
    0.0247, 0.1071, 0.1139, 0.1071, 0.0247, 0.0999, 0.1067, 0.0999,
])
# fmt: on

FACE_DEPTH_68: F64 = (_FACE_DEPTH_MEASURED + _FACE_DEPTH_MEASURED[_MIRROR_68]) / 2
"""Depth of each of dlib's 68 points off the face's plane, toward the camera positive, in
arbitrary units (only its shape matters: every use re-projects and rescales it).

Measured, not modelled: the mean plane-plus-parallax depth profile (``depth_profile``'s
fit, one moved frame at a time) of 54 real head movements of one man, in the points of the
liveness landmark stage (``facesvc.models.dense_landmarks``): ../shared/data/poses, freefield
sets A and B, each of 3 frontal photos against each of 3 turns left, 3 turns right and 3
look-ups of about 30 degrees; made left-right symmetric. The
nose tip (30) stands out most; the jaw line's ends (0, 16) lie deepest; eye corners and
brows stay near the plane. That man's head is no one else's, but the order of these depths
is every head's, and the checks use only the profile's shape (``depth_profile``) and its
projection (``depth_motion``)."""

NOSE_TIP_68 = 30
OUTER_EYE_CORNERS_68 = (36, 45)


def normalised(points: Points) -> F64:
    """(K, 2) points centred on their mean and scaled to unit RMS radius."""
    p = np.asarray(points, dtype=np.float64)
    centred = p - p.mean(axis=0)
    radius = float(np.sqrt((centred**2).sum(axis=1).mean()))
    if radius == 0:
        raise ValueError("the landmarks all coincide")
    out: F64 = centred / radius
    return out


def fit_homography(src: F64, dst: F64) -> F64:
    """3x3 homography H with dst ~ H @ src, by normalised DLT over (K >= 4, 2) points."""
    t_src, t_dst = _hartley(src), _hartley(dst)
    a = _homogeneous(src) @ t_src.T
    b = _homogeneous(dst) @ t_dst.T
    k = len(a)
    rows = np.zeros((2 * k, 9))
    # Each correspondence gives two rows of the DLT system A h = 0.
    rows[0::2, 3:6] = -b[:, 2:3] * a
    rows[0::2, 6:9] = b[:, 1:2] * a
    rows[1::2, 0:3] = b[:, 2:3] * a
    rows[1::2, 6:9] = -b[:, 0:1] * a
    # The null vector of A: the eigenvector of the 9x9 A^T A with the smallest eigenvalue.
    # After Hartley normalisation that is as exact as A's SVD here and a hundred times
    # cheaper (the full SVD of the 2K x 9 A builds a 2K x 2K U: 28 ms on a busy machine).
    _, vectors = np.linalg.eigh(rows.T @ rows)
    h_norm = vectors[:, 0].reshape(3, 3)
    h: F64 = np.linalg.inv(t_dst) @ h_norm @ t_src
    out: F64 = h / h[2, 2]
    return out


def _hartley(p: F64) -> F64:
    # Centroid to origin, mean distance sqrt(2): without it the DLT's least squares is
    # badly conditioned in pixels.
    c = p.mean(axis=0)
    d = np.sqrt(((p - c) ** 2).sum(axis=1)).mean()
    s = np.sqrt(2.0) / max(float(d), 1e-12)
    return np.array([[s, 0.0, -s * c[0]], [0.0, s, -s * c[1]], [0.0, 0.0, 1.0]])


def apply_homography(h: F64, points: F64) -> F64:
    """(K, 2) points mapped by the 3x3 homography ``h``."""
    mapped = _homogeneous(points) @ h.T
    out: F64 = mapped[:, :2] / mapped[:, 2:3]
    return out


def _homogeneous(p: F64) -> F64:
    out: F64 = np.hstack([p, np.ones((len(p), 1))])
    return out


def _dlt(src: F64, dst: F64) -> F64:
    """``fit_homography`` for points already centred and of unit RMS radius (``normalised``):
    ``src`` (K, 3) homogeneous, ``dst`` (K, 2). Hartley's normalisation would be nearly the
    identity here; skipping it and the inverses halves the cost of the fits that
    ``depth_motion`` and ``depth_profile`` repeat for every frame."""
    k = len(src)
    rows = np.zeros((2 * k, 9))
    rows[0::2, 3:6] = -src
    rows[0::2, 6:9] = dst[:, 1:2] * src
    rows[1::2, 0:3] = src
    rows[1::2, 6:9] = -dst[:, 0:1] * src
    _, vectors = np.linalg.eigh(rows.T @ rows)
    h = vectors[:, 0].reshape(3, 3)
    out: F64 = h / h[2, 2]
    return out


def _mapped(h: F64, src: F64) -> F64:
    """(K, 2) homogeneous (K, 3) points mapped by ``h``."""
    m = src @ h.T
    out: F64 = m[:, :2] / m[:, 2:3]
    return out


def _gauge(reference: F64) -> F64:
    """Orthonormal (K, 3) basis of what a homography absorbs of a depth profile: any
    depth that is an affine function of the reference's (x, y) is just another plane."""
    q, _ = np.linalg.qr(np.c_[np.ones(len(reference)), reference])
    out: F64 = q
    return out


def _off_plane(depth: F64, reference: F64) -> F64:
    """``depth`` minus its affine part over ``reference``, scaled to unit length."""
    q = _gauge(reference)
    rest = depth - q @ (q.T @ depth)
    out: F64 = rest / max(float(np.linalg.norm(rest)), 1e-12)
    return out


@dataclass(frozen=True, slots=True)
class DepthMotion:
    """The parallax of one frame against the frontal frame 0 (module doc).

    ``along``: the parallax component along frame 0's eye line, toward image right
    positive (a head turning its nose toward image right); ``down``: across it, toward
    the chin positive (a head looking down moves the nose down against the face's plane;
    looking up gives a negative value). Both are ``d`` of the model, in units of the face's
    RMS radius per unit of ``FACE_DEPTH_68`` scaled to unit length: a real 30-degree turn
    measured 0.95-1.9 on ../shared/data/poses. ``plane_rms``: RMS distance of the points
    from the best homography alone; ``rest_rms``: from the homography plus the depth
    parallax (what neither explains: landmark noise, expression).
    """

    along: float
    down: float
    plane_rms: float
    rest_rms: float


def depth_motion(frames: Sequence[Points], depth: F64 = FACE_DEPTH_68) -> tuple[DepthMotion, ...]:
    """The plane-plus-parallax fit of every frame after the first against the first, with
    the fixed depth profile ``depth`` (K,): F - 1 ``DepthMotion``s for F (K, 2) frames."""
    pts = [normalised(p) for p in frames]
    ref = pts[0]
    ref_h = _homogeneous(ref)
    g = _off_plane(np.asarray(depth, dtype=np.float64), ref)
    axis = ref[OUTER_EYE_CORNERS_68[1]] - ref[OUTER_EYE_CORNERS_68[0]]
    axis = axis / np.linalg.norm(axis)
    # Image y grows down, so the perpendicular that points from the eyes to the chin is
    # the eye axis turned +90 degrees.
    down_axis = np.array([-axis[1], axis[0]])
    out = []
    for moved in pts[1:]:
        d = np.zeros(2)
        plane_rms = 0.0
        # Alternate: the homography of what is not parallax, then the parallax of what
        # the homography leaves. A few rounds converge: g is orthogonal to what an affine
        # map absorbs, and a face's perspective is mild.
        for round_ in range(4):
            h = _dlt(ref_h, moved - np.outer(g, d))
            residual = moved - _mapped(h, ref_h)
            if round_ == 0:
                plane_rms = _rms(residual)
            d = g @ residual
        rest = residual - np.outer(g, d)
        out.append(
            DepthMotion(
                along=float(d @ axis),
                down=float(d @ down_axis),
                plane_rms=plane_rms,
                rest_rms=_rms(rest),
            )
        )
    return tuple(out)


def _rms(residual: F64) -> float:
    return float(np.sqrt((residual**2).sum(axis=1).mean()))


@dataclass(frozen=True, slots=True)
class DepthProfile:
    """One depth per point fitted freely across all moved frames (``depth_profile``).

    ``face_likeness``: cosine between that profile and a real face's (``FACE_DEPTH_68``),
    both without their planar part, in [-1, 1]; real head movements measured 0.76-0.99 on
    ../shared/data/poses. ``rigidity``: the share of all frames' off-homography motion
    that one depth profile explains (1: a perfectly rigid body; landmark noise spreads
    over every direction and explains little).
    """

    face_likeness: float
    rigidity: float


def depth_profile(
    frames: Sequence[Points], moved: Sequence[int], depth: F64 = FACE_DEPTH_68
) -> DepthProfile:
    """Fit ``x_ij = H_i(x_0j) + g_j d_i`` with ``g`` free over the frames ``moved`` (indices
    into ``frames``, not 0) and compare ``g`` with ``depth``.

    The sign of a fitted profile is arbitrary (``g d`` = ``(-g)(-d)``); it is taken so that
    the nose tip stands out, as on every face."""
    pts = [normalised(p) for p in frames]
    ref = pts[0]
    ref_h = _homogeneous(ref)
    q = _gauge(ref)
    parallax = np.zeros((len(moved), len(ref), 2))
    for _ in range(4):
        residuals = []
        for k, i in enumerate(moved):
            h = _dlt(ref_h, pts[i] - parallax[k])
            residuals.append(pts[i] - _mapped(h, ref_h))
        # (K, 2M): every moved frame's x and y residuals as columns.
        m = np.stack(residuals, axis=1).reshape(len(ref), -1)
        m = m - q @ (q.T @ m)
        # The rank-1 part of m from the 2M x 2M m^T m: its top eigenvector is the first
        # right singular vector, its eigenvalue the first singular value squared.
        values, vectors = np.linalg.eigh(m.T @ m)
        top = max(float(values[-1]), 0.0)
        v = vectors[:, -1]
        u = m @ v / max(np.sqrt(top), 1e-12)
        parallax = np.einsum("k,mc->mkc", u, (np.sqrt(top) * v).reshape(len(moved), 2))
    g = u if u[NOSE_TIP_68] >= 0 else -u
    energy = float(np.trace(m.T @ m))
    return DepthProfile(
        face_likeness=float(g @ _off_plane(np.asarray(depth, dtype=np.float64), ref)),
        rigidity=top / energy if energy > 0 else 0.0,
    )
