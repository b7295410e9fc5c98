"""``facesvc calibrate``'s computation: a pack's threshold at a target false-match rate.

Every pair of photos of an identity-folder collection is scored with the pack; the threshold
is set where the impostor pairs show the false-match rate (FMR) at most the target (default
1e-3; with a confidence, as an upper bound the pairs demonstrate, not a point estimate), and
:class:`~facesvc.models.calibration.Calibration` records it with every source's rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from facesvc.accuracy.evaluation import Comparisons, fmr_resolvable, threshold_at_fmr
from facesvc.models.calibration import (
    Calibration,
    CalibrationData,
    CalibrationError,
    FrontalPose,
    RatesAtThreshold,
    SourceRates,
)
from facesvc.models.matching import Distance

DEFAULT_TARGET_FMR = 1e-3


def rates_at(comparisons: Comparisons, threshold: float) -> RatesAtThreshold:
    """The error counts of ``comparisons`` at ``threshold`` (a distance: match at or below)."""
    gen = comparisons.genuine
    return RatesAtThreshold(
        genuine_pairs=int(gen.sum()),
        impostor_pairs=int((~gen).sum()),
        false_non_matches=int(np.sum(comparisons.distance[gen] > threshold)),
        false_matches=int(np.sum(comparisons.distance[~gen] <= threshold)),
    )


def calibrate(
    pairs: Comparisons,
    *,
    pack: str,
    pack_digest: str,
    distance: Distance,
    data: CalibrationData,
    target_fmr: float = DEFAULT_TARGET_FMR,
    confidence: float | None = None,
    centre: Sequence[float] | None = None,
    centre_choice: str = "",
    frontal: FrontalPose | None = None,
    now: datetime | None = None,
) -> Calibration:
    """The threshold at ``target_fmr`` over all impostor ``pairs``, with per-source rates.

    With ``confidence`` the pairs must show the FMR at most the target at that one-sided
    confidence (:func:`~facesvc.accuracy.evaluation.threshold_at_fmr`); a CalibrationError
    says how many impostor pairs that needs when there are too few.

    ``pairs`` must be single-photo pairs scored with ``distance`` (around ``centre``,
    which the calibration then records). The impostor set
    mixes sources as the folder does: calibrate on photos that look like the
    deployment (population, cameras), since a threshold does not carry over.
    """
    gen = pairs.genuine
    impostor = pairs.distance[~gen]
    try:
        threshold = threshold_at_fmr(impostor, target_fmr, confidence)
    except ValueError as e:
        raise CalibrationError(str(e)) from e
    if not math.isfinite(threshold):
        raise CalibrationError("the target FMR accepts every impostor pair; lower it")
    present = np.unique(np.concatenate([pairs.claimed, pairs.probe])).tolist()
    present_sources = [pairs.sources[k] for k in present]
    per_source = tuple(
        SourceRates(
            source=s,
            identities=present_sources.count(s),
            rates=rates_at(pairs.of_source(s), threshold),
        )
        for s in sorted(set(present_sources))
    )
    return Calibration(
        pack=pack,
        pack_digest=pack_digest,
        distance=distance,
        threshold=threshold,
        target_fmr=target_fmr,
        fmr_confidence=confidence,
        fmr_resolvable=fmr_resolvable(int(impostor.size), target_fmr),
        data=data,
        overall=rates_at(pairs, threshold),
        per_source=per_source,
        created_utc=(now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        centre=None if centre is None else tuple(float(v) for v in centre),
        centre_choice=centre_choice,
        frontal=frontal,
    )
