"""Abuse limits on a real Redis: the per-client request rate and the spoof lockout.

Time is a :class:`FixedClock` moved by the test, so window arithmetic is exact; the
counters themselves live in Redis under a per-test prefix.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.accuracy.flat_attacks import Hold, hand_shake, render
from facesvc.clock import FixedClock
from facesvc.limits.abuse import (
    ClientRateLimiter,
    LockoutRule,
    ParticipantLocked,
    RateRule,
    SpoofLockout,
)
from facesvc.models.types import Box
from facesvc.store.connection import redis_client_from_url
from facesvc.store.errors import StoreUnavailable
from facesvc.store.keys import KeySpace
from facesvc.transport.auth import Client, Role, new_api_key, write_keys_file
from tests.clocks import wib_at
from tests.conftest import RunningServer, ServerStarter
from tests.engine_support import astronaut, jpeg
from tests.test_service_verify import PID, enroll, start
from tools.redis_local import RedisServer

pytestmark = pytest.mark.calendar

# A window boundary, so "n seconds into the window" is exact.
T0 = wib_at(10)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    redis = redis_client_from_url(redis_url)
    assert isinstance(redis, aioredis.Redis)
    yield redis
    await redis.aclose()


async def test_rate_admits_the_limit_then_refuses_with_a_wait(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    clock = FixedClock(T0)
    limiter = ClientRateLimiter(
        client, RateRule(5, timedelta(seconds=10)), clock, key_prefix=redis_prefix
    )
    results = await asyncio.gather(*(limiter.admit("lms-a") for _ in range(8)))
    assert results.count(None) == 5  # atomic: concurrent calls never overshoot
    refused = [r for r in results if r is not None]
    assert all(0 < r <= 2 * 10 for r in refused)  # never longer than two windows
    assert await limiter.admit("lms-b") is None  # each client has its own budget


async def test_rate_slides_the_previous_window_out(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    clock = FixedClock(T0 + timedelta(seconds=9))  # late in window 0
    limiter = ClientRateLimiter(
        client, RateRule(10, timedelta(seconds=10)), clock, key_prefix=redis_prefix
    )
    for _ in range(10):
        assert await limiter.admit("c") is None
    clock.set(T0 + timedelta(seconds=10))  # window 1 starts: window 0 still weighs fully
    wait = await limiter.admit("c")
    assert wait is not None and wait > 0
    # A fixed window would now admit 10 at once; the sliding estimate admits as the
    # previous window's weight falls: at 5 s in, 10 * 0.5 = 5 are counted, 5 more fit.
    clock.set(T0 + timedelta(seconds=15))
    admitted = [await limiter.admit("c") for _ in range(7)]
    assert admitted.count(None) == 5
    clock.set(T0 + timedelta(seconds=25))  # window 0 has slid out entirely
    assert await limiter.admit("c") is None


async def test_rate_retry_after_is_enough(client: aioredis.Redis, redis_prefix: str) -> None:
    clock = FixedClock(T0 + timedelta(seconds=2))
    limiter = ClientRateLimiter(
        client, RateRule(3, timedelta(seconds=10)), clock, key_prefix=redis_prefix
    )
    for _ in range(3):
        assert await limiter.admit("c") is None
    for _ in range(4):  # being told to wait, then waiting that long, always gets in
        wait = await limiter.admit("c")
        assert wait is not None
        clock.advance(timedelta(seconds=wait))
        assert await limiter.admit("c") is None


async def test_rate_counts_a_costly_call_as_its_cost(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    clock = FixedClock(T0 + timedelta(seconds=2))
    limiter = ClientRateLimiter(
        client, RateRule(10, timedelta(seconds=10)), clock, key_prefix=redis_prefix
    )
    assert await limiter.admit("c", cost=4) is None
    assert await limiter.admit("c", cost=4) is None
    wait = await limiter.admit("c", cost=4)  # 8 + 4 > 10: refused, and not counted
    assert wait is not None
    assert await limiter.admit("c", cost=2) is None  # 8 + 2 fits
    assert await limiter.admit("c") is not None
    clock.advance(timedelta(seconds=await limiter.admit("c", cost=4) or 0))
    assert await limiter.admit("c", cost=4) is None  # the wait it was told was enough
    with pytest.raises(ValueError, match="between 1 and the limit"):
        await limiter.admit("c", cost=11)


async def test_lockout_after_threshold_within_window(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    clock = FixedClock(T0)
    rule = LockoutRule(3, window=timedelta(minutes=15), lock_for=timedelta(minutes=30))
    lockout = SpoofLockout(client, rule, clock, key_prefix=redis_prefix)
    assert await lockout.record_spoof("p-1", "v1") is None
    clock.advance(timedelta(minutes=16))  # v1 has left the window
    assert await lockout.record_spoof("p-1", "v2") is None
    assert await lockout.record_spoof("p-1", "v2") is None  # the same decision counts once
    clock.advance(timedelta(minutes=5))
    assert await lockout.record_spoof("p-1", "v3") is None
    await lockout.check("p-1")  # two strikes in the window (v2, v3): not locked
    clock.advance(timedelta(minutes=1))
    until = await lockout.record_spoof("p-1", "v4")
    assert until == clock.now() + timedelta(minutes=30)
    with pytest.raises(ParticipantLocked) as locked:
        await lockout.check("p-1")
    assert locked.value.until == until and locked.value.retry_after_s == 30 * 60
    assert "WIB" in str(locked.value) and "try again" in str(locked.value)
    await lockout.check("p-2")  # another participant is not affected

    keys = KeySpace(redis_prefix)
    ttl_ms = await client.pttl(keys.lockout("p-1"))
    assert 0 < ttl_ms <= 30 * 60 * 1000  # Redis forgets the lock by itself
    assert not await client.exists(keys.spoof_strikes("p-1"))  # strikes cleared on lock
    assert keys.lockout("p-1").startswith(keys.participant("p-1"))  # participant hash tag


async def test_limits_fail_closed_when_redis_is_down() -> None:
    dead = redis_client_from_url(
        "redis://127.0.0.1:1/0", socket_connect_timeout_s=0.2, socket_timeout_s=0.2
    )
    clock = FixedClock(T0)
    try:
        limiter = ClientRateLimiter(dead, RateRule(5, timedelta(seconds=1)), clock)
        lockout = SpoofLockout(dead, LockoutRule(3, timedelta(1), timedelta(1)), clock)
        with pytest.raises(StoreUnavailable):
            await limiter.admit("c")
        with pytest.raises(StoreUnavailable):
            await lockout.check("p")
        with pytest.raises(StoreUnavailable):
            await lockout.record_spoof("p", "v")
    finally:
        await dead.aclose()


def test_rules_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        RateRule(0, timedelta(seconds=1))
    with pytest.raises(ValueError):
        LockoutRule(3, timedelta(0), timedelta(1))


def _lms_gate_server(
    start_server: ServerStarter, tmp_path: Path, redis_url: str, **settings: Any
) -> tuple[RunningServer, tuple[tuple[str, str], ...]]:
    """A server that knows one LMS gate's API key, and the metadata that presents it."""
    key, key_id, digest = new_api_key()
    path = tmp_path / "keys.json"
    write_keys_file(path, [Client("lms-a-gate", Role.LMS, "lms-a", key_id, digest)])
    server = start_server(redis_url, security__api_keys_file=str(path), **settings)
    return server, (("authorization", f"Bearer {key}"),)


