"""Liveness challenges against a real Redis server: single use, expiry, binding."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from facesvc.domain import Gate
from facesvc.liveness.challenges import (
    Challenge,
    ChallengeRefused,
    ChallengeStore,
    RefusalReason,
    Step,
)

pytestmark = pytest.mark.calendar


class FakeTime:
    """A clock the test moves by hand (seconds since the epoch)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


Scenario = Callable[[ChallengeStore, FakeTime], Awaitable[None]]


def run(scenario: Scenario, url: str, prefix: str, **store_kwargs: object) -> None:
    """Run ``scenario`` with a store under the test's own key prefix."""

    async def main() -> None:
        client = aioredis.Redis.from_url(url)
        clock = FakeTime()
        try:
            store = ChallengeStore(client, clock=clock, key_prefix=prefix, **store_kwargs)  # type: ignore[arg-type]
            await scenario(store, clock)
        finally:
            await client.aclose()

    asyncio.run(main())


async def refused(coro: Awaitable[Challenge]) -> RefusalReason:
    with pytest.raises(ChallengeRefused) as info:
        await coro
    return info.value.reason


def test_issue_then_consume_once(redis_url: str, redis_prefix: str) -> None:
    async def scenario(store: ChallengeStore, clock: FakeTime) -> None:
        issued = await store.issue("p1", "t1", Gate.REDEEM)
        assert issued.expires_at - issued.issued_at == 60.0
        clock.now += 59.0
        used = await store.consume(issued.challenge_id, "p1", "t1", Gate.REDEEM)
        assert used == issued
        again = store.consume(issued.challenge_id, "p1", "t1", Gate.REDEEM)
        assert await refused(again) is RefusalReason.REUSED

    run(scenario, redis_url, redis_prefix)


def test_concurrent_consumers_get_it_once(redis_url: str, redis_prefix: str) -> None:
    async def scenario(store: ChallengeStore, clock: FakeTime) -> None:
        issued = await store.issue("p1", "t1", Gate.REDEEM)
        results = await asyncio.gather(
            *(store.consume(issued.challenge_id, "p1", "t1", Gate.REDEEM) for _ in range(8)),
            return_exceptions=True,
        )
        assert sum(isinstance(r, Challenge) for r in results) == 1
        assert all(
            isinstance(r, Challenge)
            or (isinstance(r, ChallengeRefused) and r.reason is RefusalReason.REUSED)
            for r in results
        )

    run(scenario, redis_url, redis_prefix)


def test_expired_refused(redis_url: str, redis_prefix: str) -> None:
    async def scenario(store: ChallengeStore, clock: FakeTime) -> None:
        issued = await store.issue("p1", "t1", Gate.SESSION)
        clock.now += 60.0
        late = store.consume(issued.challenge_id, "p1", "t1", Gate.SESSION)
        assert await refused(late) is RefusalReason.EXPIRED

    run(scenario, redis_url, redis_prefix)


def test_short_configured_expiry(redis_url: str, redis_prefix: str) -> None:
    async def scenario(store: ChallengeStore, clock: FakeTime) -> None:
        issued = await store.issue("p1", "t1", Gate.SESSION)
        clock.now += 10.5
        late = store.consume(issued.challenge_id, "p1", "t1", Gate.SESSION)
        assert await refused(late) is RefusalReason.EXPIRED

    run(scenario, redis_url, redis_prefix, ttl_s=10.0)


def test_foreign_participant_refused_and_burned(redis_url: str, redis_prefix: str) -> None:
    async def scenario(store: ChallengeStore, clock: FakeTime) -> None:
        issued = await store.issue("p1", "t1", Gate.REDEEM)
        stolen = store.consume(issued.challenge_id, "p2", "t1", Gate.REDEEM)
        assert await refused(stolen) is RefusalReason.FOREIGN_PARTICIPANT
        # A challenge seen with another participant may have leaked: it is gone.
        owner = store.consume(issued.challenge_id, "p1", "t1", Gate.REDEEM)
        assert await refused(owner) is RefusalReason.REUSED

    run(scenario, redis_url, redis_prefix)


@pytest.mark.parametrize(("training", "gate"), [("t2", Gate.REDEEM), ("t1", Gate.POST_TEST)])
def test_foreign_training_or_gate_refused(
    training: str, gate: Gate, redis_url: str, redis_prefix: str
) -> None:
    async def scenario(store: ChallengeStore, clock: FakeTime) -> None:
        issued = await store.issue("p1", "t1", Gate.REDEEM)
        wrong = store.consume(issued.challenge_id, "p1", training, gate)
        assert await refused(wrong) is RefusalReason.FOREIGN_GATE

    run(scenario, redis_url, redis_prefix)


def test_unknown_refused(redis_url: str, redis_prefix: str) -> None:
    async def scenario(store: ChallengeStore, clock: FakeTime) -> None:
        made_up = store.consume("no-such-challenge", "p1", "t1", Gate.REDEEM)
        assert await refused(made_up) is RefusalReason.UNKNOWN

    run(scenario, redis_url, redis_prefix)


def test_steps_random_ordered_and_from_configured_set(redis_url: str, redis_prefix: str) -> None:
    allowed = (Step.TURN_LEFT, Step.TURN_RIGHT, Step.LOOK_UP)

    async def scenario(store: ChallengeStore, clock: FakeTime) -> None:
        seen: set[tuple[Step, ...]] = set()
        for _ in range(60):
            steps = (await store.issue("p1", "t1", Gate.REDEEM)).steps
            assert len(steps) == 2
            assert len(set(steps)) == 2
            assert set(steps) <= set(allowed)
            seen.add(steps)
        # 6 ordered pairs exist; 60 draws miss one with probability ~6 * (5/6)**60 < 1e-4.
        assert len(seen) == 6

    run(scenario, redis_url, redis_prefix, allowed_steps=allowed, num_steps=2)


def test_challenge_ids_and_nonces_unique(redis_url: str, redis_prefix: str) -> None:
    async def scenario(store: ChallengeStore, clock: FakeTime) -> None:
        issued = [await store.issue("p1", "t1", Gate.REDEEM) for _ in range(20)]
        assert len({c.challenge_id for c in issued}) == 20
        assert len({c.nonce for c in issued}) == 20

    run(scenario, redis_url, redis_prefix)


def test_key_carries_participant_hash_tag(redis_url: str, redis_prefix: str) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url)
        prefix = redis_prefix
        try:
            store = ChallengeStore(client, clock=FakeTime(), key_prefix=prefix)
            issued = await store.issue("p42", "t1", Gate.REDEEM)
            keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}*challenge:*")]
            assert keys == [f"{prefix}{{p:p42}}:challenge:{issued.challenge_id}"]
            ttl_ms = await client.pttl(keys[0])
            assert 0 < ttl_ms <= 660_000
        finally:
            await client.aclose()

    asyncio.run(main())


def test_rejects_more_steps_than_allowed(redis_url: str) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        ChallengeStore(
            aioredis.Redis.from_url(redis_url),
            clock=FakeTime(),
            allowed_steps=(Step.TURN_LEFT,),
            num_steps=2,
        )


def test_default_steps_always_include_a_turn(redis_url: str, redis_prefix: str) -> None:
    async def scenario(store: ChallengeStore, clock: FakeTime) -> None:
        for _ in range(40):
            steps = (await store.issue("p1", "t1", Gate.REDEEM)).steps
            assert {Step.TURN_LEFT, Step.TURN_RIGHT} & set(steps)

    run(scenario, redis_url, redis_prefix, num_steps=2)
