"""Changing the model pack: the operator is told once at start-up, a participant enrolled
with the old pack is asked to enroll again; and the liveness check gets the pack's
turned-face threshold."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from facesvc.domain import Decision, Gate, TrainingType
from facesvc.engine import VerifyCommand
from facesvc.models.pack import ModelPack
from facesvc.store.templates import generate_template_key
from tests.engine_support import ADMIN, LMS, TENANTS, EngineKit, astronaut, jpeg, running_engine


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
    with caplog.at_level(logging.WARNING, logger="facesvc.serve.wiring"):
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


async def test_the_liveness_judge_gets_the_packs_turned_face_threshold(
    engine_kit: EngineKit, model_pack: ModelPack
) -> None:
    """The default pack ships a threshold calibrated on turned faces (facesvc calibrate
    --turned), stricter than the frontal one for SFace, and the challenge's identity check
    judges turned frames with it."""
    turned = model_pack.turned_threshold
    assert turned is not None and model_pack.threshold is not None
    assert turned < model_pack.threshold
    judge = engine_kit.engine._judge  # the engine's collaborator, as wiring built it
    assert judge.turned_identity_threshold == turned
