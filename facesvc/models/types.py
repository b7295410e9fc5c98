"""Value types and protocols shared by every model in a pack.

Coordinates are image pixels, x to the right and y down, as floats. Images are
``numpy.ndarray`` of shape (H, W, 3), dtype uint8, RGB order, C-contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

# The decoded picture every model takes, defined where it is made.
from facesvc.imaging import RGBImage as RGBImage

Points = npt.NDArray[np.float32]
"""(K, 2) float32 landmark coordinates (x, y) in image pixels."""


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned rectangle; ``right`` and ``bottom`` are exclusive edges."""

    left: float
    top: float
    right: float
    bottom: float

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def iou(self, other: Box) -> float:
        """Intersection over union with ``other``, in [0, 1]."""
        w = min(self.right, other.right) - max(self.left, other.left)
        h = min(self.bottom, other.bottom) - max(self.top, other.top)
        inter = max(0.0, w) * max(0.0, h)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Detection:
    """One face found by a detector.

    ``landmarks`` is set only by detectors that predict keypoints themselves
    (SCRFD: five ArcFace points); otherwise the pack's landmark model supplies them.
    """

    box: Box
    score: float
    landmarks: Points | None = None


class FaceDetector(Protocol):
    def detect(self, image: RGBImage, min_face_px: int) -> list[Detection]:
        """Faces in ``image`` at least ``min_face_px`` pixels tall, best score first.

        A detector may downscale the image so that the smallest accepted face is
        just large enough for it: that is where detection time goes.
        """
        ...


class LandmarkModel(Protocol):
    num_points: int

    def predict(self, image: RGBImage, box: Box) -> Points:
        """(num_points, 2) landmark positions for the face inside ``box``."""
        ...


class Embedder(Protocol):
    dim: int
    chip_size: int

    def align(self, image: RGBImage, landmarks: Points) -> RGBImage:
        """The (chip_size, chip_size, 3) aligned face chip this embedder expects."""
        ...

    def embed(self, chips: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """(N, dim) L2-normalised descriptors for (N, chip_size, chip_size, 3) chips."""
        ...


def unit_descriptors(raw: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """(N, dim) float32 descriptors scaled to unit length, as :meth:`Embedder.embed` returns
    them; an all-zero row stays zero."""
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    return np.asarray(raw / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)


class PresentationAttackModel(Protocol):
    """A passive presentation-attack model: square face crops in, live scores out."""

    @property
    def input_size(self) -> int:
        """Side, in pixels, of the square crops it scores (others are resized to it)."""
        ...

    def live_scores(self, crops: list[RGBImage]) -> npt.NDArray[np.float32]:
        """(N,) scores in [0, 1], higher means more likely a live face."""
        ...
