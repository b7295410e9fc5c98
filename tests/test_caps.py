"""Daily attempt caps against a real Redis server: atomicity, WIB day, refunds, faults."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from facesvc.clock import SystemClock
from facesvc.config import LimitsSettings
from facesvc.domain import TrainingType
from facesvc.errors import InvalidRequest
from facesvc.limits.caps import (
    AttemptCaps,
    CapRule,
    Exhausted,
    IdempotencyConflict,
    IdempotentScan,
    Reservation,
    cap_rules,
)
from facesvc.store.connection import redis_client_from_url
from facesvc.store.errors import StoreUnavailable
from facesvc.store.keys import KeySpace
from tests.clocks import wib_at
from tools.redis_local import RedisServer, free_port

pytestmark = pytest.mark.calendar

SPL, WEBINAR, OFFLINE = TrainingType.SPL, TrainingType.WEBINAR, TrainingType.OFFLINE

Scenario = Callable[[AttemptCaps, aioredis.Redis, str], Awaitable[None]]


def run(scenario: Scenario, url: str, prefix: str) -> None:
    """Run ``scenario`` with caps on ``prefix`` (the ``redis_prefix`` fixture cleans it)."""

    async def main() -> None:
        client = redis_client_from_url(url, socket_timeout_s=2.0, socket_connect_timeout_s=2.0)
        assert isinstance(client, aioredis.Redis)
        try:
            caps = AttemptCaps(client, cap_rules(LimitsSettings()), key_prefix=prefix)
            await scenario(caps, client, prefix)
        finally:
            await client.aclose()

    asyncio.run(main())


def scan(key: str, owner: str = "kiosk-7", request: str = "request-1") -> IdempotentScan:
    """An idempotent scan under ``key`` of caller ``owner`` for the request ``request``."""
    return IdempotentScan(key, owner, request)


def future_day(days: int = 3) -> datetime:
    """Noon WIB a few days ahead of the real date."""
    return wib_at(12, days=days)


async def burst(
    caps: AttemptCaps, n: int, training_type: TrainingType, now: datetime
) -> list[Reservation | Exhausted]:
    """``n`` reservations in flight at once for one participant and training."""
    return list(
        await asyncio.gather(*(caps.reserve("p1", "t1", training_type, now) for _ in range(n)))
    )


@pytest.mark.parametrize(("training_type", "limit"), [(SPL, 5), (WEBINAR, 10)])
def test_concurrent_burst_admits_exactly_the_cap(
    training_type: TrainingType, limit: int, redis_url: str, redis_prefix: str
) -> None:
    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = future_day()
        outcomes = await burst(caps, 50, training_type, now)
        reserved = [o for o in outcomes if isinstance(o, Reservation)]
        exhausted = [o for o in outcomes if isinstance(o, Exhausted)]
        assert len(reserved) == limit
        assert len(exhausted) == 50 - limit
        assert sorted(r.used for r in reserved) == list(range(1, limit + 1))
        assert len({r.reservation_id for r in reserved}) == limit
        assert all(o.used == limit and o.remaining == 0 for o in exhausted)
        usage = await caps.usage("p1", "t1", training_type, now)
        assert (usage.used, usage.remaining, usage.limit) == (limit, 0, limit)

    run(scenario, redis_url, redis_prefix)


def test_caps_are_per_participant_and_per_training(redis_url: str, redis_prefix: str) -> None:
    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = future_day()
        await burst(caps, 5, SPL, now)
        assert isinstance(await caps.reserve("p1", "t1", SPL, now), Exhausted)
        assert isinstance(await caps.reserve("p1", "t2", SPL, now), Reservation)
        assert isinstance(await caps.reserve("p2", "t1", SPL, now), Reservation)

    run(scenario, redis_url, redis_prefix)


def test_offline_cap_is_configurable(redis_url: str, redis_prefix: str) -> None:
    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        caps3 = AttemptCaps(client, cap_rules(LimitsSettings(cap_offline=3)), key_prefix=prefix)
        outcomes = await burst(caps3, 6, OFFLINE, future_day())
        assert sum(isinstance(o, Reservation) for o in outcomes) == 3
        assert caps.limit_for(OFFLINE) == 10

    run(scenario, redis_url, redis_prefix)


def test_rules_must_cover_every_type_once() -> None:
    client = aioredis.Redis()
    with pytest.raises(ValueError, match="OFFLINE"):
        AttemptCaps(client, [CapRule(SPL, 5), CapRule(WEBINAR, 10)])
    with pytest.raises(ValueError, match="two cap rules"):
        AttemptCaps(client, [*cap_rules(LimitsSettings()), CapRule(SPL, 1)])
    with pytest.raises(ValueError, match=">= 0"):
        AttemptCaps(client, [CapRule(SPL, -1), CapRule(WEBINAR, 10), CapRule(OFFLINE, 1)])


def test_wib_day_boundary(redis_url: str, redis_prefix: str) -> None:
    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        day = future_day()
        last_second = day.replace(hour=23, minute=59, second=59)
        midnight = last_second + timedelta(seconds=1)
        # Earlier the same WIB day, given in UTC: the calendar day is WIB's, not UTC's.
        morning_utc = day.replace(hour=6).astimezone(UTC)
        assert morning_utc.date() != day.date()
        for _ in range(4):
            assert isinstance(await caps.reserve("p1", "t1", SPL, morning_utc), Reservation)
        fifth = await caps.reserve("p1", "t1", SPL, last_second)
        assert isinstance(fifth, Reservation)
        assert fifth.used == 5
        assert fifth.resets_at == midnight
        assert fifth.day == day.date()
        refused = await caps.reserve("p1", "t1", SPL, last_second)
        assert isinstance(refused, Exhausted)
        assert refused.resets_at == midnight
        fresh = await caps.reserve("p1", "t1", SPL, midnight)
        assert isinstance(fresh, Reservation)
        assert (fresh.used, fresh.remaining) == (1, 4)
        assert fresh.resets_at == midnight + timedelta(days=1)

    run(scenario, redis_url, redis_prefix)


@pytest.mark.parametrize("offset_days", [-365, -1, 1, 365])
def test_a_service_clock_far_from_redis_never_writes_an_expired_counter(
    offset_days: int, redis_url: str, redis_prefix: str
) -> None:
    """The service's clock decides the day, Redis's the expiry: however far apart they are,
    the counter is written alive and the cap holds (an absolute EXPIREAT from a clock behind
    Redis's deleted the counter at once, and every scan was admitted)."""

    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = SystemClock().now() + timedelta(days=offset_days)
        outcomes = await burst(caps, 12, SPL, now)
        reserved = [o for o in outcomes if isinstance(o, Reservation)]
        assert len(reserved) == 5
        key = KeySpace(prefix).cap("p1", "t1", reserved[0].day)
        ttl_s = await client.pttl(key) / 1000
        until_day_end = (reserved[0].resets_at - now).total_seconds()
        assert until_day_end < ttl_s <= until_day_end + 3600 + 1  # TTLs round up to the ms
        assert (await caps.usage("p1", "t1", SPL, now)).used == 5

    run(scenario, redis_url, redis_prefix)


def test_counter_expires_after_the_wib_day_ends(redis_url: str, redis_prefix: str) -> None:
    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = SystemClock().now()
        reservation = await caps.reserve("p1", "t1", WEBINAR, now)
        assert isinstance(reservation, Reservation)
        key = KeySpace(prefix).cap("p1", "t1", reservation.day)
        ttl = await client.ttl(key)
        until_day_end = (reservation.resets_at - SystemClock().now()).total_seconds()
        # Expires after the day's end, within the one-hour grace.
        assert until_day_end < ttl <= until_day_end + 3600 + 2

    run(scenario, redis_url, redis_prefix)


def test_refund_restores_one_attempt_once_and_only_on_its_day(
    redis_url: str, redis_prefix: str
) -> None:
    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = future_day()
        outcomes = await burst(caps, 5, SPL, now)
        first = outcomes[0]
        assert isinstance(first, Reservation)
        assert isinstance(await caps.reserve("p1", "t1", SPL, now), Exhausted)
        assert await caps.refund(first) is True
        assert await caps.refund(first) is False  # idempotent
        assert (await caps.usage("p1", "t1", SPL, now)).used == 4
        again = await caps.reserve("p1", "t1", SPL, now)
        assert isinstance(again, Reservation)
        assert again.used == 5

        # Yesterday's reservation refunded today leaves today's count alone.
        tomorrow = now + timedelta(days=1)
        today_res = await caps.reserve("p1", "t1", SPL, tomorrow)
        assert isinstance(today_res, Reservation)
        assert await caps.refund(again) is True
        assert (await caps.usage("p1", "t1", SPL, tomorrow)).used == 1

    run(scenario, redis_url, redis_prefix)


def test_refund_never_goes_below_zero(redis_url: str, redis_prefix: str) -> None:
    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = future_day()
        reservation = await caps.reserve("p1", "t1", SPL, now)
        assert isinstance(reservation, Reservation)
        for _ in range(3):
            await caps.refund(reservation)
        usage = await caps.usage("p1", "t1", SPL, now)
        assert (usage.used, usage.remaining) == (0, 5)

    run(scenario, redis_url, redis_prefix)


def test_idempotency_key_reserves_once_and_replays_the_decision(
    redis_url: str, redis_prefix: str
) -> None:
    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = future_day()
        first, *retries = await asyncio.gather(
            *(
                caps.reserve("p1", "t1", SPL, now, idempotent=scan("kiosk-7:scan-1"))
                for _ in range(5)
            )
        )
        outcomes = [first, *retries]
        assert all(isinstance(o, Reservation) for o in outcomes)
        assert len({o.reservation_id for o in outcomes if isinstance(o, Reservation)}) == 1
        assert sum(not o.replayed for o in outcomes) == 1
        assert (await caps.usage("p1", "t1", SPL, now)).used == 1

        original = next(o for o in outcomes if not o.replayed)
        assert await caps.record_decision(original, b"VERIFIED:token-abc") is True
        replay = await caps.reserve("p1", "t1", SPL, now, idempotent=scan("kiosk-7:scan-1"))
        assert replay.replayed and replay.prior_decision == b"VERIFIED:token-abc"

        # Another key, or the same key for another training, is another scan.
        other = await caps.reserve("p1", "t1", SPL, now, idempotent=scan("kiosk-7:scan-2"))
        other_training = await caps.reserve("p1", "t9", SPL, now, idempotent=scan("kiosk-7:scan-1"))
        assert not other.replayed and not other_training.replayed
        assert (await caps.usage("p1", "t1", SPL, now)).used == 2

        # The key belongs to its caller, and binds the request it was first sent with.
        stranger = await caps.reserve(
            "p1", "t1", SPL, now, idempotent=scan("kiosk-7:scan-1", "lms-b")
        )
        assert not stranger.replayed and stranger.prior_decision is None
        with pytest.raises(IdempotencyConflict):
            await caps.reserve("p1", "t1", SPL, now, idempotent=scan("kiosk-7:scan-1", request="2"))
        assert (await caps.usage("p1", "t1", SPL, now)).used == 3

        # Without a key there is nothing to record a decision under.
        plain = await caps.reserve("p1", "t1", SPL, now)
        assert await caps.record_decision(plain, b"x") is False

    run(scenario, redis_url, redis_prefix)


def test_an_undecided_scan_is_taken_over_with_its_attempt_once_its_lease_lapses(
    redis_url: str, redis_prefix: str
) -> None:
    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = future_day()
        first = await caps.reserve("p1", "t1", SPL, now, idempotent=scan("kiosk-7:scan-1"))
        assert isinstance(first, Reservation) and first.idempotency_record is not None
        lease = KeySpace.lease_of(first.idempotency_record)
        assert 0 < await client.pttl(lease) <= 120_000  # the default lease, two minutes
        # The first server is still deciding: a retry is told so, and reserves nothing.
        waiting = await caps.reserve("p1", "t1", SPL, now, idempotent=scan("kiosk-7:scan-1"))
        assert waiting.replayed and waiting.prior_decision is None

        # It died before deciding; its lease expires (deleted here, as expiry would).
        await client.delete(lease)
        takeover = await caps.reserve("p1", "t1", SPL, now, idempotent=scan("kiosk-7:scan-1"))
        assert isinstance(takeover, Reservation) and not takeover.replayed
        assert takeover.reservation_id == first.reservation_id  # the same attempt
        assert (await caps.usage("p1", "t1", SPL, now)).used == 1
        assert await client.pttl(lease) > 0  # the new decider holds the lease

        # Once decided, retries replay the decision whatever the lease.
        assert await caps.record_decision(takeover, b"NOT_MATCHED") is True
        await client.delete(lease)
        replay = await caps.reserve("p1", "t1", SPL, now, idempotent=scan("kiosk-7:scan-1"))
        assert replay.replayed and replay.prior_decision == b"NOT_MATCHED"
        assert (await caps.usage("p1", "t1", SPL, now)).used == 1

    run(scenario, redis_url, redis_prefix)


def test_a_lease_must_fit_inside_the_idempotency_record() -> None:
    client = redis_client_from_url("redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="scan_lease"):
        AttemptCaps(client, cap_rules(LimitsSettings()), scan_lease=timedelta(minutes=10))


def test_exhausted_outcome_replays_as_exhausted(redis_url: str, redis_prefix: str) -> None:
    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = future_day()
        held = await burst(caps, 5, SPL, now)
        refused = await caps.reserve("p1", "t1", SPL, now, idempotent=scan("k"))
        assert isinstance(refused, Exhausted) and not refused.replayed
        # A slot frees up, yet a retry of the refused scan gets the same answer back ...
        assert isinstance(held[0], Reservation) and await caps.refund(held[0])
        retry = await caps.reserve("p1", "t1", SPL, now, idempotent=scan("k"))
        assert isinstance(retry, Exhausted) and retry.replayed
        # ... while a new scan may take the freed slot.
        assert isinstance(await caps.reserve("p1", "t1", SPL, now), Reservation)

    run(scenario, redis_url, redis_prefix)


def test_bad_input_is_refused_before_redis(redis_url: str, redis_prefix: str) -> None:
    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = future_day()
        with pytest.raises(ValueError, match="timezone-aware"):
            await caps.reserve("p1", "t1", SPL, now.replace(tzinfo=None))
        with pytest.raises(InvalidRequest, match="participant_id"):
            await caps.reserve("p{1}", "t1", SPL, now)
        with pytest.raises(InvalidRequest, match="training_id"):
            await caps.reserve("p1", "t*", SPL, now)
        with pytest.raises(InvalidRequest, match="idempotency_key"):
            await caps.reserve("p1", "t1", SPL, now, idempotent=scan(""))
        assert [key async for key in client.scan_iter(match=f"{prefix}*")] == []

    run(scenario, redis_url, redis_prefix)


def test_redis_down_raises_store_unavailable() -> None:
    async def main() -> None:
        client = redis_client_from_url(f"redis://127.0.0.1:{free_port()}/0")
        caps = AttemptCaps(client, cap_rules(LimitsSettings()), key_prefix="test-caps-down")
        now = future_day()
        try:
            with pytest.raises(StoreUnavailable, match="reserve an attempt"):
                await caps.reserve("p1", "t1", SPL, now)
            with pytest.raises(StoreUnavailable):
                await caps.usage("p1", "t1", SPL, now)
            fake = Reservation("p1", "t1", now.date(), "r", 1, 5, now)
            with pytest.raises(StoreUnavailable):
                await caps.refund(fake)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_redis_too_slow_raises_store_unavailable() -> None:
    """A server that accepts connections but never answers: the socket timeout fails closed."""

    async def main() -> None:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)  # the kernel completes handshakes; nobody ever replies
            url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
            client = redis_client_from_url(url, socket_timeout_s=0.2, socket_connect_timeout_s=0.2)
            caps = AttemptCaps(client, cap_rules(LimitsSettings()), key_prefix="test-caps-slow")
            try:
                with pytest.raises(StoreUnavailable, match="reserve an attempt") as refused:
                    await caps.reserve("p1", "t1", SPL, future_day())
                # The timeout is the cause (and in the log), not in the caller's message.
                assert "Timeout" in type(refused.value.__cause__).__name__
            finally:
                await client.aclose()

    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.parametrize("crash", [False, True], ids=["shutdown", "kill-9"])
def test_counts_survive_a_real_redis_restart(dedicated_redis: RedisServer, crash: bool) -> None:
    """AOF with appendfsync always: a clean SHUTDOWN and a kill -9 both keep every count."""

    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = future_day()
        outcomes = await burst(caps, 8, SPL, now)
        assert sum(isinstance(o, Reservation) for o in outcomes) == 5
        if crash:
            assert dedicated_redis.process is not None
            dedicated_redis.process.kill()
            dedicated_redis.process.wait()
            dedicated_redis.process = None
        else:
            dedicated_redis.stop()
        # Down: fail closed, on the same client the service keeps using.
        with pytest.raises(StoreUnavailable):
            await caps.reserve("p1", "t1", SPL, now)
        dedicated_redis.start()
        # Back: the same client recovers by itself, and the AOF kept every count.
        assert (await caps.usage("p1", "t1", SPL, now)).used == 5
        assert isinstance(await caps.reserve("p1", "t1", SPL, now), Exhausted)
        webinar = await caps.reserve("p1", "t2", WEBINAR, now)
        assert isinstance(webinar, Reservation) and webinar.used == 1

    run(scenario, dedicated_redis.url, "facesvc")


@pytest.mark.slow
def test_kill_mid_burst_never_loses_an_acknowledged_attempt_nor_exceeds_the_cap(
    dedicated_redis: RedisServer,
) -> None:
    """kill -9 in a burst of 10 participants x 8 scans, restart, scan on."""

    async def scenario(caps: AttemptCaps, client: aioredis.Redis, prefix: str) -> None:
        now = future_day()
        participants = [f"p{i}" for i in range(10)]
        acknowledged: Counter[str] = Counter()
        refused_unavailable = 0
        killed = False

        def kill() -> None:
            nonlocal killed
            killed = True
            assert dedicated_redis.process is not None
            dedicated_redis.process.kill()
            dedicated_redis.process.wait()
            dedicated_redis.process = None

        async def one(pid: str) -> None:
            nonlocal refused_unavailable
            try:
                outcome = await caps.reserve(pid, "t1", SPL, now)
            except StoreUnavailable:
                refused_unavailable += 1
                return
            if isinstance(outcome, Reservation):
                acknowledged[pid] += 1
            if acknowledged.total() >= 30 and not killed:
                kill()

        async def scans(pid: str) -> None:  # one kiosk retrying for one participant
            for _ in range(8):
                await one(pid)

        await asyncio.gather(*(scans(pid) for pid in participants))
        assert killed and refused_unavailable > 0
        dedicated_redis.start()
        await asyncio.gather(*(scans(pid) for pid in participants))
        for pid in participants:
            used = (await caps.usage(pid, "t1", SPL, now)).used
            # Every acknowledged reservation survived the crash; none beyond the cap.
            assert acknowledged[pid] <= used == 5

    run(scenario, dedicated_redis.url, "facesvc")
