"""Abuse limits beyond the programme's daily caps, in Redis: client request rates and a
participant lockout after repeated spoof suspicions.

The daily caps bound what one participant can try per day; they do not stop a client that
floods the service, nor a burst of presentation attacks against one participant (five SPL
attempts a day, every day, is still a lot of tries with a printed photo). Both limits here
are one atomic Lua call each (Redis 6.2 commands only), configured in ``[abuse]``.

Client rate (:class:`ClientRateLimiter`): a sliding-window counter per authenticated client.
Two fixed windows are kept, the current and the previous; the estimate is
``previous * (1 - elapsed/window) + current``, which smooths the doubled burst a plain fixed
window allows at its boundary. A refused request is not counted, so a client that backs off
for the ``retry-after`` it was given gets in again. Keys: :meth:`KeySpace.client_rate`.

Spoof lockout (:class:`SpoofLockout`): every SPOOF_SUSPECTED decision adds a strike to a
sorted set scored by time; ``threshold`` strikes within ``window`` lock the participant for
``lock_for`` (a key with that TTL), and the strikes are cleared. While locked, Verify and
StartLivenessChallenge are refused before any attempt is spent. Keys carry the participant
hash tag (:meth:`KeySpace.spoof_strikes`, :meth:`KeySpace.lockout`) like every other
per-participant key.

Failure mode: fail closed, like the caps. Any Redis error raises
:class:`~facesvc.store.errors.StoreUnavailable`; callers answer UNAVAILABLE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from facesvc.clock import WIB, Clock
from facesvc.errors import Exhausted
from facesvc.store.connection import AsyncRedis
from facesvc.store.errors import store_errors
from facesvc.store.keys import KeySpace

# KEYS[1]: current window counter, KEYS[2]: previous window counter (same hash tag).
# ARGV[1]: limit, ARGV[2]: window ms, ARGV[3]: ms elapsed in the current window, ARGV[4]: the
# request's cost (units it counts for, 1 <= cost <= limit).
# Returns 0 when admitted (and counted), else the ms to wait before the estimate has room for
# the cost (at least 1).
_RATE_LUA = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local elapsed = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
local estimate = previous * (window - elapsed) / window + current
if estimate + cost <= limit then
  redis.call('INCRBY', KEYS[1], cost)
  redis.call('PEXPIRE', KEYS[1], 2 * window)
  return 0
end
local wait
if current + cost <= limit then
  -- Within this window: the previous window's weight must fall until the cost fits.
  wait = math.ceil(window * (1 - (limit - cost - current) / previous)) - elapsed
else
  -- This window is full: into the next one, where it weighs as the previous window.
  wait = window - elapsed + math.ceil(window * (1 - (limit - cost) / current))
end
if wait < 1 then wait = 1 end
return wait
"""

# KEYS[1]: strikes ZSET, KEYS[2]: lock key. ARGV[1]: now ms, ARGV[2]: window ms,
# ARGV[3]: threshold, ARGV[4]: lock ms, ARGV[5]: strike id.
# Returns the lock's end in ms (0 when this strike does not lock).
_STRIKE_LUA = """
local now = tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local until_ms = now + tonumber(ARGV[4])
  redis.call('SET', KEYS[2], until_ms, 'PX', ARGV[4])
  redis.call('DEL', KEYS[1])
  return until_ms
end
return 0
"""


@dataclass(frozen=True, slots=True)
class RateRule:
    """At most ``limit`` requests per ``window`` per client (a sliding estimate)."""

    limit: int
    window: timedelta

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window <= timedelta(0):
            raise ValueError("a rate rule needs limit >= 1 and a positive window")


class ClientRateLimiter:
    """Per-client request rate; :meth:`admit` is one Redis round trip."""

    def __init__(
        self, client: AsyncRedis, rule: RateRule, clock: Clock, *, key_prefix: str = "facesvc"
    ) -> None:
        self._rule = rule
        self._clock = clock
        self._keys = KeySpace(key_prefix)
        self._window_ms = max(1, round(rule.window.total_seconds() * 1000))
        self._script = client.register_script(_RATE_LUA)

    @property
    def limit(self) -> int:
        """Requests admitted per window."""
        return self._rule.limit

    async def admit(self, client_id: str, cost: int = 1) -> float | None:
        """Count one request of ``client_id`` as ``cost`` requests (a call that costs the
        service more, or that writes to the audit trail, counts more): None when admitted,
        else the seconds to wait.

        Raises StoreUnavailable when Redis cannot answer (the caller fails closed), and
        ValueError for a cost below 1 or above the limit (it could never be admitted).
        """
        if not 1 <= cost <= self._rule.limit:
            raise ValueError(f"cost={cost}: must be between 1 and the limit {self._rule.limit}")
        now_ms = math.floor(self._clock.now().timestamp() * 1000)
        index, elapsed = divmod(now_ms, self._window_ms)
        keys = [
            self._keys.client_rate(client_id, index),
            self._keys.client_rate(client_id, index - 1),
        ]
        async with store_errors("check the client request rate"):
            wait_ms = int(
                await self._script(
                    keys=keys, args=[self._rule.limit, self._window_ms, elapsed, cost]
                )
            )
        return None if wait_ms == 0 else wait_ms / 1000


