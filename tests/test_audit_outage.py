"""When the audit stream cannot be written, nothing leaves without its entry and nothing is
lost with it (docs/scaling.md: the audit stream's master dying). A real Redis whose stream
key holds a string refuses every XADD (WRONGTYPE), as a dead master refuses it, while the
participant's own keys still answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from facesvc.domain import Decision, Gate
from facesvc.models.pack import ModelPack
from facesvc.store.errors import StoreUnavailable
from facesvc.store.keys import KeySpace
from facesvc.tokens.claims import CheckReason, Expectation
from tests.engine_support import ADMIN, LMS, EngineKit, running_engine
from tests.test_engine import PID, enroll, genuine_frame, scan

pytestmark = pytest.mark.calendar

EXPECTED = Expectation(audience=LMS.tenant, gate=Gate.SESSION, session_id="session-1")


@pytest.fixture
async def kit(
    tmp_path: Path, redis_url: str, redis_prefix: str, model_pack: ModelPack
) -> AsyncIterator[EngineKit]:
    async with running_engine(tmp_path, redis_url, redis_prefix, model_pack) as engine_kit:
        yield engine_kit


async def _audit_broken(kit: EngineKit, broken: bool) -> None:
    stream = KeySpace(kit.settings.redis.key_prefix).audit_stream()
    if broken:
        await kit.redis.delete(stream)
        await kit.redis.set(stream, "not a stream")
    else:
        await kit.redis.delete(stream)


async def _entries(kit: EngineKit) -> list[dict[str, str]]:
    stream = KeySpace(kit.settings.redis.key_prefix).audit_stream()
    rows = await kit.redis.xrange(stream)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]


async def test_a_redemption_whose_audit_entry_fails_does_not_burn_the_token(
    kit: EngineKit,
) -> None:
    await enroll(kit)
    verified = await kit.engine.verify(scan([genuine_frame()]))
    assert verified.decision is Decision.VERIFIED and verified.token is not None

    await _audit_broken(kit, True)
    with pytest.raises(StoreUnavailable):
        await kit.engine.redeem(verified.token.token, EXPECTED, caller=LMS)
    await _audit_broken(kit, False)

    retried = await kit.engine.redeem(verified.token.token, EXPECTED, caller=LMS)
    assert retried.ok, retried.reason
    assert [e["outcome"] for e in await _entries(kit) if e["action"] == "redeem"] == ["OK"]
    again = await kit.engine.redeem(verified.token.token, EXPECTED, caller=LMS)
    assert again.reason is CheckReason.ALREADY_USED


async def test_a_verified_answer_replayed_after_a_failed_audit_entry_is_audited(
    kit: EngineKit,
) -> None:
    await enroll(kit)
    await _audit_broken(kit, True)
    with pytest.raises(StoreUnavailable):
        await kit.engine.verify(scan([genuine_frame()], idempotency_key="scan-7"))
    await _audit_broken(kit, False)

    replayed = await kit.engine.verify(scan([genuine_frame()], idempotency_key="scan-7"))
    assert replayed.replayed and replayed.decision is Decision.VERIFIED
    assert replayed.token is not None
    verifies = [e for e in await _entries(kit) if e["action"] == "verify"]
    assert [(e["outcome"], e["reason"], e["verification_id"]) for e in verifies] == [
        ("VERIFIED", "replayed", replayed.verification_id)
    ]
    usage = await kit.engine.attempts(PID, "training-1", scan([]).training_type, caller=ADMIN)
    assert usage.used == 1  # the replay spent nothing
