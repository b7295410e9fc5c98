"""One frame's face work: detect, choose exactly one face, landmarks, align, check quality.

``FacePipeline.analyze`` turns a decoded frame into a ``FaceAnalysis`` whose status is the
face part of the service's decision (OK, NO_FACE, MULTIPLE_FACES, LOW_QUALITY), with the
chosen face's detection, landmarks, aligned chip and quality report. It is two steps that
callers may also take apart: ``locate`` (the one face found and its chip aligned) and
``assess`` (its pose landmarks and quality gates), so that the chip can be described while
the face is assessed. ``embed`` runs the pack's embedder on chips from any number of
analyses, so the engine can batch the chips of several frames and requests into one model
call. The pipeline knows nothing of Redis, gRPC or the request: it is a pure function of
the frame and the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from facesvc.config import QualitySettings
from facesvc.models.quality import (
    Check,
    FaceChoice,
    FrontalGeometry,
    LandmarkLayout,
    QualityReport,
    assess_quality,
    select_face,
)
from facesvc.models.types import Detection, Embedder, FaceDetector, LandmarkModel, Points, RGBImage

_POSE_CHECKS = frozenset({Check.YAW, Check.PITCH})
_DLIB_LAYOUTS = {5: LandmarkLayout.DLIB_5, 68: LandmarkLayout.DLIB_68}


class FaceStatus(StrEnum):
    """The face part of a decision for one frame."""

    OK = "OK"
    NO_FACE = "NO_FACE"
    MULTIPLE_FACES = "MULTIPLE_FACES"
    LOW_QUALITY = "LOW_QUALITY"


@dataclass(frozen=True, slots=True)
class FaceAnalysis:
    """What one frame holds.

    ``detection`` is the chosen face (None for NO_FACE); ``landmarks`` (K, 2) float32 image
    pixels and ``chip`` the embedder's aligned (S, S, 3) uint8 chip are set when the face
    was measured (OK and LOW_QUALITY); ``quality`` likewise. ``reasons`` are sentences for
    the person in front of the camera (empty when OK). ``faces`` counts all detections.
    """

    status: FaceStatus
    reasons: tuple[str, ...]
    faces: int
    detection: Detection | None = None
    landmarks: Points | None = None
    chip: RGBImage | None = None
    quality: QualityReport | None = None

    @property
    def reason(self) -> str:
        """The reasons as one sentence ("" when OK)."""
        return "; ".join(self.reasons)

    @property
    def only_pose_failed(self) -> bool:
        """LOW_QUALITY because of head pose alone (an active-liveness frame may be turned)."""
        if self.quality is None or self.quality.passed:
            return False
        return all(issue.check in _POSE_CHECKS for issue in self.quality.issues)


@dataclass(frozen=True, slots=True)
class LocatedFace:
    """A frame's one face, found and aligned, its pose and quality not yet measured
    (``FacePipeline.locate``). ``faces`` counts all detections; ``points`` are the pose
    landmarks when aligning the chip needed them (a detector that gives no points), else
    None."""

    detection: Detection
    faces: int
    chip: RGBImage
    points: Points | None = None


class FacePipeline:
    """Detection, face choice, landmarks, alignment and quality for one frame.

    ``landmarks`` may be None when the detector's detections carry the alignment points
    themselves (SCRFD's five ArcFace points); otherwise it must be one of dlib's 5- or
    68-point models. When both exist, the detector's points align the chip (the embedder was
    trained on them) and the landmark model's points measure the head pose, against
    ``frontal``: the pack's calibrated frontal geometry for those points (None: the
    layout's mean face). ``lone_embedder``: the same recogniser on more threads, for
    ``embed_alone`` (None: ``embedder``).
    """

    def __init__(
        self,
        detector: FaceDetector,
        landmarks: LandmarkModel | None,
        embedder: Embedder,
        limits: QualitySettings,
        frontal: FrontalGeometry | None = None,
        *,
        lone_embedder: Embedder | None = None,
    ) -> None:
        if landmarks is not None and landmarks.num_points not in _DLIB_LAYOUTS:
            raise ValueError(
                f"a {landmarks.num_points}-point landmark model has no known layout: "
                "use dlib's 5- or 68-point model"
            )
        self.layout = (
            LandmarkLayout.ARCFACE_5 if landmarks is None else _DLIB_LAYOUTS[landmarks.num_points]
        )
        """The layout of the points that measure the pose (``FaceAnalysis.landmarks``)."""
        if frontal is not None and frontal.layout is not self.layout:
            raise ValueError(
                f"the frontal geometry is for {frontal.layout} points, the pose is measured "
                f"on {self.layout} points"
            )
        self._detector = detector
        self._landmarks = landmarks
        self._embedder = embedder
        self._lone_embedder = lone_embedder or embedder
        self._limits = limits
        self._frontal = frontal

    @property
    def limits(self) -> QualitySettings:
        return self._limits

    @property
    def dim(self) -> int:
        """Length of the embedder's descriptors."""
        return self._embedder.dim

    def align(self, image: RGBImage, points: Points) -> RGBImage:
        """The embedder's chip for a face whose alignment points are ``points``."""
        return self._embedder.align(image, points)

    def analyze(self, image: RGBImage) -> FaceAnalysis:
        """The ``FaceAnalysis`` of one (H, W, 3) uint8 RGB frame: ``locate``, then ``assess``."""
        located = self.locate(image)
        return self.assess(image, located) if isinstance(located, LocatedFace) else located

    def locate(self, image: RGBImage) -> FaceAnalysis | LocatedFace:
        """The frame's one face with its aligned chip, or the frame's final ``FaceAnalysis``
        when it has no single face (NO_FACE, MULTIPLE_FACES)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        detections = self._detector.detect(image, self._limits.min_detect_px)
        selection = select_face(detections, self._limits)
        if selection.index is None:
            return FaceAnalysis(FaceStatus.NO_FACE, (selection.reason,), len(detections))
        detection = detections[selection.index]
        if selection.choice is FaceChoice.MULTIPLE_FACES:
            return FaceAnalysis(
                FaceStatus.MULTIPLE_FACES, (selection.reason,), len(detections), detection
            )
        if detection.landmarks is not None:
            chip = self._embedder.align(image, detection.landmarks)
            return LocatedFace(detection, len(detections), chip)
        points, _ = self._points(image, detection)
        return LocatedFace(detection, len(detections), self._embedder.align(image, points), points)

    def assess(self, image: RGBImage, located: LocatedFace) -> FaceAnalysis:
        """The ``FaceAnalysis`` of a face ``locate`` found in ``image``: its pose landmarks
        and quality gates."""
        if located.points is not None:
            points, layout = located.points, self.layout
        else:
            points, layout = self._points(image, located.detection)
        report = assess_quality(
            image, located.detection, points, layout, located.chip, self._limits, self._frontal
        )
        status = FaceStatus.OK if report.passed else FaceStatus.LOW_QUALITY
        reasons = tuple(issue.reason for issue in report.issues)
        return FaceAnalysis(
            status, reasons, located.faces, located.detection, points, located.chip, report
        )

    def embed(self, chips: Sequence[RGBImage] | npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """(N, dim) L2-normalised descriptors for N aligned (S, S, 3) uint8 chips, in one
        embedder call."""
        return _embed(self._embedder, chips)

    def embed_alone(
        self, chips: Sequence[RGBImage] | npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.float32]:
        """``embed`` on the lone recogniser: the same descriptors, one face spread over the
        cores that a scan alone on the machine leaves idle."""
        return _embed(self._lone_embedder, chips)

    def _points(self, image: RGBImage, detection: Detection) -> tuple[Points, LandmarkLayout]:
        """The landmarks that measure the pose, and their layout."""
        if self._landmarks is not None:
            points = self._landmarks.predict(image, detection.box)
            return points, _DLIB_LAYOUTS[self._landmarks.num_points]
        if detection.landmarks is None:
            raise ValueError(
                "the detector gave no landmarks and the pipeline has no landmark model"
            )
        return detection.landmarks, LandmarkLayout.ARCFACE_5


def _embed(
    embedder: Embedder, chips: Sequence[RGBImage] | npt.NDArray[np.uint8]
) -> npt.NDArray[np.float32]:
    if len(chips) == 0:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    batch = chips if isinstance(chips, np.ndarray) else np.stack(list(chips))
    return embedder.embed(np.ascontiguousarray(batch, dtype=np.uint8))
