"""Face alignment: dlib's face chips and generic five-point similarity warps.

Two ways to cut an aligned face out of a frame:

- ``dlib_face_chip`` reproduces ``dlib.get_face_chip(img, det, size, padding)`` (dlib's
  ``get_face_chip_details`` followed by ``extract_image_chip``, dlib/image_transforms/
  interpolation.h) pixel for pixel, because dlib's ResNet was trained on exactly those chips:
  the five landmarks are fitted to dlib's mean-face template with a least-squares similarity
  transform, large faces are first reduced with dlib's 5x5 Gaussian ``pyramid_down<2>`` so
  that bilinear sampling does not alias, and samples that fall outside the (cropped) source
  are black.
- ``warp_to_template`` maps any landmark set onto any template (ArcFace packs use
  ``ARCFACE_TEMPLATE_112``) with a similarity transform and bilinear sampling.

Coordinates are pixels, x to the right and y down; a pixel's centre is at its integer index.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt

from facesvc.models.types import Points, RGBImage

F64 = npt.NDArray[np.float64]

ARCFACE_TEMPLATE_112: Final[Points] = np.array(
    [
        [38.2946, 51.6963],  # left eye (image left)
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float32,
)
"""The standard ArcFace/InsightFace five-point template, (5, 2) pixels in a 112x112 chip."""

DLIB_MEAN_FACE_5: Final[F64] = np.array(
    [
        [0.8595674595992, 0.2134981538014],  # outer corner of the eye on the image right
        [0.6460604764104, 0.2289674387677],  # inner corner of that eye
        [0.1205750620789, 0.2137274526848],  # outer corner of the eye on the image left
        [0.3340850613712, 0.2290642403242],  # inner corner of that eye
        [0.4901123135679, 0.6277975316475],  # bottom of the nose
    ],
    dtype=np.float64,
)
"""dlib's mean face for its 5-point landmark model (get_face_chip_details), (5, 2) in units
of the unpadded chip side, in the order of shape_predictor_5_face_landmarks.dat."""


def similarity_transform(src_points: npt.ArrayLike, dst_points: npt.ArrayLike) -> F64:
    """The least-squares similarity (rotation, uniform scale, translation; no reflection)
    mapping ``src_points`` onto ``dst_points``, both (K, 2) with K >= 2.

    The minimiser dlib's ``find_similarity_transform`` finds with Umeyama's SVD method; in
    two dimensions it has a closed form (complex least squares, z_dst = (a + ib) z_src + t).
    Returns the (2, 3) float64 matrix ``[A | t]`` with ``dst ~= A @ src + t``; when all
    source points coincide, A is the identity (as in dlib).
    """
    src = np.asarray(src_points, dtype=np.float64)
    dst = np.asarray(dst_points, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"need two (K, 2) point sets with K >= 2, got {src.shape} and {dst.shape}")
    mean_src = src.mean(axis=0)
    mean_dst = dst.mean(axis=0)
    sx, sy = (src - mean_src).T
    dx, dy = (dst - mean_dst).T
    spread = float(np.dot(sx, sx) + np.dot(sy, sy))
    if spread == 0:
        a, b = 1.0, 0.0
    else:
        a = float(np.dot(sx, dx) + np.dot(sy, dy)) / spread
        b = float(np.dot(sx, dy) - np.dot(sy, dx)) / spread
    linear = np.array([[a, -b], [b, a]])
    t = mean_dst - linear @ mean_src
    return np.hstack([linear, t[:, None]])


def warp_to_template(
    image: RGBImage, landmarks: npt.ArrayLike, template: npt.ArrayLike, size: int
) -> RGBImage:
    """The (size, size, 3) chip in which ``landmarks`` (K, 2 image pixels) land as close as a
    similarity transform allows to ``template`` (K, 2 chip pixels).

    Bilinear sampling, rounded to the nearest grey level; the frame is surrounded by black,
    as with OpenCV's ``warpAffine(..., borderValue=0)`` that InsightFace's ``norm_crop`` uses.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    forward = similarity_transform(landmarks, template)
    inverse = _invert_affine(forward)
    xs, ys = _map_grid(inverse, size, size)
    # One black pixel around the frame lets border samples blend towards black smoothly.
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
    values = _bilinear(padded, xs + 1.0, ys + 1.0)  # 0 beyond the padding
    return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8, order="C")