def test_server_answers_resource_exhausted_with_retry_after(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    server, metadata = _lms_gate_server(
        start_server, tmp_path, redis_url, abuse__client_rate="3", abuse__client_rate_window_s="600"
    )
    codes = []
    for _ in range(5):
        try:
            server.stub.GetSigningKeys(pb.GetSigningKeysRequest(), timeout=10, metadata=metadata)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
            last = error
    assert grpc.StatusCode.RESOURCE_EXHAUSTED not in codes[:3]
    assert codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    trailers = dict(last.trailing_metadata() or ())
    assert int(trailers["retry-after"]) >= 1
    assert "retry after" in (last.details() or "")


def test_spoof_suspicions_lock_the_participant_before_any_attempt_is_spent(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    # Each scan is the enrolled photo printed and tilted 50 degrees about a diagonal: the
    # apparent yaw of a turn to the right without a head's depth, so SPOOF_SUSPECTED (the
    # passive model's verdict alone would cost nothing, tests/test_engine_liveness.py);
    # two of them lock the participant.
    server = start(
        start_server,
        redis_url,
        tmp_path,
        liveness__spl="challenge",
        liveness__challenge_steps=("TURN_RIGHT",),
        liveness__challenge_length=1,
        abuse__spoof_lockout_threshold=2,
    )
    assert enroll(server).enrolled
    photo = astronaut()
    face = Box(170.0, 40.0, 270.0, 160.0)
    tilted = Hold(tilt_deg=-50.0, axis_deg=135.0)
    frames = [
        jpeg(render(photo, face, hand_shake(hold, k))) for hold in (Hold(), tilted) for k in (0, 1)
    ]
    request = dict(
        participant_id=PID,
        training_id="course-1",
        training_type=pb.TRAINING_TYPE_SPL,
        gate=pb.GATE_SESSION,
    )

    def challenge() -> str:
        reply = server.stub.StartLivenessChallenge(
            pb.StartLivenessChallengeRequest(**request), timeout=10
        )
        return str(reply.challenge_id)

    def flat_scan(challenge_id: str) -> pb.VerifyResponse:
        reply: pb.VerifyResponse = server.stub.Verify(
            pb.VerifyRequest(**request, session_id="s1", frames=frames, challenge_id=challenge_id),
            timeout=60,
        )
        return reply

    for _ in range(2):
        refused = flat_scan(challenge())
        assert refused.decision == pb.DECISION_SPOOF_SUSPECTED, refused.reason
        assert "flat" in refused.reason
    with pytest.raises(grpc.RpcError) as locked:
        flat_scan("a-challenge-that-was-never-issued")
    assert locked.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "paused until" in (locked.value.details() or "")
    retry_after = int(dict(locked.value.trailing_metadata() or ())["retry-after"])
    assert 1790 <= retry_after <= 1800
    with pytest.raises(grpc.RpcError) as refused_challenge:
        challenge()
    assert refused_challenge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    attempts = server.stub.GetAttempts(
        pb.GetAttemptsRequest(
            participant_id=PID, training_id="course-1", training_type=pb.TRAINING_TYPE_SPL
        ),
        timeout=10,
    )
    assert attempts.used == 2  # the refused scan spent nothing


def test_rate_limit_fails_closed_through_the_server(
    start_server: ServerStarter, dedicated_redis: RedisServer, tmp_path: Path
) -> None:
    server, metadata = _lms_gate_server(start_server, tmp_path, dedicated_redis.url)
    dedicated_redis.stop()
    with pytest.raises(grpc.RpcError) as down:
        server.stub.GetSigningKeys(pb.GetSigningKeysRequest(), timeout=10, metadata=metadata)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "client request rate" in (down.value.details() or "")
    dedicated_redis.start()
    with pytest.raises(grpc.RpcError) as up:  # no engine: past the limiter, UNIMPLEMENTED
        server.stub.GetSigningKeys(pb.GetSigningKeysRequest(), timeout=10, metadata=metadata)
    assert up.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_audited_calls_count_more_against_the_client_rate(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    # Each RedeemToken writes an audit event, whatever its outcome: at one request each, one
    # LMS key could append 6,000 events a minute and flush a count-capped trail in hours.
    server, metadata = _lms_gate_server(
        start_server,
        tmp_path,
        redis_url,
        abuse__client_rate="25",
        abuse__client_rate_window_s="600",
        abuse__audited_call_cost="10",
    )

    def code(call: Any, request: Any) -> grpc.StatusCode:
        try:
            call(request, timeout=10, metadata=metadata)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    redeem = pb.RedeemTokenRequest(token="x.y.z", audience="lms-a")
    # Past the limiter (refused afterwards, as a malformed token), twice: 20 of 25.
    assert exhausted not in [code(server.stub.RedeemToken, redeem) for _ in range(2)]
    assert code(server.stub.RedeemToken, redeem) is exhausted
    # An unaudited call still fits in what is left, one request each.
    keys_request = pb.GetSigningKeysRequest()
    codes = [code(server.stub.GetSigningKeys, keys_request) for _ in range(6)]
    assert exhausted not in codes[:5]
    assert codes[5] is exhausted
