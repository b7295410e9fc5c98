"""Server-issued liveness challenges: issue, store in Redis, consume once.

A challenge is a random ordered sequence of head-movement steps that the scan
page asks the participant to perform, plus a nonce and an expiry. It is bound to
one participant, training and gate, and can be consumed exactly once.

Redis layout (one hash per challenge, hash tag on the participant so a Cluster
keeps all of a participant's keys in one slot)::

    <prefix>:{p:<participant>}:challenge:<id>   HASH steps, nonce, training, gate,
                                                issued_at, expires_at, state
    <prefix>:{ch:<id>}:challenge-owner          STRING participant

The owner pointer exists only so that a challenge presented by another
participant can be refused with its own reason (and burned) instead of looking
unknown: its key lives under the owner's hash tag, which the caller cannot name.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from facesvc.domain import Gate
from facesvc.errors import InvalidRequest
from facesvc.store.connection import AsyncRedis, reply_text
from facesvc.store.errors import store_errors
from facesvc.store.keys import KeySpace, validate_id


class Step(enum.StrEnum):
    """One movement a participant is asked to make, starting from a frontal pose.

    Directions are the participant's own: TURN_LEFT means they turn their head to
    their left (in an unmirrored camera picture the nose moves toward image right).
    """

    TURN_LEFT = "TURN_LEFT"
    TURN_RIGHT = "TURN_RIGHT"
    LOOK_UP = "LOOK_UP"
    LOOK_DOWN = "LOOK_DOWN"
    COME_CLOSER = "COME_CLOSER"


DEFAULT_STEPS: tuple[Step, ...] = (Step.TURN_LEFT, Step.TURN_RIGHT, Step.LOOK_UP, Step.COME_CLOSER)
"""Steps issued by default: those measured apart from other movement on real photos
(facesvc/liveness/pose.py). LOOK_DOWN is left out: a turn moves the nose below the
eye line as much as looking down does."""


TURNS = frozenset({Step.TURN_LEFT, Step.TURN_RIGHT})
"""Steps that turn the head: the ones whose frames show parallax."""


class RefusalReason(enum.StrEnum):
    """Why a challenge could not be consumed."""

    UNKNOWN = "UNKNOWN"
    """No such challenge (never issued, or its record has been purged)."""
    REUSED = "REUSED"
    """Already consumed once."""
    EXPIRED = "EXPIRED"
    """Consumed after its expiry."""
    FOREIGN_PARTICIPANT = "FOREIGN_PARTICIPANT"
    """Issued to another participant."""
    FOREIGN_GATE = "FOREIGN_GATE"
    """Issued for another training or gate."""


_MESSAGES: dict[RefusalReason, str] = {
    RefusalReason.UNKNOWN: "This liveness challenge is not known. Start a new scan.",
    RefusalReason.REUSED: "This liveness challenge was already used. Start a new scan.",
    RefusalReason.EXPIRED: "This liveness challenge has expired. Start a new scan and "
    "complete it within the time shown.",
    RefusalReason.FOREIGN_PARTICIPANT: "This liveness challenge was issued to another "
    "participant. Start a new scan with your own account.",
    RefusalReason.FOREIGN_GATE: "This liveness challenge was issued for another training "
    "or gate. Start a new scan from the page of this session.",
}


class ChallengeRefused(Exception):
    """A challenge cannot be used; ``reason`` says why, the message what to do next."""

    def __init__(self, reason: RefusalReason) -> None:
        super().__init__(_MESSAGES[reason])
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Challenge:
    """An issued challenge. Times are Unix epoch seconds."""

    challenge_id: str
    participant: str
    training: str
    gate: Gate
    steps: tuple[Step, ...]
    nonce: str
    issued_at: float
    expires_at: float


# Atomic read-and-mark: returns false when absent, the string 'used' when already
# consumed, otherwise the hash's fields (before marking). Marking instead of
# deleting keeps a tombstone so that a second consume says REUSED rather than
# UNKNOWN; the key keeps its TTL. Runs on Redis 6.2 (HGETALL/HSET only).
_CONSUME_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'used' then return 'used' end
local fields = redis.call('HGETALL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'used')
return fields
"""


