"""The engine end to end on the real default pack and a real Redis: decisions, caps, refunds."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from facesvc.config import ConfigError, load_settings
from facesvc.domain import Decision, Gate, TrainingType
from facesvc.engine import Caller, VerifyCommand
from facesvc.models.pack import ModelPack
from facesvc.models.pipeline import FaceStatus
from facesvc.store.templates import AlreadyEnrolled
from facesvc.tokens.signed import verify_compact
from tests.clocks import wib_at
from tests.engine_support import (
    ADMIN,
    LMS,
    TENANTS,
    EngineKit,
    astronaut,
    insightface_image,
    jpeg,
    running_engine,
    two_people,
)

pytestmark = pytest.mark.calendar

PID = "participant-1"


def scan(
    frames: list[bytes],
    *,
    training_type: TrainingType = TrainingType.SPL,
    gate: Gate = Gate.SESSION,
    training_id: str = "training-1",
    caller: Caller = LMS,
    **kwargs: object,
) -> VerifyCommand:
    return VerifyCommand(
        participant_id=PID,
        training_id=training_id,
        training_type=training_type,
        gate=gate,
        session_id="session-1" if gate is not Gate.REDEEM else "",
        frames=frames,
        caller=caller,
        **kwargs,  # type: ignore[arg-type]
    )


def genuine_frame() -> bytes:
    """The enrolled person again, but not the enrolled pixels: cropped, rescaled, darker,
    recompressed."""
    from PIL import Image

    face = astronaut()[10:400, 60:420]
    image = Image.fromarray((face * 0.85).astype(np.uint8)).resize((300, 325))
    return jpeg(np.asarray(image), quality=75)


def impostor_frame() -> bytes:
    return jpeg(insightface_image("Tom_Hanks_54745.png"))


async def enroll(kit: EngineKit) -> None:
    outcome = await kit.engine.enroll(
        PID, [jpeg(astronaut())], replace=False, caller=ADMIN, tenants=TENANTS
    )
    assert outcome.enrolled, outcome.reason


async def test_genuine_scan_is_verified_with_a_token_and_costs_one_attempt(
    engine_kit: EngineKit,
) -> None:
    await enroll(engine_kit)
    outcome = await engine_kit.engine.verify(scan([genuine_frame()]))
    assert outcome.decision is Decision.VERIFIED, outcome.reason
    assert outcome.attempts.used == 1 and outcome.attempts.remaining == 4
    assert outcome.token is not None
    keys = engine_kit.engine.signing_keys()
    assert keys
    from facesvc.tokens.jws import PublicKeySet

    verified = verify_compact(
        outcome.token.token, PublicKeySet({k.kid: k.public_key for k in keys})
    )
    assert verified.payload["sub"] == PID and verified.payload["aud"] == LMS.tenant
    assert "score" not in verified.payload and "distance" not in verified.payload


async def test_impostor_is_not_matched_and_the_attempt_counts(engine_kit: EngineKit) -> None:
    await enroll(engine_kit)
    outcome = await engine_kit.engine.verify(scan([impostor_frame()]))
    assert outcome.decision is Decision.NOT_MATCHED
    assert outcome.token is None
    usage = await engine_kit.engine.attempts(PID, "training-1", TrainingType.SPL, caller=ADMIN)
    assert usage.used == 1


async def test_two_faces_is_multiple_faces_and_costs_no_attempt(engine_kit: EngineKit) -> None:
    await enroll(engine_kit)
    outcome = await engine_kit.engine.verify(scan([jpeg(two_people())]))
    assert outcome.decision is Decision.MULTIPLE_FACES
    assert outcome.attempts.used == 0
    usage = await engine_kit.engine.attempts(PID, "training-1", TrainingType.SPL, caller=ADMIN)
    assert usage.used == 0 and usage.remaining == 5


async def test_no_face_is_refunded(engine_kit: EngineKit) -> None:
    await enroll(engine_kit)
    blank = jpeg(np.full((480, 640, 3), 128, dtype=np.uint8))
    outcome = await engine_kit.engine.verify(scan([blank]))
    assert outcome.decision is Decision.NO_FACE
    assert (
        await engine_kit.engine.attempts(PID, "training-1", TrainingType.SPL, caller=ADMIN)
    ).used == 0


async def test_not_enrolled_never_touches_the_counter(engine_kit: EngineKit) -> None:
    outcome = await engine_kit.engine.verify(scan([genuine_frame()]))
    assert outcome.decision is Decision.NOT_ENROLLED
    assert outcome.attempts.used == 0
    keys = [
        k
        async for k in engine_kit.redis.scan_iter(
            match=f"{engine_kit.settings.redis.key_prefix}*cap*"
        )
    ]
    assert keys == []


async def test_outside_the_webinar_window_never_touches_the_counter(engine_kit: EngineKit) -> None:
    await enroll(engine_kit)
    start = engine_kit.clock.now() + timedelta(hours=3)
    outcome = await engine_kit.engine.verify(
        scan(
            [genuine_frame()],
            training_type=TrainingType.WEBINAR,
            gate=Gate.REDEEM,
            scheduled_start=start,
        )
    )
    assert outcome.decision is Decision.OUTSIDE_WINDOW
    assert "WIB" in outcome.reason
    assert (
        await engine_kit.engine.attempts(PID, "training-1", TrainingType.WEBINAR, caller=ADMIN)
    ).used == 0


@pytest.mark.parametrize(
    ("training_type", "cap"), [(TrainingType.SPL, 5), (TrainingType.WEBINAR, 10)]
)
async def test_fifty_concurrent_scans_are_capped_exactly(
    engine_kit: EngineKit, training_type: TrainingType, cap: int
) -> None:
    await enroll(engine_kit)
    frame = impostor_frame()
    outcomes = await asyncio.gather(
        *(engine_kit.engine.verify(scan([frame], training_type=training_type)) for _ in range(50))
    )
    decisions = Counter(o.decision for o in outcomes)
    assert decisions == {Decision.NOT_MATCHED: cap, Decision.ATTEMPTS_EXHAUSTED: 50 - cap}
    exhausted = [o for o in outcomes if o.decision is Decision.ATTEMPTS_EXHAUSTED]
    # No face work at all for an exhausted scan, and the reset time is the next WIB midnight.
    assert all("faces" not in o.timings_ms and "embed" not in o.timings_ms for o in exhausted)
    assert {o.attempts.resets_at for o in exhausted} == {wib_at(0, days=1)}
    assert "resets at 00:00 WIB" in exhausted[0].reason


async def test_the_count_resets_at_midnight_wib(engine_kit: EngineKit) -> None:
    await enroll(engine_kit)
    frame = impostor_frame()
    engine_kit.clock.set(wib_at(23, 59, 59))
    late = await engine_kit.engine.verify(scan([frame]))
    assert late.attempts.used == 1
    engine_kit.clock.set(wib_at(0, days=1))
    assert (
        await engine_kit.engine.attempts(PID, "training-1", TrainingType.SPL, caller=ADMIN)
    ).used == 0
    early = await engine_kit.engine.verify(scan([frame]))
    assert early.attempts.used == 1


async def test_a_retried_scan_with_its_idempotency_key_costs_one_attempt(
    engine_kit: EngineKit,
) -> None:
    await enroll(engine_kit)
    first = await engine_kit.engine.verify(scan([genuine_frame()], idempotency_key="scan-42"))
    again = await engine_kit.engine.verify(scan([genuine_frame()], idempotency_key="scan-42"))
    assert first.decision is Decision.VERIFIED and again.decision is Decision.VERIFIED
    assert again.replayed and not first.replayed
    assert again.token is not None and first.token is not None
    assert again.token.jti == first.token.jti
    assert (
        await engine_kit.engine.attempts(PID, "training-1", TrainingType.SPL, caller=ADMIN)
    ).used == 1


async def test_enrolling_twice_needs_replace(engine_kit: EngineKit) -> None:
    await enroll(engine_kit)
    with pytest.raises(AlreadyEnrolled):
        await engine_kit.engine.enroll(PID, [jpeg(astronaut())], replace=False, caller=ADMIN)
    replaced = await engine_kit.engine.enroll(PID, [jpeg(astronaut())], replace=True, caller=ADMIN)
    assert replaced.enrolled


async def test_enrollment_metadata_and_raw_values_hold_no_descriptor(engine_kit: EngineKit) -> None:
    await enroll(engine_kit)
    metadata = await engine_kit.engine.enrollment(PID)
    assert metadata is not None and metadata.image_count == 1
    assert not hasattr(metadata, "descriptors")
    template = await engine_kit.engine._templates.get(PID)
    assert template is not None
    raw = template.descriptors.astype(np.float32).tobytes()
    needles = [raw[:16], base64.b64encode(raw)[:24]]
    prefix = engine_kit.settings.redis.key_prefix
    async for key in engine_kit.redis.scan_iter(match=f"{prefix}*"):
        if await engine_kit.redis.type(key) not in (b"string", "string"):
            continue
        value = await engine_kit.redis.get(key)
        assert all(n not in value for n in needles), key


async def test_delete_really_deletes(engine_kit: EngineKit) -> None:
    await enroll(engine_kit)
    await engine_kit.engine.verify(scan([impostor_frame()]))
    assert await engine_kit.engine.delete_enrollment(PID, caller=ADMIN)
    prefix = engine_kit.settings.redis.key_prefix
    left = [k async for k in engine_kit.redis.scan_iter(match=f"{prefix}*{{p:{PID}}}*")]
    assert left == []
    outcome = await engine_kit.engine.verify(scan([genuine_frame()]))
    assert outcome.decision is Decision.NOT_ENROLLED


async def test_metrics_count_decisions_exhaustions_and_redis_time(engine_kit: EngineKit) -> None:
    await enroll(engine_kit)
    frame = impostor_frame()
    for _ in range(6):
        await engine_kit.engine.verify(scan([frame]))
    registry = engine_kit.metrics.registry
    labels = {"decision": "NOT_MATCHED", "training_type": "SPL", "gate": "SESSION"}
    assert registry.get_sample_value("facesvc_decisions_total", labels) == 5
    assert registry.get_sample_value("facesvc_cap_exhausted_total", {"training_type": "SPL"}) == 1
    assert registry.get_sample_value("facesvc_redis_seconds_count", {"op": "reserve"}) == 6


async def test_a_scan_past_its_deadline_costs_nothing_and_its_retry_is_decided(
    engine_kit: EngineKit,
) -> None:
    await enroll(engine_kit)
    with pytest.raises(TimeoutError):
        await engine_kit.engine.verify(
            scan([impostor_frame()], idempotency_key="scan-7", deadline=time.monotonic() - 1)
        )
    assert (
        await engine_kit.engine.attempts(PID, "training-1", TrainingType.SPL, caller=ADMIN)
    ).used == 0
    retry = await engine_kit.engine.verify(scan([impostor_frame()], idempotency_key="scan-7"))
    assert retry.decision is Decision.NOT_MATCHED and not retry.replayed
    assert retry.attempts.used == 1


async def test_the_quality_settings_set_the_engines_gates(
    tmp_path: Path, redis_url: str, redis_prefix: str, model_pack: ModelPack
) -> None:
    frame = jpeg(astronaut())  # one face, well under 400 px tall in a 512 px photo
    async with running_engine(tmp_path, redis_url, redis_prefix, model_pack) as kit:
        default = await kit.engine.inspect(frame)
    async with running_engine(
        tmp_path, redis_url, redis_prefix, model_pack, quality__min_face_px=400
    ) as kit:
        too_small = await kit.engine.inspect(frame)
    async with running_engine(
        tmp_path,
        redis_url,
        redis_prefix,
        model_pack,
        quality__min_face_px=400,
        quality__min_detect_px=400,
    ) as kit:
        not_looked_for = await kit.engine.inspect(frame)
    assert default.status is FaceStatus.OK and default.face_height_px < 400
    assert too_small.status is FaceStatus.LOW_QUALITY
    assert too_small.failed_checks == ("face_size",)
    assert not_looked_for.status is FaceStatus.NO_FACE


def test_conflicting_quality_settings_are_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="min_detect_px <= min_face_px"):
        load_settings(env={}, overrides={"quality.min_face_px": 60, "quality.min_detect_px": 80})


async def test_a_large_jpeg_is_decoded_reduced_unless_the_setting_is_zero(
    tmp_path: Path, redis_url: str, redis_prefix: str, model_pack: ModelPack
) -> None:
    from PIL import Image

    photo = np.asarray(Image.fromarray(astronaut()).resize((3000, 3000)))
    data = jpeg(photo)
    # The side rule alone: decoding budget and analysed size raised above 9 MP here.
    roomy = {"server__max_decode_pixels": 10_000_000, "server__max_analyze_pixels": 10_000_000}
    async with running_engine(tmp_path, redis_url, redis_prefix, model_pack, **roomy) as kit:
        reduced = await kit.engine.inspect(data)
    async with running_engine(
        tmp_path, redis_url, redis_prefix, model_pack, server__jpeg_reduce_to_side=0, **roomy
    ) as kit:
        full = await kit.engine.inspect(data)
    # 1280 by default: 3000 px is decoded at 1/2 (1500), the strongest reduction >= 1280.
    assert (reduced.width_px, reduced.height_px) == (1500, 1500)
    assert (full.width_px, full.height_px) == (3000, 3000)
    assert reduced.status is FaceStatus.OK and full.status is FaceStatus.OK
    # The same face at half the scale, up to one step of the detector's 1.2x pyramid.
    assert 1 / 1.25 < reduced.face_height_px * 2 / full.face_height_px < 1.25
