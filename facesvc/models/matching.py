"""Comparing an enrolled template with a scan: distances and fusion rules.

A template holds K enrolment descriptors (K, D) and a scan F frame descriptors
(F, D) of one pack. ``match`` turns them into one distance (lower = more alike)
that the pack's calibrated threshold decides on. The default rules are the ones
that measured best on ../shared/data/faces (docs/accuracy.md): cosine distance
around the pack's calibrated centre, the mean of the enrolment descriptors as the
template, and the mean of the frame descriptors as the scan.

Why a centre: descriptors of a recogniser share a large common component (for
dlib's ResNet the mean unit descriptor has length ~0.9), so plain cosine sees every
face as alike and strict thresholds then cut genuine pairs. Measuring the angle
around the mean unit descriptor of a calibration population (``centre``, from the
pack's calibration) removes that component; L2 distance does not change with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

Descriptors = npt.NDArray[np.float32] | npt.NDArray[np.float64]
"""(N, D) descriptors, one per row."""


class Distance(StrEnum):
    """How two descriptors are compared."""

    COSINE = "cosine"
    """1 - cos(angle) between the descriptors, in [0, 2]; scale-free."""
    L2 = "l2"
    """Euclidean distance between the descriptors as given (dlib's stock metric)."""


class TemplateRule(StrEnum):
    """How K enrolment descriptors act as one template."""

    MEAN = "mean"
    """One template: the mean of the (unit-length, for cosine) enrolment descriptors."""
    NEAREST = "nearest"
    """Keep every descriptor; a frame scores its distance to the closest one."""
    AVERAGE = "average"
    """Keep every descriptor; a frame scores its mean distance to all of them."""


class FrameRule(StrEnum):
    """How F frame scores of one scan become the scan's score."""

    MEAN = "mean"
    """Mean of the frames' distances."""
    MIN = "min"
    """Best frame (maximum similarity): the most lenient rule."""
    MAX = "max"
    """Worst frame: every frame must match."""
    MEDIAN = "median"
    """Median of the frames' distances."""
    MEAN_DESCRIPTOR = "mean-descriptor"
    """One distance between the template and the mean of the frame descriptors."""


@dataclass(frozen=True, slots=True)
class MatchRules:
    distance: Distance = Distance.COSINE
    template: TemplateRule = TemplateRule.MEAN
    frames: FrameRule = FrameRule.MEAN_DESCRIPTOR


DEFAULT_RULES = MatchRules()


@dataclass(frozen=True, slots=True)
class MatchScore:
    """The result of one template-against-scan comparison.

    ``distance`` is the fused score in the rules' distance units; ``frame_distances``
    has one entry per probe frame (that frame's distance to the template), which the
    caller may use to see whether one frame disagrees with the rest.
    """

    distance: float
    frame_distances: tuple[float, ...]
    rules: MatchRules

    def accepted(self, threshold: float) -> bool:
        """Whether the scan matches at ``threshold`` (a distance: accept at or below it)."""
        return self.distance <= threshold


def _as_matrix(x: Descriptors, what: str) -> npt.NDArray[np.float64]:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty (N, D) array, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{what} holds NaN or infinite values")
    return m


def unit_rows(x: Descriptors) -> npt.NDArray[np.float64]:
    """Rows of ``x`` (N, D) scaled to unit length (a zero row stays zero)."""
    m = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return np.asarray(m / np.where(norms > 0.0, norms, 1.0))


def centred(
    x: Descriptors, distance: Distance, centre: Descriptors | None
) -> npt.NDArray[np.float64]:
    """``x`` (N, D) as the distance sees it: for cosine with a (D,) ``centre``, the unit
    rows minus the centre; otherwise unchanged (as float64)."""
    m = np.asarray(x, dtype=np.float64)
    if centre is None or distance is not Distance.COSINE:
        return m
    c = np.asarray(centre, dtype=np.float64).reshape(-1)
    if c.shape[0] != m.shape[-1]:
        raise ValueError(f"centre has {c.shape[0]} dimensions, descriptors {m.shape[-1]}")
    return np.asarray(unit_rows(m) - c)


def pairwise_distances(
    a: Descriptors, b: Descriptors, distance: Distance, centre: Descriptors | None = None
) -> npt.NDArray[np.float64]:
    """(M, N) distances between the rows of ``a`` (M, D) and ``b`` (N, D), cosine ones
    around ``centre`` (D,) when given."""
    x = centred(a, distance, centre)
    y = centred(b, distance, centre)
    if distance is Distance.COSINE:
        return np.asarray(np.clip(1.0 - unit_rows(x) @ unit_rows(y).T, 0.0, 2.0))
    squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.asarray(np.sqrt(np.maximum(squared, 0.0)))


def _mean_descriptor(x: npt.NDArray[np.float64], distance: Distance) -> npt.NDArray[np.float64]:
    # Cosine ignores length, so each descriptor gets an equal vote by being unit length first.
    rows = unit_rows(x) if distance is Distance.COSINE else x
    return np.asarray(rows.mean(axis=0, keepdims=True))


_FRAME_REDUCERS: dict[FrameRule, Callable[[npt.NDArray[np.float64]], np.floating[Any]]] = {
    FrameRule.MEAN: np.mean,
    FrameRule.MIN: np.min,
    FrameRule.MAX: np.max,
    FrameRule.MEDIAN: np.median,
}


def match(
    template_descriptors: Descriptors,
    probe_descriptors: Descriptors,
    rules: MatchRules = DEFAULT_RULES,
    centre: Descriptors | None = None,
) -> MatchScore:
    """Fuse a (K, D) template and an (F, D) scan of one pack into one distance.

    ``centre`` (D,) is the pack calibration's centre for cosine distance (None: the
    origin). Raises ``ValueError`` on empty, non-finite or dimension-mismatched inputs:
    such a comparison is a bug upstream (mixed packs), never a non-match.
    """
    template = _as_matrix(template_descriptors, "template descriptors")
    probe = _as_matrix(probe_descriptors, "probe descriptors")
    if template.shape[1] != probe.shape[1]:
        raise ValueError(
            f"template has {template.shape[1]}-d descriptors but the scan {probe.shape[1]}-d: "
            "they come from different model packs and cannot be compared"
        )
    template = centred(template, rules.distance, centre)
    probe = centred(probe, rules.distance, centre)
    if rules.template is TemplateRule.MEAN:
        template = _mean_descriptor(template, rules.distance)
    frame_matrix = pairwise_distances(probe, template, rules.distance)  # (F, K)
    if rules.template is TemplateRule.AVERAGE:
        per_frame = frame_matrix.mean(axis=1)
    else:
        per_frame = frame_matrix.min(axis=1)
    if rules.frames is FrameRule.MEAN_DESCRIPTOR:
        fused_probe = _mean_descriptor(probe, rules.distance)
        fused = pairwise_distances(fused_probe, template, rules.distance)[0]
        score = float(fused.mean() if rules.template is TemplateRule.AVERAGE else fused.min())
    else:
        score = float(_FRAME_REDUCERS[rules.frames](per_frame))
    return MatchScore(
        distance=score, frame_distances=tuple(float(d) for d in per_frame), rules=rules
    )
