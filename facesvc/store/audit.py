"""The audit trail: one event per enrollment, deletion, verification decision and redemption.

Events go to a Redis Stream kept for a time (``audit.retention_days``), never trimmed by
count: with a count cap, one API client making cheap calls could push every other event out
of the trail within hours. They say who called, about whom, what was decided and how long it
took; they never hold an image, a descriptor or a similarity score, because the trail is read
by people who must not see biometric data.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from facesvc.store.connection import reply_text
from facesvc.store.errors import store_errors
from facesvc.store.keys import KeySpace


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited action. Empty strings stand for "not applicable"."""

    action: str  # enroll | delete | verify | redeem
    caller: str  # the authenticated client id (API key name or mTLS subject)
    tenant: str  # the LMS or venue the caller belongs to
    participant_id: str
    outcome: str  # a Decision name, a redemption result, or "ok"
    reason: str = ""
    training_id: str = ""
    training_type: str = ""
    gate: str = ""
    session_id: str = ""
    verification_id: str = ""
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for XADD; timings become ``t_<stage>`` in milliseconds."""
        fields = {k: str(v) for k, v in asdict(self).items() if k != "timings_ms"}
        fields.update({f"t_{k}": f"{v:.2f}" for k, v in self.timings_ms.items()})
        fields["ts"] = f"{time.time():.3f}"
        return fields


# KEYS[1]: the stream. ARGV[1]: retention in ms; ARGV[2..]: field, value, field, value...
# Appends the event and trims entries older than the retention in one step. The cut-off is
# taken from Redis's own clock (TIME), the clock that stamps stream ids, never the service's:
# a service clock running days ahead would otherwise trim the whole trail. Redis 6.2 has
# XADD MINID; scripts replicate their effects, so TIME before a write is allowed.
_APPEND_LUA = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local oldest = now_ms - tonumber(ARGV[1])
if oldest < 0 then oldest = 0 end
return redis.call('XADD', KEYS[1], 'MINID', oldest, '*', unpack(ARGV, 2))
"""


class AuditLog:
    """Appends events to a Redis Stream that keeps each for ``retention``.

    Trimming is exact (``MINID`` without ``~``): each append removes only the events that
    have aged out since the one before, a handful at most in steady use, each removed once.
    How many events the stream holds is bounded by the callers' rates (audited calls count
    ``abuse.audited_call_cost`` against a client's rate); operators who need events beyond
    the retention ship the stream elsewhere.
    """

    def __init__(
        self,
        redis: Any,
        *,
        key_prefix: str = "facesvc",
        retention: timedelta = timedelta(days=7),
    ) -> None:
        """``key_prefix``: ``redis.key_prefix``; the stream is its ``KeySpace.audit_stream``."""
        if retention <= timedelta(0):
            raise ValueError("the audit retention must be positive")
        self._redis = redis
        self._stream = KeySpace(key_prefix).audit_stream()
        self._retention_ms = int(retention.total_seconds() * 1000)
        self._append = redis.register_script(_APPEND_LUA)

    async def append(self, event: AuditEvent) -> str:
        """The stream id of the appended event. Raises ``StoreUnavailable``."""
        fields = [item for pair in event.to_fields().items() for item in pair]
        async with store_errors("append to the audit stream"):
            entry_id = await self._append(keys=[self._stream], args=[self._retention_ms, *fields])
        return reply_text(entry_id)

    async def tail(self, count: int = 20) -> list[tuple[str, dict[str, str]]]:
        """The newest ``count`` events, oldest first, as (stream id, fields)."""
        async with store_errors("read the audit stream"):
            rows = await self._redis.xrevrange(self._stream, count=count)
        return [
            (reply_text(entry_id), {reply_text(k): reply_text(v) for k, v in fields.items()})
            for entry_id, fields in reversed(rows)
        ]
