"""Gate windows: when a scan for a gate is accepted, relative to the training's start.

Windows are data (:class:`GateWindow` rows), not code. The programme's defaults
(:data:`DEFAULT_GATE_WINDOWS`):

=========  =========  ============================================  ====================
type       gate       window                                        scheduled_start
=========  =========  ============================================  ====================
WEBINAR    REDEEM     from 1 h before to 1 h after the start        required
OFFLINE    REDEEM     from 1 h before to 2 h after the start        required
SPL        REDEEM     any time before the start (open if unknown)   optional
any        SESSION    always open                                   not used
SPL, WEB.  POST_TEST  always open                                   not used
=========  =========  ============================================  ====================

SESSION and POST_TEST are open by decision: the FAQ states no window for them, and the
LMS only shows those gates when the session or post-test is available, so the service adds
no second clock that could disagree with the LMS's. OFFLINE has no POST_TEST gate (the FAQ
names post-tests for online types only); asking for it is an invalid request (ValueError).

A window is half-open, ``[start - opens_before, start + closes_after)``: open exactly at
``start - opens_before``, closed exactly at ``start + closes_after``, the same convention as
the WIB day (00:00 belongs to the new day).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from facesvc.clock import WIB, require_aware
from facesvc.domain import Gate, TrainingType
from facesvc.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class GateWindow:
    """When ``gate`` of ``training_type`` is open, relative to scheduled_start.

    ``opens_before``: how long before the start it opens (None: no lower bound).
    ``closes_after``: how long after the start it closes (None: no upper bound; may be 0,
    meaning "closes at the start"). ``requires_start``: the request must carry
    scheduled_start; otherwise a missing start means "no bound can be computed: open".
    """

    training_type: TrainingType
    gate: Gate
    opens_before: timedelta | None
    closes_after: timedelta | None
    requires_start: bool


_HOUR = timedelta(hours=1)

#: The programme's windows (see the module docstring for the table and the reasons).
DEFAULT_GATE_WINDOWS: tuple[GateWindow, ...] = (
    GateWindow(TrainingType.WEBINAR, Gate.REDEEM, _HOUR, _HOUR, requires_start=True),
    GateWindow(TrainingType.OFFLINE, Gate.REDEEM, _HOUR, 2 * _HOUR, requires_start=True),
    GateWindow(TrainingType.SPL, Gate.REDEEM, None, timedelta(0), requires_start=False),
    GateWindow(TrainingType.SPL, Gate.SESSION, None, None, requires_start=False),
    GateWindow(TrainingType.WEBINAR, Gate.SESSION, None, None, requires_start=False),
    GateWindow(TrainingType.OFFLINE, Gate.SESSION, None, None, requires_start=False),
    GateWindow(TrainingType.SPL, Gate.POST_TEST, None, None, requires_start=False),
    GateWindow(TrainingType.WEBINAR, Gate.POST_TEST, None, None, requires_start=False),
)


@dataclass(frozen=True, slots=True)
class WindowOpen:
    """The gate is open; the bounds (tz-aware, None where unbounded) for the response."""

    opens_at: datetime | None
    closes_at: datetime | None


@dataclass(frozen=True, slots=True)
class WindowClosed:
    """Decide OUTSIDE_WINDOW; ``reason`` states the window in WIB local time."""

    reason: str
    opens_at: datetime | None
    closes_at: datetime | None


_TYPE_NOUN = {
    TrainingType.SPL: "self-paced training",
    TrainingType.WEBINAR: "webinar",
    TrainingType.OFFLINE: "offline training",
}
_GATE_NOUN = {Gate.REDEEM: "redeem", Gate.SESSION: "session", Gate.POST_TEST: "post-test"}


class GateWindows:
    """Checks a gate against the window table; pure (no I/O, the instant is passed in)."""

    def __init__(self, windows: Iterable[GateWindow] = DEFAULT_GATE_WINDOWS, tz: ZoneInfo = WIB):
        """``tz`` is the zone windows are shown in (WIB). Raises ValueError for a duplicate
        row or an empty window."""
        table: dict[tuple[TrainingType, Gate], GateWindow] = {}
        for window in windows:
            key = (window.training_type, window.gate)
            if key in table:
                raise ValueError(
                    f"two windows for {window.training_type.value} {window.gate.value}"
                )
            if (
                window.opens_before is not None
                and window.closes_after is not None
                and window.closes_after <= -window.opens_before
            ):
                raise ValueError(
                    f"empty window for {window.training_type.value} {window.gate.value}"
                )
            table[key] = window
        self._table = table
        self._tz = tz

    def check(
        self,
        training_type: TrainingType,
        gate: Gate,
        scheduled_start: datetime | None,
        now: datetime,
    ) -> WindowOpen | WindowClosed:
        """Is ``gate`` open at ``now``? Both instants tz-aware.

        Raises ``InvalidRequest`` (not a decision) when the type has no such gate or when a
        window needs ``scheduled_start`` and it is missing; ValueError for a naive datetime.
        """
        window = self._table.get((training_type, gate))
        if window is None:
            raise InvalidRequest(
                f"{training_type.value} trainings have no {gate.value} gate; "
                "send one of the gates this training type has"
            )
        require_aware(now, "now")
        if scheduled_start is None:
            if window.requires_start:
                raise InvalidRequest(
                    f"scheduled_start is required for {training_type.value} {gate.value}: "
                    "the window is set by when the training starts"
                )
            return WindowOpen(None, None)
        start = require_aware(scheduled_start, "scheduled_start")
        opens_at = None if window.opens_before is None else start - window.opens_before
        closes_at = None if window.closes_after is None else start + window.closes_after
        too_early = opens_at is not None and now < opens_at
        too_late = closes_at is not None and now >= closes_at
        if not (too_early or too_late):
            return WindowOpen(opens_at, closes_at)
        return WindowClosed(
            self._reason(training_type, gate, start, opens_at, closes_at, now),
            opens_at,
            closes_at,
        )

    def _reason(
        self,
        training_type: TrainingType,
        gate: Gate,
        start: datetime,
        opens_at: datetime | None,
        closes_at: datetime | None,
        now: datetime,
    ) -> str:
        """E.g. "the redeem window for this webinar is 09:00-11:00 WIB on 2026-11-28"."""
        subject = f"the {_GATE_NOUN[gate]} window for this {_TYPE_NOUN[training_type]}"
        current = f"(now {self._local(now)})"
        if opens_at is not None and closes_at is not None:
            lo, hi = opens_at.astimezone(self._tz), closes_at.astimezone(self._tz)
            if lo.date() == hi.date():
                span = f"{_hhmm(lo)}-{_hhmm(hi)} {self._tz_name(lo)} on {lo:%Y-%m-%d}"
                return f"{subject} is {span} {current}"
            return f"{subject} is from {self._local(lo)} to {self._local(hi)} {current}"
        if closes_at is not None:
            if closes_at == start:
                return f"{subject} closed when it started at {self._local(start)} {current}"
            return f"{subject} closed at {self._local(closes_at)} {current}"
        assert opens_at is not None  # a closed window has at least one bound
        return f"{subject} opens at {self._local(opens_at)} {current}"

    def _local(self, moment: datetime) -> str:
        """``HH:MM WIB on YYYY-MM-DD`` in the display zone."""
        local = moment.astimezone(self._tz)
        return f"{_hhmm(local)} {self._tz_name(local)} on {local:%Y-%m-%d}"

    def _tz_name(self, local: datetime) -> str:
        """The zone's abbreviation; "WIB" for Asia/Jakarta, whose tzdata abbreviation it is."""
        return local.tzname() or self._tz.key


def _hhmm(local: datetime) -> str:
    """``HH:MM``, or ``HH:MM:SS`` when the instant is not on a whole minute."""
    return f"{local:%H:%M}" if local.second == 0 else f"{local:%H:%M:%S}"