AUDITED_RPCS = frozenset({"Enroll", "DeleteEnrollment", "Verify", "RedeemToken"})
"""RPCs that append to the audit trail whatever their outcome (facesvc.engine)."""


class RpcRateLimiter:
    """The per-client rate for gRPC calls: an RPC in ``costs`` counts as that many requests,
    any other as one. Audited calls cost more (``abuse.audited_call_cost``): the audit trail
    keeps every event for its retention, so its size is what a client's rate lets it write."""

    def __init__(self, limiter: ClientRateLimiter, costs: Mapping[str, int]) -> None:
        self._limiter = limiter
        self._costs = dict(costs)

    @classmethod
    def auditing(cls, limiter: ClientRateLimiter, audited_call_cost: int) -> RpcRateLimiter:
        """Every RPC in :data:`AUDITED_RPCS` costs ``audited_call_cost``."""
        return cls(limiter, dict.fromkeys(AUDITED_RPCS, audited_call_cost))

    async def admit(self, client_id: str, rpc: str) -> float | None:
        """None when admitted, else the seconds to wait. Raises StoreUnavailable."""
        # A cost above the limit could never be admitted: it takes the whole window instead.
        cost = min(self._costs.get(rpc, 1), self._limiter.limit)
        return await self._limiter.admit(client_id, cost)


@dataclass(frozen=True, slots=True)
class LockoutRule:
    """``threshold`` spoof suspicions within ``window`` lock the participant for ``lock_for``."""

    threshold: int
    window: timedelta
    lock_for: timedelta

    def __post_init__(self) -> None:
        if self.threshold < 1 or self.window <= timedelta(0) or self.lock_for <= timedelta(0):
            raise ValueError("a lockout rule needs threshold >= 1 and positive durations")


class ParticipantLocked(Exhausted):
    """Scans of this participant are refused until ``until`` (repeated spoof suspicions).

    Transports answer RESOURCE_EXHAUSTED with ``retry_after_s`` (whole seconds, at least 1);
    the message tells the person what happened and when to try again, without saying which
    frames looked fake.
    """

    code = "LOCKED"

    def __init__(self, participant_id: str, until: datetime, retry_after_s: int) -> None:
        """``until``: in the zone the participant reads times in (``limits.timezone``)."""
        super().__init__(
            f"scans for participant {participant_id} are paused until "
            f"{until:%Y-%m-%d %H:%M %Z} after repeated suspected spoofing; "
            "try again then, in person and in good light, or contact the programme's support",
            retry_after_s,
        )
        self.participant_id = participant_id
        self.until = until


class SpoofLockout:
    """Counts SPOOF_SUSPECTED decisions per participant and locks after too many."""

    def __init__(
        self,
        client: AsyncRedis,
        rule: LockoutRule,
        clock: Clock,
        *,
        key_prefix: str = "facesvc",
        tz: ZoneInfo = WIB,
    ) -> None:
        """``tz``: the zone of the lock's end in the participant's message."""
        self._client = client
        self._tz = tz
        self._rule = rule
        self._clock = clock
        self._keys = KeySpace(key_prefix)
        self._script = client.register_script(_STRIKE_LUA)

    async def check(self, participant_id: str) -> None:
        """Raise :class:`ParticipantLocked` while the participant is locked.

        Raises StoreUnavailable when Redis cannot answer.
        """
        async with store_errors("check the spoof lockout"):
            until_ms = await self._client.get(self._keys.lockout(participant_id))
        if until_ms is not None:
            until = _from_ms(int(until_ms)).astimezone(self._tz)
            wait_s = (until - self._clock.now()).total_seconds()
            raise ParticipantLocked(participant_id, until, max(1, math.ceil(wait_s)))

    async def record_spoof(self, participant_id: str, strike_id: str) -> datetime | None:
        """Count one SPOOF_SUSPECTED decision (``strike_id``: its verification id, so a
        repeated record of the same decision counts once). Returns the lock's end when this
        strike locks the participant, else None. Raises StoreUnavailable."""
        now_ms = math.floor(self._clock.now().timestamp() * 1000)
        rule = self._rule
        args: list[int | str] = [
            now_ms,
            _ms(rule.window),
            rule.threshold,
            _ms(rule.lock_for),
            strike_id,
        ]
        keys = [self._keys.spoof_strikes(participant_id), self._keys.lockout(participant_id)]
        async with store_errors("record a spoof suspicion"):
            until_ms = int(await self._script(keys=keys, args=args))
        return _from_ms(until_ms) if until_ms else None


def _ms(span: timedelta) -> int:
    return max(1, round(span.total_seconds() * 1000))


def _from_ms(ms: int) -> datetime:
    """A Unix-ms instant as an aware datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
