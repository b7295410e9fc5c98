"""Liveness through the engine: a challenge is consumed once, still photos never pass it,
and the passive model's verdict ends a scan as SPOOF_SUSPECTED."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facesvc.domain import Decision, Gate, TrainingType
from facesvc.engine import VerifyCommand
from facesvc.liveness.judge import frames_to_score
from facesvc.models.pack import ModelPack
from tests.engine_support import ADMIN, LMS, TENANTS, EngineKit, astronaut, jpeg, running_engine

pytestmark = pytest.mark.calendar

PID = "participant-9"


def command(frames: list[bytes], challenge_id: str | None) -> VerifyCommand:
    return VerifyCommand(
        participant_id=PID,
        training_id="training-3",
        training_type=TrainingType.SPL,
        gate=Gate.SESSION,
        session_id="s-1",
        frames=frames,
        caller=LMS,
        challenge_id=challenge_id,
    )


def still_frames(count: int) -> list[bytes]:
    """The same photo as ``count`` frames, each re-encoded a little differently (a printed
    photo held still in front of a camera)."""
    face = astronaut()
    return [jpeg(np.asarray(Image.fromarray(face).rotate(i * 0.5)), 90 - i) for i in range(count)]


async def enrolled(kit: EngineKit) -> None:
    outcome = await kit.engine.enroll(
        PID, [jpeg(astronaut())], replace=False, caller=ADMIN, tenants=TENANTS
    )
    assert outcome.enrolled


async def test_a_still_photo_fails_the_challenge_and_the_challenge_is_single_use(
    tmp_path: Path, redis_url: str, redis_prefix: str, model_pack: ModelPack
) -> None:
    async with running_engine(
        tmp_path, redis_url, redis_prefix, model_pack, liveness__spl="challenge"
    ) as kit:
        await enrolled(kit)
        challenge = await kit.engine.start_challenge(
            PID, "training-3", TrainingType.SPL, Gate.SESSION, caller=LMS
        )
        assert challenge.steps
        first = await kit.engine.verify(command(still_frames(4), challenge.challenge_id))
        assert first.decision in (Decision.CHALLENGE_FAILED, Decision.SPOOF_SUSPECTED)
        assert first.token is None
        again = await kit.engine.verify(command(still_frames(4), challenge.challenge_id))
        assert again.decision is Decision.CHALLENGE_FAILED
        assert "used" in again.reason.lower()


async def test_a_challenge_for_another_participant_is_refused(
    tmp_path: Path, redis_url: str, redis_prefix: str, model_pack: ModelPack
) -> None:
    async with running_engine(
        tmp_path, redis_url, redis_prefix, model_pack, liveness__spl="challenge"
    ) as kit:
        await enrolled(kit)
        foreign = await kit.engine.start_challenge(
            "someone-else", "training-3", TrainingType.SPL, Gate.SESSION, caller=ADMIN
        )
        outcome = await kit.engine.verify(command(still_frames(3), foreign.challenge_id))
        assert outcome.decision is Decision.CHALLENGE_FAILED
        assert outcome.token is None


async def test_the_passive_models_verdict_alone_costs_no_attempt_and_no_spoof_strike(
    tmp_path: Path, redis_url: str, redis_prefix: str, model_pack: ModelPack
) -> None:
    # Threshold 1.0: no live score reaches it, so the passive verdict must stop the scan;
    # threshold 0.0: every score passes it, so the match decides.
    async with running_engine(
        tmp_path, redis_url, redis_prefix, model_pack,
        liveness__spl="passive", liveness__pad_threshold=1.0,
        abuse__spoof_lockout_threshold=2,
    ) as kit:  # fmt: skip
        await enrolled(kit)
        for _ in range(3):  # past the lockout threshold: no strike was counted
            refused = await kit.engine.verify(command(still_frames(1), None))
            assert refused.decision is Decision.SPOOF_SUSPECTED
            assert refused.frames[0].live_score is not None
            assert refused.attempts.used == 0
            assert "not counted" in refused.reason
    async with running_engine(
        tmp_path, redis_url, redis_prefix + "b:", model_pack,
        liveness__spl="passive", liveness__pad_threshold=0.0,
    ) as kit:  # fmt: skip
        await enrolled(kit)
        passed = await kit.engine.verify(command(still_frames(1), None))
        assert passed.decision is Decision.VERIFIED


async def test_challenge_scans_skip_the_passive_model_unless_asked(
    tmp_path: Path, redis_url: str, redis_prefix: str, model_pack: ModelPack
) -> None:
    # A threshold no score reaches: had the model run, it would decide the scan.
    async with running_engine(
        tmp_path, redis_url, redis_prefix, model_pack,
        liveness__spl="challenge", liveness__pad_threshold=1.0,
    ) as kit:  # fmt: skip
        await enrolled(kit)
        challenge = await kit.engine.start_challenge(
            PID, "training-3", TrainingType.SPL, Gate.SESSION, caller=LMS
        )
        outcome = await kit.engine.verify(command(still_frames(3), challenge.challenge_id))
        assert outcome.decision is Decision.CHALLENGE_FAILED
        assert all(f.live_score is None for f in outcome.frames)
    async with running_engine(
        tmp_path, redis_url, redis_prefix + "b:", model_pack,
        liveness__spl="challenge", liveness__pad_threshold=1.0,
        liveness__passive_with_challenge=True,
    ) as kit:  # fmt: skip
        await enrolled(kit)
        challenge = await kit.engine.start_challenge(
            PID, "training-3", TrainingType.SPL, Gate.SESSION, caller=LMS
        )
        outcome = await kit.engine.verify(command(still_frames(3), challenge.challenge_id))
        assert any(f.live_score is not None for f in outcome.frames)


def test_the_passive_model_scores_a_bounded_spread_of_frames() -> None:
    assert frames_to_score(1, 2) == [0]
    assert frames_to_score(5, 2) == [0, 4]
    assert frames_to_score(7, 3) == [0, 3, 6]
    assert frames_to_score(3, 5) == [0, 1, 2]
