"""Daily attempt caps: one atomic Lua reservation per scan, per participant and training.

A cap is data (:class:`CapRule`, in the style of an Envoy rate-limit descriptor): SPL 5,
WEBINAR 10, OFFLINE configurable (default 10) attempts per participant AND training per
calendar day in Asia/Jakarta (WIB); the count resets at 00:00 WIB.

Storage (see :mod:`facesvc.store.keys`): each participant, training and WIB day has one Redis
SET ``<prefix>:{p:<pid>}:cap:<training_id>:<yyyymmdd>`` whose members are reservation ids.
The number used is the set's size. A set rather than an INCR counter because it makes the
three hard properties structural instead of bookkept:

- a refund is ``SREM`` of its own id: idempotent (a second refund removes nothing), never
  below zero, and only ever touches the day the reservation was made on;
- a reservation re-sent by the client after a timeout carries the same id, so it is never
  counted twice (``SADD`` of a present member is a no-op);
- the day is in the key name, so a new WIB day starts from an empty set whatever the TTL.

Two clocks meet here, and each decides one thing:

- the service's clock (the engine's :class:`~facesvc.clock.Clock`) decides which WIB day a
  scan belongs to, because the day is the programme's rule about the participant's scan and
  must be the same for the window check, the cap and the reset time reported back;
- Redis's clock decides when a key expires: every TTL is relative (PEXPIRE, SET PX), so
  Redis counts it from its own now. The set lives until the end of its WIB day plus a grace
  period, sent as a duration measured on the service's clock. An absolute expiry
  (EXPIREAT) would be read on Redis's clock: with the service a day behind, a counter
  would be written already expired and the cap would silently stop counting. A relative
  TTL is never shorter than the grace, so a counter is never written already expired,
  whatever the two clocks say. The health probe measures the skew between the clocks
  (:class:`~facesvc.clock.SkewWatch`) and refuses scans beyond a hard bound, when the
  service can no longer say which day it is.

Idempotent kiosk retries: with an :class:`IdempotentScan` the same script also writes a HASH
``<prefix>:{p:<pid>}:idem:<digest>`` (outcome, reservation id, used, the request's digest;
later the engine's final decision) that lives ``idempotency_ttl``. The record is the caller's
own (its name is in the digest that names the key) and bound to the request: a retry with the
same key and the same request gets the first outcome back (``replayed=True``, with the stored
decision) and reserves nothing; the same key with another request is refused
(:class:`IdempotencyConflict`), never answered with another scan's decision. While the first scan is
being decided, a retry hears "still being decided" (no decision yet) for at most
``scan_lease``: the script also sets a lease key ``<digest>:lease`` that expires then. A
retry that finds the record undecided and the lease gone takes the scan over: the server
deciding it died (or lost Redis) before it could decide or give the attempt back, and the
retry decides it with the same reservation id, so the same attempt. All keys share the
participant's hash tag, so the script is valid on Redis Cluster. Lua uses only Redis 6.2
commands (no functions, no 7-only commands).

Failure mode: every Redis error raises :class:`facesvc.store.errors.StoreUnavailable`;
the engine answers UNAVAILABLE (fail closed: no face work, no token without a cap check).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from facesvc.clock import WIB, day_end, programme_day
from facesvc.config import LimitsSettings
from facesvc.domain import TrainingType
from facesvc.errors import InvalidRequest
from facesvc.store.connection import AsyncRedis, reply_text
from facesvc.store.errors import store_errors
from facesvc.store.keys import KeySpace

# KEYS[1]: the cap SET; KEYS[2], KEYS[3] (optional): the idempotency HASH and its lease
# (same hash tag). ARGV[1]: limit, ARGV[2]: reservation id, ARGV[3]: the SET's TTL,
# ARGV[4]: the idempotency record's TTL, ARGV[5]: the lease, all three in milliseconds;
# ARGV[6]: the digest of the request the idempotency key is bound to.
# Returns {outcome, reservation id, used, stored decision or nil, replayed 0|1}; outcome
# 'conflict' when the key was first used with another request.
_RESERVE_LUA = """
local limit = tonumber(ARGV[1])
local rid = ARGV[2]
if KEYS[2] then
  local prior = redis.call('HMGET', KEYS[2], 'outcome', 'rid', 'used', 'decision', 'digest')
  if prior[1] then
    if prior[5] ~= ARGV[6] then
      return {'conflict', prior[2], 0, false, 1}
    end
    -- Same id: this very call re-sent by the client's retry, not a replay of another scan.
    local replayed = 1
    if prior[2] == rid then replayed = 0 end
    if prior[4] or replayed == 0 or redis.call('EXISTS', KEYS[3]) == 1 then
      return {prior[1], prior[2], tonumber(prior[3]), prior[4], replayed}
    end
    -- Undecided, and its lease has lapsed: the server deciding it died. This retry takes
    -- the scan over as if it were the first call re-sent: same id, so the same attempt.
    rid = prior[2]
  end
