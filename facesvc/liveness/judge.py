"""The liveness verdict on one scan, from the faces the pipeline measured.

The engine calls :meth:`LivenessJudge.judge` after embedding every frame and scoring some of
them with the passive model. It turns the pipeline's analyses into the observations that
:func:`facesvc.liveness.checks.check_liveness` decides on, with the pack's own distance as
the same-person test: one code path for passive-only and challenge scans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from facesvc.liveness.challenges import Challenge
from facesvc.liveness.checks import (
    FrameObservation,
    LivenessResult,
    LivenessThresholds,
    check_liveness,
    face_thumbnail,
)
from facesvc.liveness.pose import five_point_yaw
from facesvc.models.matching import Distance
from facesvc.models.pipeline import FaceAnalysis
from facesvc.models.types import Points, RGBImage


def frames_to_score(count: int, budget: int) -> list[int]:
    """Which of ``count`` frames the passive model scores: at most ``budget``, spread evenly
    from the first (frontal) to the last, because the model costs hundreds of milliseconds
    a face and neighbouring frames add little."""
    if count <= budget:
        return list(range(count))
    return (
        sorted({round(i * (count - 1) / (budget - 1)) for i in range(budget)})
        if budget > 1
        else [0]
    )


@dataclass(frozen=True, slots=True)
class LivenessJudge:
    """Decides liveness with the pack's metric and the passive model's calibrated threshold.

    ``live_threshold``: mean passive score (0-1) below which a scan is an attack.
    ``identity_metric`` / ``identity_centre``: the pack's distance and calibration centre,
    so "the same person in every frame" is judged as the match is.
    ``turned_identity_threshold``: the pack's distance threshold for faces turned away from
    the first frame, where it states one (a recogniser's distance grows with the turn);
    None: the match threshold for every frame.
    """

    live_threshold: float
    identity_metric: Distance = Distance.COSINE
    identity_centre: npt.NDArray[np.float32] | None = field(default=None, compare=False)
    turned_identity_threshold: float | None = None

    def judge(
        self,
        images: Sequence[RGBImage],
        analyses: Sequence[FaceAnalysis],
        descriptors: npt.NDArray[np.float32],
        live_scores: Sequence[float | None],
        challenge: Challenge | None,
        match_threshold: float,
        landmarks_68: Sequence[Points] | None = None,
    ) -> LivenessResult:
        """The verdict on F frames in capture order: their images, analyses, (F, D)
        descriptors and live scores (None for frames not scored); ``challenge`` is the
        consumed challenge of a challenge-response scan, None for passive only;
        ``landmarks_68`` the liveness landmark stage's (68, 2) points of every frame."""
        observations = []
        dense: Sequence[Points | None] = (
            landmarks_68 if landmarks_68 is not None else [None] * len(analyses)
        )
        for image, analysis, descriptor, score, points_68 in zip(
            images, analyses, descriptors, live_scores, dense, strict=True
        ):
            assert analysis.detection is not None and analysis.landmarks is not None
            box = analysis.detection.box
            observations.append(
                FrameObservation(
                    landmarks=analysis.landmarks,
                    box=box,
                    descriptor=descriptor,
                    live_score=score,
                    thumbnail=face_thumbnail(image, box),
                    landmarks_68=points_68,
                    five_point_yaw_deg=five_point_yaw(analysis.detection, analysis.landmarks),
                )
            )
        thresholds = LivenessThresholds(
            max_identity_distance=match_threshold,
            max_turned_identity_distance=self.turned_identity_threshold,
            passive_threshold=self.live_threshold,
            identity_metric=self.identity_metric,
            identity_centre=self.identity_centre,
        )
        steps = challenge.steps if challenge is not None else ()
        return check_liveness(steps, observations, thresholds)