class ChallengeStore:
    """Issues and consumes liveness challenges in Redis.

    ``clock`` returns Unix epoch seconds; expiry is judged by it, not by Redis
    TTLs, so tests can move time. Redis keeps each record ``retention_s`` beyond
    its expiry so that late or repeated use is refused with the right reason.
    Every Redis error is raised as ``StoreUnavailable`` (callers fail closed with
    UNAVAILABLE): a raw client error reached the transports as gRPC UNKNOWN and an
    HTTP 500.
    """

    def __init__(
        self,
        redis: AsyncRedis,
        *,
        clock: Callable[[], float],
        key_prefix: str = "facesvc",
        allowed_steps: Sequence[Step] = DEFAULT_STEPS,
        num_steps: int = 2,
        ttl_s: float = 60.0,
        retention_s: float = 600.0,
    ) -> None:
        if not allowed_steps:
            raise ValueError("allowed_steps must name at least one step")
        if not 1 <= num_steps <= len(set(allowed_steps)):
            raise ValueError(
                f"num_steps must be between 1 and {len(set(allowed_steps))} "
                "(steps are not repeated within a challenge)"
            )
        if ttl_s <= 0 or retention_s < 0:
            raise ValueError("ttl_s must be positive and retention_s non-negative")
        self._redis = redis
        self._clock = clock
        self._keys = KeySpace(key_prefix)
        # dict.fromkeys keeps the configured order while dropping repeats.
        self._allowed = tuple(dict.fromkeys(allowed_steps))
        self._num_steps = num_steps
        self._ttl_s = ttl_s
        self._retention_s = retention_s
        self._consume = redis.register_script(_CONSUME_LUA)

    def _key(self, participant: str, challenge_id: str) -> str:
        return f"{self._keys.participant(participant)}:challenge:{challenge_id}"

    def _owner_key(self, challenge_id: str) -> str:
        return f"{self._keys.prefix}:{{ch:{challenge_id}}}:challenge-owner"

    def _random_steps(self) -> tuple[Step, ...]:
        """A random ordering of distinct allowed steps with at least one turn when
        turns are allowed: only a turn shows the face's depth (parallax) with any
        landmark layout, and a flat picture tilted or brought closer can fake the
        other steps."""
        rng = secrets.SystemRandom()
        while True:
            steps = tuple(rng.sample(self._allowed, self._num_steps))
            if not TURNS.isdisjoint(steps) or TURNS.isdisjoint(self._allowed):
                return steps

    async def issue(self, participant: str, training: str, gate: Gate) -> Challenge:
        """Create and store a new challenge for this participant, training and gate."""
        now = self._clock()
        challenge = Challenge(
            challenge_id=secrets.token_urlsafe(16),
            participant=participant,
            training=training,
            gate=gate,
            steps=self._random_steps(),
            nonce=secrets.token_urlsafe(16),
            issued_at=now,
            expires_at=now + self._ttl_s,
        )
        keep_ms = int((self._ttl_s + self._retention_s) * 1000)
        key = self._key(participant, challenge.challenge_id)
        async with (
            store_errors("store a liveness challenge"),
            self._redis.pipeline(transaction=False) as pipe,
        ):
            pipe.hset(
                key,
                mapping={
                    "steps": ",".join(challenge.steps),
                    "nonce": challenge.nonce,
                    "training": training,
                    "gate": gate.value,
                    "issued_at": repr(challenge.issued_at),
                    "expires_at": repr(challenge.expires_at),
                    "state": "issued",
                },
            )
            pipe.pexpire(key, keep_ms)
            pipe.set(self._owner_key(challenge.challenge_id), participant, px=keep_ms)
            await pipe.execute()
        return challenge

    async def consume(
        self, challenge_id: str, participant: str, training: str, gate: Gate
    ) -> Challenge:
        """Use a challenge once. Raises ``ChallengeRefused`` with the reason.

        Any presentation burns the challenge, even one refused for a foreign gate
        or participant: a challenge seen in the wrong place may have leaked.
        """
        try:
            validate_id(challenge_id, "challenge_id")
        except InvalidRequest:
            # Not an id this store could have issued; never build a key from it.
            raise ChallengeRefused(RefusalReason.UNKNOWN) from None
        async with store_errors("use a liveness challenge"):
            raw = await self._consume(keys=[self._key(participant, challenge_id)])
        if raw is None:
            await self._refuse_missing(challenge_id, participant)
        if raw in (b"used", "used"):
            raise ChallengeRefused(RefusalReason.REUSED)
        it = iter(raw)
        fields = {reply_text(k): reply_text(v) for k, v in zip(it, it, strict=True)}
        if fields["training"] != training or fields["gate"] != gate.value:
            raise ChallengeRefused(RefusalReason.FOREIGN_GATE)
        expires_at = float(fields["expires_at"])
        if self._clock() >= expires_at:
            raise ChallengeRefused(RefusalReason.EXPIRED)
        return Challenge(
            challenge_id=challenge_id,
            participant=participant,
            training=training,
            gate=gate,
            steps=tuple(Step(s) for s in fields["steps"].split(",")),
            nonce=fields["nonce"],
            issued_at=float(fields["issued_at"]),
            expires_at=expires_at,
        )

    async def _refuse_missing(self, challenge_id: str, participant: str) -> NoReturn:
        async with store_errors("look up a liveness challenge's owner"):
            owner_raw = await self._redis.get(self._owner_key(challenge_id))
        if owner_raw is None or reply_text(owner_raw) == participant:
            raise ChallengeRefused(RefusalReason.UNKNOWN)
        # Burn the owner's challenge too; a separate command because the two
        # keys live in different cluster slots. Losing this race only leaves the
        # owner's challenge usable by its owner, which is harmless.
        async with store_errors("burn a leaked liveness challenge"):
            await self._consume(keys=[self._key(reply_text(owner_raw), challenge_id)])
        raise ChallengeRefused(RefusalReason.FOREIGN_PARTICIPANT)