def dlib_face_chip(
    image: RGBImage, landmarks5: npt.ArrayLike, size: int = 150, padding: float = 0.25
) -> RGBImage:
    """dlib's aligned face chip: ``dlib.get_face_chip(image, det, size, padding)``.

    ``image`` is (H, W, 3) uint8 RGB; ``landmarks5`` the (5, 2) points of dlib's 5-point
    model in image pixels (dlib rounds them to integers; pass them as the shape predictor
    returns them). ``padding`` is the margin around the mean face as a fraction of its side.
    Returns the (size, size, 3) uint8 chip.
    """
    points = np.asarray(landmarks5, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"landmarks5 must be (5, 2), got {points.shape}")
    if size <= 0 or padding < 0:
        raise ValueError(f"need size > 0 and padding >= 0, got size={size}, padding={padding}")
    template = (padding + DLIB_MEAN_FACE_5) / (2 * padding + 1) * size
    chip_to_image = similarity_transform(template, points)
    # chip_details(chip_points, img_points, dims): the rotation and scale of the transform
    # plus a rectangle of size*scale centred on where the chip centre lands.
    angle = math.atan2(chip_to_image[1, 0], chip_to_image[0, 0])
    scale = math.hypot(chip_to_image[0, 0], chip_to_image[1, 0])
    centre = chip_to_image[:, :2] @ np.array([size / 2.0, size / 2.0]) + chip_to_image[:, 2]
    half = (size * scale - 1.0) / 2.0  # centered_drect: the rectangle spans width - 1
    rect = _DRect(centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half)
    return _extract_image_chip(image, rect, angle, size, size)


class _DRect:
    """dlib's ``drectangle``: inclusive float edges, so width is right - left + 1."""

    __slots__ = ("bottom", "left", "right", "top")

    def __init__(self, left: float, top: float, right: float, bottom: float) -> None:
        self.left, self.top, self.right, self.bottom = left, top, right, bottom

    @classmethod
    def spanning(cls, xs: npt.ArrayLike, ys: npt.ArrayLike) -> _DRect:
        x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        return cls(float(x.min()), float(y.min()), float(x.max()), float(y.max()))

    def is_empty(self) -> bool:
        return self.top > self.bottom or self.left > self.right

    def area(self) -> float:
        if self.is_empty():
            return 0.0
        return (self.right - self.left + 1.0) * (self.bottom - self.top + 1.0)

    def centre(self) -> tuple[float, float]:
        return (self.left + self.right) / 2.0, (self.top + self.bottom) / 2.0

    def translated(self, dx: float, dy: float) -> _DRect:
        return _DRect(self.left + dx, self.top + dy, self.right + dx, self.bottom + dy)

    def down(self) -> _DRect:
        """``pyramid_down<2>::rect_down``: where this rectangle lies one level down."""
        return _DRect.spanning(
            [self.left / 2.0 - 1.25, self.right / 2.0 - 1.25],
            [self.top / 2.0 - 0.75, self.bottom / 2.0 - 0.75],
        )

    def rotated_corners(self, angle: float) -> F64:
        """(3, 2): top-left, top-right and bottom-left corners rotated by ``angle`` radians
        about the centre (dlib's ``rotate_point``)."""
        cx, cy = self.centre()
        corners = np.array(
            [[self.left, self.top], [self.right, self.top], [self.left, self.bottom]]
        )
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = corners[:, 0] - cx, corners[:, 1] - cy
        return np.stack([c * dx - s * dy + cx, s * dx + c * dy + cy], axis=1)

    def rotated_bounds(self, angle: float) -> _DRect:
        """Bounding box of all four corners rotated by ``angle`` about the centre."""
        tl, tr, bl = self.rotated_corners(angle)
        br = tr + bl - tl  # the rotation preserves the parallelogram
        pts = np.stack([tl, tr, bl, br])
        return _DRect.spanning(pts[:, 0], pts[:, 1])


def round_half_up(v: float) -> int:
    """dlib's conversion of a float coordinate to an integer pixel: floor(v + 0.5)."""
    return math.floor(v + 0.5)


def _extract_image_chip(
    image: RGBImage, rect: _DRect, angle: float, rows: int, cols: int
) -> RGBImage:
    """dlib's ``extract_image_chips`` for one chip with bilinear interpolation."""
    height, width = image.shape[:2]
    chip_pixels = rows * cols
    # How many pyramid levels until the rectangle is no larger than the chip; each level
    # needs a wider crop margin so the 5x5 filter sees real pixels at the crop's edges.
    depth, grow = 0, 2.0
    probe = rect.down()
    while probe.area() > chip_pixels:
        probe = probe.down()
        depth += 1
        grow = grow * 2 + 2
    bounds = rect.rotated_bounds(angle)
    crop = _DRect(
        max(bounds.left - grow, 0.0),
        max(bounds.top - grow, 0.0),
        min(bounds.right + grow, width - 1.0),
        min(bounds.bottom + grow, height - 1.0),
    )
    out = np.zeros((rows, cols, 3), dtype=np.uint8)
    if crop.is_empty():
        return out  # the face lies wholly outside the frame
    left, top = round_half_up(crop.left), round_half_up(crop.top)
    right, bottom = round_half_up(crop.right), round_half_up(crop.bottom)
    source = image[top : bottom + 1, left : right + 1]

    local = rect.translated(-left, -top)
    level = -1
    while local.down().area() > chip_pixels:
        level += 1
        local = local.down()
    for _ in range(level + 1):
        source = _pyramid_down_2(source)
    if source.shape[0] < 2 or source.shape[1] < 2:
        return out  # nothing left to interpolate between: dlib leaves the chip black

    # Chip corners (0, 0), (cols-1, 0), (0, rows-1) go to the rotated rectangle's corners.
    tl, tr, bl = local.rotated_corners(angle)
    ax = (tr - tl) / max(cols - 1, 1)
    ay = (bl - tl) / max(rows - 1, 1)
    chip_to_source = np.array([[ax[0], ay[0], tl[0]], [ax[1], ay[1], tl[1]]])
    xs, ys = _map_grid(chip_to_source, rows, cols)
    values = _bilinear(source, xs, ys)
    # dlib assigns a double to an unsigned char by clamping and truncating; a blend of
    # bytes with weights summing to one needs no clamping. Samples without four neighbours
    # are already 0, the black dlib leaves them.
    return values.astype(np.uint8, order="C")


