"""The audit trail: one event per enrollment, deletion, verification decision and redemption.

Events go to a capped Redis Stream. They say who called, about whom, what was decided and
how long it took; they never hold an image, a descriptor or a similarity score, because the
trail is read by people who must not see biometric data.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from facesvc.redis_client import reply_text
from facesvc.redis_errors import store_errors

DEFAULT_STREAM = "facesvc:audit"


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


class AuditLog:
    """Appends events to a Redis Stream capped at about ``max_len`` entries.

    The cap is approximate (``MAXLEN ~``) so Redis trims whole radix-tree nodes, which keeps
    XADD O(1); operators who need every event forever ship the stream elsewhere.
    """

    def __init__(self, redis: Any, *, stream: str = DEFAULT_STREAM, max_len: int = 1_000_000):
        self._redis = redis
        self._stream = stream
        self._max_len = max_len

    async def append(self, event: AuditEvent) -> str:
        """The stream id of the appended event. Raises ``StoreUnavailable``."""
        async with store_errors("append to the audit stream"):
            entry_id = await self._redis.xadd(
                self._stream, event.to_fields(), maxlen=self._max_len, approximate=True
            )
        return reply_text(entry_id)

    async def tail(self, count: int = 20) -> list[tuple[str, dict[str, str]]]:
        """The newest ``count`` events, oldest first, as (stream id, fields)."""
        async with store_errors("read the audit stream"):
            rows = await self._redis.xrevrange(self._stream, count=count)
        return [
            (reply_text(entry_id), {reply_text(k): reply_text(v) for k, v in fields.items()})
            for entry_id, fields in reversed(rows)
        ]
