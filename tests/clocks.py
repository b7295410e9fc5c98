"""Test instants derived from the real date.

Redis expires keys by the real clock, so a test that pins a calendar day decays once the
real date passes it. Tests take their instants from here instead: a time of day on the
current WIB date, or the real now, moved as the test needs.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

from facesvc.clock import WIB


def wib_today() -> date:
    """Today's date in WIB, by the real clock."""
    return datetime.now(WIB).date()


def wib_at(hour: int, minute: int = 0, second: int = 0, *, days: int = 0) -> datetime:
    """``hour:minute:second`` WIB on today's WIB date moved by ``days`` (aware, in WIB)."""
    return datetime.combine(wib_today() + timedelta(days=days), time(hour, minute, second), WIB)