def _pyramid_down_2(image: RGBImage) -> RGBImage:
    """dlib's ``pyramid_down<2>`` for RGB images: a separable [1 4 6 4 1] filter, every
    other row and column kept, integer sums divided (truncating) by 256.

    (H, W, 3) uint8 -> ((H-3)//2, (W-3)//2, 3) uint8; an image 8 pixels or less on a side
    becomes empty, as in dlib.
    """
    height, width = image.shape[:2]
    if height <= 8 or width <= 8:
        return np.zeros((0, 0, 3), dtype=np.uint8)
    out_h, out_w = (height - 3) // 2, (width - 3) // 2
    # One plane per channel, so every step's inner loop runs along a row (on interleaved
    # RGB it would run over 3 values at a time, about 10 times slower). uint16 is exact:
    # a sum is at most 16 * 16 * 255 = 65280.
    planes = np.moveaxis(image, 2, 0).astype(np.uint16, order="C")

    both = _filter_every_other(_filter_every_other(planes, 2, out_w), 1, out_h)
    return np.moveaxis(both >> 8, 0, 2).astype(np.uint8, order="C")


def _filter_every_other(x: npt.NDArray[np.uint16], axis: int, n: int) -> npt.NDArray[np.uint16]:
    """``x`` filtered with [1 4 6 4 1] along ``axis`` at positions 0, 2, ..., 2(n-1) of
    the filter's first tap."""

    def tap(k: int) -> npt.NDArray[np.uint16]:
        index = [slice(None)] * x.ndim
        index[axis] = slice(k, k + 2 * n, 2)
        return x[tuple(index)]

    total = tap(0) + tap(4)
    total += 4 * (tap(1) + tap(3))
    total += 6 * tap(2)
    return total


def _invert_affine(m: F64) -> F64:
    """Inverse of a (2, 3) affine matrix."""
    a_inv = np.linalg.inv(m[:, :2])
    return np.hstack([a_inv, -(a_inv @ m[:, 2])[:, None]])


def _map_grid(m: F64, rows: int, cols: int) -> tuple[F64, F64]:
    """Source coordinates (rows, cols) x 2 of every output pixel under the affine ``m``."""
    # A row of column terms plus a column of row terms: the same sums as on full grids,
    # with one full-size operation per sum instead of three.
    c = np.arange(cols, dtype=np.float64)[None, :]
    r = np.arange(rows, dtype=np.float64)[:, None]
    return m[0, 0] * c + m[0, 1] * r + m[0, 2], m[1, 0] * c + m[1, 1] * r + m[1, 2]


def _bilinear(image: RGBImage, xs: F64, ys: F64) -> F64:
    """Bilinear samples (..., C) float64 of ``image`` (H, W, C) at (xs, ys) (...), zero
    where a sample lacks any of its four neighbours inside the image (dlib's
    ``interpolate_bilinear``). ``image`` must be at least 2x2. The result is a transposed
    view: convert it with ``order="C"``. The arithmetic is dlib's, in double, term for
    term."""
    height, width, channels = image.shape
    left = np.floor(xs).ravel()
    top = np.floor(ys).ravel()
    inside = (left >= 0) & (top >= 0) & (left < width - 1) & (top < height - 1)
    everywhere = bool(inside.all())
    flat = top * width + left
    if not everywhere:
        # Outside samples read around pixel 0 (in bounds: the image is at least 2x2) and
        # are zeroed afterwards.
        flat = np.where(inside, flat, 0)
    # The work runs channel by channel, (C, N) against per-sample (N,) weights: broadcast
    # over a last axis of C = 3 values, numpy's inner loops run 3 elements at a time and are
    # about 10 times slower. at: byte positions of each channel of each sample's top-left
    # neighbour in the flat image; the other neighbours lie a fixed number of bytes on.
    at = flat.astype(np.intp) * channels + np.arange(channels)[:, None]
    pixels = image.reshape(-1)
    row = width * channels
    fx = xs.ravel() - left
    fy = ys.ravel() - top
    gx = 1 - fx
    gy = 1 - fy
    # uint8 times float64 converts exactly, as dlib's assignment to double does.
    upper = gx * pixels.take(at) + fx * pixels.take(at + channels)
    lower = gx * pixels.take(at + row) + fx * pixels.take(at + (row + channels))
    values = gy * upper + fy * lower
    if not everywhere:
        values = np.where(inside, values, 0.0)
    samples: F64 = values.T.reshape(*xs.shape, channels)
    return samples
