"""Time as an injected dependency, and the programme's calendar day (Asia/Jakarta, WIB).

The programme counts attempts per calendar day in WIB (UTC+7, no daylight saving) and states
windows in WIB local time. Code that needs "now" receives a :class:`Clock` (or a ``now`` taken
from one) instead of calling ``datetime.now()`` so tests can stand on a day boundary.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from facesvc.errors import Unavailable

#: The programme's time zone: every "day" and every window shown to a participant is in it.
#: (The tzdata dependency provides it where the OS has no zoneinfo, e.g. slim images.)
WIB = ZoneInfo("Asia/Jakarta")


class Clock(Protocol):
    """A source of the current instant."""

    def now(self) -> datetime:
        """The current instant, timezone-aware."""
        ...


class SystemClock:
    """The real clock (UTC, timezone-aware)."""

    def now(self) -> datetime:
        """The current instant in UTC."""
        return datetime.now(UTC)


class FixedClock:
    """A clock that stays where it is put; for tests and replays."""

    def __init__(self, at: datetime) -> None:
        self._at = require_aware(at, "at")

    def now(self) -> datetime:
        """The instant last set."""
        return self._at

    def set(self, at: datetime) -> None:
        """Move the clock to ``at`` (timezone-aware)."""
        self._at = require_aware(at, "at")

    def advance(self, by: timedelta) -> None:
        """Move the clock forward by ``by``."""
        self._at += by


def require_aware(moment: datetime, name: str) -> datetime:
    """Return ``moment`` unchanged, or raise ValueError naming ``name`` if it has no tz.

    A naive datetime is ambiguous (server local time? UTC? WIB?) and would silently shift a
    day boundary by hours, so it is refused rather than guessed.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (got naive {moment.isoformat()})")
    return moment


def programme_day(moment: datetime, tz: ZoneInfo = WIB) -> date:
    """The calendar day in ``tz`` (default WIB) that ``moment`` falls on."""
    return require_aware(moment, "now").astimezone(tz).date()


def day_end(day: date, tz: ZoneInfo = WIB) -> datetime:
    """The instant the calendar ``day`` ends in ``tz``: 00:00 of the next day, tz-aware."""
    return datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz)


class ClockUntrusted(Unavailable):
    """This service's clock is too far from Redis's to say which WIB day a scan belongs to:
    the scan is refused (transports answer UNAVAILABLE) until the clocks agree again."""


class SkewWatch:
    """The last measured offset of this service's clock from Redis's, and what it allows.

    The health probe :meth:`record`s the offset about once a second (Redis ``TIME`` against
    this process's clock). Beyond ``warn_s`` the service logs it; beyond ``max_s`` health is
    NOT_SERVING and :meth:`check` refuses scans: the attempt counters' expiry is relative and
    keeps counting whatever the skew (facesvc.limits.caps), but a service that is off by more
    than ``max_s`` puts scans near midnight into the wrong WIB day.
    """

    def __init__(self, warn_s: float, max_s: float) -> None:
        if not 0 < warn_s <= max_s:
            raise ValueError(f"need 0 < warn_s <= max_s, got {warn_s} and {max_s}")
        self.warn_s = warn_s
        self.max_s = max_s
        self.skew_s: float | None = None
        """Service clock minus Redis clock, in seconds; None until first measured."""

    def record(self, skew_s: float) -> None:
        """Store a new measurement (seconds; positive when this service is ahead)."""
        self.skew_s = skew_s

    @property
    def trusted(self) -> bool:
        """False when the last measurement is beyond ``max_s`` (unmeasured counts as trusted:
        an engine without a probe, as in tests, has no skew to report)."""
        return self.skew_s is None or abs(self.skew_s) <= self.max_s

    def check(self) -> None:
        """Raise :class:`ClockUntrusted` when the clocks disagree by more than ``max_s``."""
        if not self.trusted:
            raise ClockUntrusted(
                f"this server's clock is {self.skew_s:+.0f} s off Redis's (at most "
                f"{self.max_s:g} s allowed), so it cannot tell which day a scan belongs to; "
                "retry later or on another server"
            )
