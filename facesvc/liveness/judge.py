"""The liveness verdict on one scan, from the faces the pipeline measured.

The engine calls :meth:`LivenessJudge.judge` after embedding and scoring every frame. A
verdict with a decision ends the scan (SPOOF_SUSPECTED, CHALLENGE_FAILED, NOT_MATCHED for
a scan that mixes people); ``decision=None`` lets the match decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from facesvc.domain import Decision
from facesvc.liveness.challenges import Challenge
from facesvc.models.pipeline import FaceAnalysis
from facesvc.models.types import RGBImage


@dataclass(frozen=True, slots=True)
class LivenessVerdict:
    decision: Decision | None
    reason: str = ""


PASSED = LivenessVerdict(None)


class ChallengeUnavailable(NotImplementedError):
    """Challenge-response liveness is configured but this build cannot check it.
    Transports answer UNIMPLEMENTED."""


@dataclass(frozen=True, slots=True)
class LivenessJudge:
    """Passive presentation-attack threshold, and (when set) the challenge checker.

    ``live_threshold`` is the passive model's score below which a frame counts as an attack,
    calibrated to a stated attack-acceptance rate (facesvc/models/fas_calibration.json).
    """

    live_threshold: float

    def judge(
        self,
        images: Sequence[RGBImage],
        analyses: Sequence[FaceAnalysis],
        descriptors: npt.NDArray[np.float32],
        live_scores: npt.NDArray[np.float32],
        challenge: Challenge | None,
        match_threshold: float,
    ) -> LivenessVerdict:
        """The verdict on F frames: their images, analyses, (F, D) descriptors and (F,)
        live scores; ``challenge`` is the consumed challenge for challenge-response scans."""
        if challenge is not None:
            raise ChallengeUnavailable(
                "challenge-response liveness is not available in this build: "
                "set the liveness policy to passive or off"
            )
        weakest = float(np.min(live_scores))
        if weakest < self.live_threshold:
            return LivenessVerdict(
                Decision.SPOOF_SUSPECTED,
                "the camera seems to see a photo or a screen, not a live face: "
                "scan your own face directly, in good light",
            )
        return PASSED
