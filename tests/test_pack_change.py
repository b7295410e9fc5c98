"""Changing the model pack: the operator is told once at start-up, a participant enrolled
with the old pack is asked to enroll again, and a turned challenge frame is judged with
the pack's turned-face threshold."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from facesvc.domain import Decision, Gate, TrainingType
from facesvc.engine import VerifyCommand
from facesvc.liveness.checks import FrameObservation, LivenessThresholds, check_liveness
from facesvc.models.packs import ModelPack
from facesvc.models.types import Box
from facesvc.templates import generate_template_key
from tests.engine_support import ADMIN, LMS, TENANTS, astronaut, jpeg, running_engine


def older(pack: ModelPack) -> ModelPack:
    """The same models under another tag, as a pack before an upgrade would be."""
    return dataclasses.replace(pack, digest="sha256:0000000000000000")


async def test_a_pack_change_is_logged_once_and_old_enrollments_must_enroll_again(
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
    model_pack: ModelPack,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = older(model_pack)
    key = {"templates__key": generate_template_key("k1")}  # one key across the restarts
    async with running_engine(tmp_path, redis_url, redis_prefix, old, **key) as kit:
        enrolled = await kit.engine.enroll(
            "p-1", [jpeg(astronaut())], replace=False, caller=ADMIN, tenants=TENANTS
        )
        assert enrolled.enrolled, enrolled.reason
    with caplog.at_level(logging.WARNING, logger="facesvc.wiring"):
        async with running_engine(tmp_path, redis_url, redis_prefix, model_pack, **key) as kit:
            outcome = await kit.engine.verify(
                VerifyCommand(
                    participant_id="p-1",
                    training_id="t-1",
                    training_type=TrainingType.SPL,
                    gate=Gate.SESSION,
                    session_id="s-1",
                    frames=[jpeg(astronaut())],
                    caller=LMS,
                )
            )
        async with running_engine(tmp_path, redis_url, redis_prefix, model_pack, **key):
            pass  # a restart on the same pack says nothing
    assert outcome.decision is Decision.NOT_ENROLLED
    assert old.tag in outcome.reason and model_pack.tag in outcome.reason
    assert "enroll again" in outcome.reason
    changes = [r.getMessage() for r in caplog.records if "MODEL PACK CHANGED" in r.getMessage()]
    assert changes == [
        f"MODEL PACK CHANGED from {old.tag} to {model_pack.tag}: every participant enrolled "
        f"with {old.tag} must enroll again (their scans answer NOT_ENROLLED with 'enroll "
        "again' until then); templates are never compared across packs. docs/packs.md: "
        "changing the pack"
    ]


def frame(descriptor: list[float], *, turned: bool, shade: int) -> FrameObservation:
    points = np.array([[60, 40], [50, 40], [20, 40], [30, 40], [40, 60]], np.float32)
    return FrameObservation(
        landmarks=points,
        box=Box(0, 0, 80, 80),
        descriptor=np.array(descriptor, np.float32),
        live_score=None,
        thumbnail=np.full((32, 32), shade, np.uint8),
        turned=turned,
    )


@pytest.mark.parametrize(
    ("turned", "turned_limit", "decision"),
    [
        (False, 0.2, None),  # a frontal frame: the frontal limit (0.5) holds it
        (True, 0.2, Decision.NOT_MATCHED),  # turned: its own, stricter, limit refuses it
        (True, None, None),  # no turned limit calibrated: the frontal one applies
        (True, 0.7, None),
    ],
)
def test_a_turned_frame_is_judged_with_the_turned_threshold(
    turned: bool, turned_limit: float | None, decision: Decision | None
) -> None:
    first = frame([1.0, 0.0], turned=False, shade=10)
    # cosine distance 1 - cos(angle): about 0.3 between the two frames
    second = frame([0.7, 0.71414], turned=turned, shade=90)
    thresholds = LivenessThresholds(
        max_identity_distance=0.5,
        passive_threshold=0.0,
        max_turned_identity_distance=turned_limit,
    )
    result = check_liveness((), [first, second], thresholds)
    assert result.decision is decision
    assert result.max_identity_distance == pytest.approx(0.3, abs=1e-3)