end
local outcome = 'exhausted'
local used = redis.call('SCARD', KEYS[1])
if redis.call('SISMEMBER', KEYS[1], rid) == 1 then
  outcome = 'reserved'
elseif used < limit then
  redis.call('SADD', KEYS[1], rid)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  used = used + 1
  outcome = 'reserved'
end
if KEYS[2] then
  redis.call('HSET', KEYS[2], 'outcome', outcome, 'rid', rid, 'used', used, 'digest', ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  redis.call('SET', KEYS[3], rid, 'PX', ARGV[5])
end
return {outcome, rid, used, false, 0}
"""

# KEYS[1]: the idempotency HASH; ARGV[1]: the decision payload. Only an existing record is
# updated: creating one here would make a record without TTL or reservation.
_RECORD_DECISION_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'decision', ARGV[1])
  return 1
end
return 0
"""


class IdempotencyConflict(InvalidRequest):
    """An idempotency key the caller already used with another request: nothing was reserved
    or replayed. Transports answer INVALID_ARGUMENT: use a fresh key for a new scan."""


@dataclass(frozen=True, slots=True)
class IdempotentScan:
    """What makes a scan retryable: the caller's ``key`` (1-128 printable ASCII), the
    ``owner`` it belongs to (the authenticated caller's name, so one caller's key never
    reaches another's record) and ``request_digest``, a digest of everything the request
    asked (a retry must send the very same request)."""

    key: str
    owner: str
    request_digest: str

    def __post_init__(self) -> None:
        if not (1 <= len(self.key) <= 128 and self.key.isascii() and self.key.isprintable()):
            raise InvalidRequest("idempotency_key must be 1-128 printable ASCII characters")


@dataclass(frozen=True, slots=True)
class CapRule:
    """A daily cap: ``limit`` attempts per participant and training per WIB day."""

    descriptor: TrainingType
    limit: int


def cap_rules(limits: LimitsSettings) -> tuple[CapRule, ...]:
    """The daily caps ``limits`` sets, one rule per training type (``limits.cap_spl`` ...;
    defaults: the programme's SPL 5 and WEBINAR 10, OFFLINE 10, which its FAQ leaves open)."""
    return tuple(CapRule(t, limits.daily_cap(t.value)) for t in TrainingType)


@dataclass(frozen=True, slots=True)
class CapUsage:
    """What GetAttempts reports: attempts ``used`` and ``remaining`` today, and the reset."""

    used: int
    remaining: int
    limit: int
    resets_at: datetime


@dataclass(frozen=True, slots=True)
class Reservation:
    """One attempt held for a scan; pass it to :meth:`AttemptCaps.refund` if it must not count.

    ``used`` counts attempts of that WIB ``day`` including this one; ``resets_at`` is the next
    00:00 WIB (tz-aware). ``replayed`` is True when an idempotency key matched an earlier scan:
    nothing new was reserved, and ``prior_decision`` holds what the engine stored for that scan
    (None while the first scan is still running or if it died before deciding).
    """

    participant_id: str
    training_id: str
    day: date
    reservation_id: str
    used: int
    limit: int
    resets_at: datetime
    replayed: bool = False
    prior_decision: bytes | None = None
    idempotency_record: str | None = None

    @property
    def remaining(self) -> int:
        """Attempts left today after this one."""
        return max(self.limit - self.used, 0)

    @property
    def usage(self) -> CapUsage:
        """The day's usage with this attempt counted."""
        return CapUsage(self.used, self.remaining, self.limit, self.resets_at)

    @property
    def usage_if_refunded(self) -> CapUsage:
        """The day's usage once this attempt is given back."""
        return CapUsage(self.used - 1, self.remaining + 1, self.limit, self.resets_at)


@dataclass(frozen=True, slots=True)
class Exhausted:
    """The cap is reached: decide ATTEMPTS_EXHAUSTED, do no face work, report ``resets_at``."""

    used: int
    limit: int
    resets_at: datetime
    replayed: bool = False
    prior_decision: bytes | None = None
    idempotency_record: str | None = None

    @property
    def remaining(self) -> int:
        """Always 0; present so both outcomes report the same fields."""
        return 0

    @property
    def usage(self) -> CapUsage:
        """The day's usage: all of it."""
        return CapUsage(self.used, 0, self.limit, self.resets_at)


class AttemptCaps:
    """Reserves, refunds and reports daily attempts in Redis (async, one round trip each)."""

    def __init__(
        self,
        client: AsyncRedis,
        rules: Iterable[CapRule],
        *,
        key_prefix: str = "facesvc",
        tz: ZoneInfo = WIB,
        expiry_grace: timedelta = timedelta(hours=1),
        idempotency_ttl: timedelta = timedelta(minutes=10),
        scan_lease: timedelta = timedelta(minutes=2),
    ) -> None:
        """``client`` must return bytes (redis-py's default, as the factory builds it).

        ``rules`` must name every training type once, with a limit >= 0. ``expiry_grace`` is
        how long after the day's end its counter is kept (covers clock skew with Redis);
        ``idempotency_ttl`` how long a retry with the same idempotency key is answered from
        the first scan; ``scan_lease`` how long an undecided scan belongs to the server that
        reserved its attempt before a retry may take it over (longer than any scan may run,
        shorter than ``idempotency_ttl``).
        """
        limits: dict[TrainingType, int] = {}
        for rule in rules:
            if rule.descriptor in limits:
                raise ValueError(f"two cap rules for training type {rule.descriptor.value}")
            if rule.limit < 0:
                raise ValueError(f"cap for {rule.descriptor.value} must be >= 0 (got {rule.limit})")
            limits[rule.descriptor] = rule.limit
        missing = [t.value for t in TrainingType if t not in limits]
        if missing:
            raise ValueError(f"no cap rule for training type(s): {', '.join(missing)}")
        if expiry_grace < timedelta(0) or idempotency_ttl <= timedelta(0):
            raise ValueError("expiry_grace must be >= 0 and idempotency_ttl > 0")
        if not timedelta(0) < scan_lease < idempotency_ttl:
            raise ValueError("scan_lease must be > 0 and shorter than idempotency_ttl")
        self._client = client
        self._limits = limits
        self._keys = KeySpace(key_prefix)
        self._tz = tz
        self._grace = expiry_grace
        self._idem_ttl_ms = math.ceil(idempotency_ttl.total_seconds() * 1000)
        self._lease_ms = math.ceil(scan_lease.total_seconds() * 1000)
        # Registered once: redis-py sends EVALSHA and reloads the script on NOSCRIPT (a
        # restarted server, or a cluster node that never saw it).
        self._reserve = client.register_script(_RESERVE_LUA)
        self._record = client.register_script(_RECORD_DECISION_LUA)

    def limit_for(self, training_type: TrainingType) -> int:
        """Attempts per participant, training and WIB day for ``training_type``."""
        return self._limits[training_type]

    async def reserve(
        self,
        participant_id: str,
        training_id: str,
        training_type: TrainingType,
        now: datetime,
        *,
        idempotent: IdempotentScan | None = None,
    ) -> Reservation | Exhausted:
        """Atomically check the cap and hold one attempt of the WIB day ``now`` falls on.

        ``now`` must be tz-aware (take it once per request from the engine's clock, so the
        window check and the cap agree on the instant). ``idempotent`` makes a retried scan
        return the first outcome instead of reserving again. Raises ValueError for bad ids,
        :class:`IdempotencyConflict` for a key reused with another request, StoreUnavailable
        when Redis cannot answer.
        """
        limit = self.limit_for(training_type)
        day = programme_day(now, self._tz)
        resets_at = day_end(day, self._tz)
        cap_key = self._keys.cap(participant_id, training_id, day)
        keys = [cap_key]
        idem_key = None
        if idempotent is not None:
            idem_key = self._idempotency_record(participant_id, training_id, idempotent)
            keys += [idem_key, KeySpace.lease_of(idem_key)]
        args: list[int | str] = [
            limit,
            uuid.uuid4().hex,
            _ttl_ms(resets_at - now + self._grace),
            self._idem_ttl_ms,
            self._lease_ms,
            idempotent.request_digest if idempotent is not None else "",
        ]
        async with store_errors("reserve an attempt"):
            reply: list[Any] = await self._reserve(keys=keys, args=args)
        outcome, rid, used, decision, replayed = reply
        prior = _as_bytes(decision) if decision is not None else None
        if reply_text(outcome) == "conflict":
            raise IdempotencyConflict(
                "this idempotency_key was already used for a different scan request: send a "
                "retry unchanged, or use a new key for a new scan"
            )
        if reply_text(outcome) == "exhausted":
            return Exhausted(int(used), limit, resets_at, bool(replayed), prior, idem_key)
        return Reservation(
            participant_id=participant_id,
            training_id=training_id,
            day=day,
            reservation_id=reply_text(rid),
            used=int(used),
            limit=limit,
            resets_at=resets_at,
            replayed=bool(replayed),
            prior_decision=prior,
            idempotency_record=idem_key,
        )

    async def refund(self, reservation: Reservation) -> bool:
        """Give back a reserved attempt; True if it was held, False if already refunded.

        Touches only the counter of the reservation's own WIB day; idempotent; the count can
        never go below zero (only this reservation's id is removed). A replayed reservation
        refunds the original scan's attempt: call it only for an outcome that does not count.
        """
        key = self._keys.cap(reservation.participant_id, reservation.training_id, reservation.day)
        async with store_errors("refund an attempt"):
            removed = await self._client.srem(key, reservation.reservation_id)
        return bool(removed)

    async def abandon(self, reservation: Reservation) -> None:
        """Undo a reservation whose scan ended without a decision (deadline passed, server
        overloaded, a crash): the attempt is given back and the idempotency record is
        forgotten, so a retry with the same key is decided afresh instead of hearing "still
        being decided" until the record expires. Both keys share the participant's hash
        tag, so one MULTI covers them on Redis Cluster too."""
        key = self._keys.cap(reservation.participant_id, reservation.training_id, reservation.day)
        async with (
            store_errors("abandon an undecided attempt"),
            self._client.pipeline(transaction=True) as pipe,
        ):
            pipe.srem(key, reservation.reservation_id)
            if reservation.idempotency_record is not None:
                pipe.delete(reservation.idempotency_record)
            await pipe.execute()

    async def usage(
        self, participant_id: str, training_id: str, training_type: TrainingType, now: datetime
    ) -> CapUsage:
        """Attempts used and remaining on the WIB day of ``now`` (tz-aware), and the reset."""
        limit = self.limit_for(training_type)
        day = programme_day(now, self._tz)
        key = self._keys.cap(participant_id, training_id, day)
        async with store_errors("read attempt usage"):
            used = int(await self._client.scard(key))
        return CapUsage(used, max(limit - used, 0), limit, day_end(day, self._tz))

    async def record_decision(self, outcome: Reservation | Exhausted, decision: bytes) -> bool:
        """Store the final decision of an idempotent scan so a retry returns it unchanged.

        ``decision`` is opaque bytes chosen by the engine (e.g. a serialized response).
        Returns False (and stores nothing) when the scan had no idempotency key or its record
        has expired.
        """
        if outcome.idempotency_record is None:
            return False
        async with store_errors("record an idempotent decision"):
            stored = await self._record(keys=[outcome.idempotency_record], args=[decision])
        return bool(stored)

    def _idempotency_record(
        self, participant_id: str, training_id: str, scan: IdempotentScan
    ) -> str:
        """The record's key; the client's key is hashed with its owner and the training, so
        another caller's key or another training is another record, and arbitrary text stays
        out of keys."""
        named = f"{scan.owner}\0{training_id}\0{scan.key}".encode()
        return self._keys.idempotency(participant_id, hashlib.sha256(named).hexdigest()[:32])


def _ttl_ms(span: timedelta) -> int:
    """A relative TTL in whole milliseconds, at least one second: Redis applies it on its own
    clock, and a key is never written already expired."""
    return max(1000, math.ceil(span.total_seconds() * 1000))


def _as_bytes(value: bytes | str) -> bytes:
    """A reply field as bytes, whether or not the client decodes responses."""
    return value.encode() if isinstance(value, str) else value
