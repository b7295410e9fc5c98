"""Gate windows: exact boundaries for each training type, reasons in WIB, required fields."""

from __future__ import annotations

from datetime import UTC, timedelta

import pytest

from facesvc.clock import WIB
from facesvc.domain import Gate, TrainingType
from facesvc.limits.windows import (
    DEFAULT_GATE_WINDOWS,
    GateWindow,
    GateWindows,
    WindowClosed,
    WindowOpen,
)
from tests.clocks import wib_at

pytestmark = pytest.mark.calendar

SPL, WEBINAR, OFFLINE = TrainingType.SPL, TrainingType.WEBINAR, TrainingType.OFFLINE
START = wib_at(10)
DAY = f"{START.astimezone(WIB):%Y-%m-%d}"
NEXT_DAY = f"{START.astimezone(WIB) + timedelta(days=1):%Y-%m-%d}"
H = timedelta(hours=1)
S = timedelta(seconds=1)
windows = GateWindows()


@pytest.mark.parametrize(
    ("training_type", "offset", "is_open"),
    [
        (WEBINAR, -H - S, False),
        (WEBINAR, -H, True),
        (WEBINAR, timedelta(0), True),
        (WEBINAR, H - S, True),
        (WEBINAR, H, False),
        (OFFLINE, -H - S, False),
        (OFFLINE, -H, True),
        (OFFLINE, H, True),
        (OFFLINE, 2 * H - S, True),
        (OFFLINE, 2 * H, False),
        (SPL, -timedelta(days=30), True),
        (SPL, -S, True),
        (SPL, timedelta(0), False),
        (SPL, H, False),
    ],
)
def test_redeem_window_boundaries(
    training_type: TrainingType, offset: timedelta, is_open: bool
) -> None:
    result = windows.check(training_type, Gate.REDEEM, START, START + offset)
    assert isinstance(result, WindowOpen) is is_open


def test_instants_in_other_zones_are_compared_as_instants() -> None:
    start_utc = START.astimezone(UTC)  # 03:00 UTC
    assert isinstance(windows.check(WEBINAR, Gate.REDEEM, start_utc, START + H - S), WindowOpen)
    assert isinstance(windows.check(WEBINAR, Gate.REDEEM, START, start_utc + H), WindowClosed)


def test_closed_reason_states_the_window_in_wib() -> None:
    result = windows.check(WEBINAR, Gate.REDEEM, START.astimezone(UTC), START + 2 * H)
    assert isinstance(result, WindowClosed)
    assert result.reason.startswith(
        f"the redeem window for this webinar is 09:00-11:00 WIB on {DAY}"
    )
    assert f"now 12:00 WIB on {DAY}" in result.reason
    assert (result.opens_at, result.closes_at) == (START - H, START + H)

    offline = windows.check(OFFLINE, Gate.REDEEM, START, START - 3 * H)
    assert isinstance(offline, WindowClosed)
    assert f"offline training is 09:00-12:00 WIB on {DAY}" in offline.reason

    spl = windows.check(SPL, Gate.REDEEM, START, START + S)
    assert isinstance(spl, WindowClosed)
    assert f"closed when it started at 10:00 WIB on {DAY}" in spl.reason


def test_window_across_midnight_names_both_days() -> None:
    late = wib_at(23, 30)
    result = windows.check(WEBINAR, Gate.REDEEM, late, late + 2 * H)
    assert isinstance(result, WindowClosed)
    assert f"from 22:30 WIB on {DAY} to 00:30 WIB on {NEXT_DAY}" in result.reason


def test_scheduled_start_required_where_the_window_depends_on_it() -> None:
    for training_type in (WEBINAR, OFFLINE):
        with pytest.raises(ValueError, match="scheduled_start is required"):
            windows.check(training_type, Gate.REDEEM, None, START)
    assert isinstance(windows.check(SPL, Gate.REDEEM, None, START), WindowOpen)


@pytest.mark.parametrize(
    ("training_type", "gate"),
    [(t, Gate.SESSION) for t in TrainingType] + [(SPL, Gate.POST_TEST), (WEBINAR, Gate.POST_TEST)],
)
def test_session_and_post_test_gates_are_open(training_type: TrainingType, gate: Gate) -> None:
    for now in (START - timedelta(days=3), START, START + timedelta(days=3)):
        assert isinstance(windows.check(training_type, gate, START, now), WindowOpen)
        assert isinstance(windows.check(training_type, gate, None, now), WindowOpen)


def test_offline_has_no_post_test_gate() -> None:
    with pytest.raises(ValueError, match="OFFLINE trainings have no POST_TEST gate"):
        windows.check(OFFLINE, Gate.POST_TEST, START, START)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        windows.check(WEBINAR, Gate.REDEEM, START, START.replace(tzinfo=None))
    with pytest.raises(ValueError, match="scheduled_start must be timezone-aware"):
        windows.check(WEBINAR, Gate.REDEEM, START.replace(tzinfo=None), START)


def test_windows_are_configurable_data() -> None:
    wider = [
        GateWindow(WEBINAR, Gate.REDEEM, 3 * H, 3 * H, requires_start=True)
        if (w.training_type, w.gate) == (WEBINAR, Gate.REDEEM)
        else w
        for w in DEFAULT_GATE_WINDOWS
    ]
    custom = GateWindows(wider)
    assert isinstance(custom.check(WEBINAR, Gate.REDEEM, START, START + 2 * H), WindowOpen)
    with pytest.raises(ValueError, match="two windows"):
        GateWindows([*DEFAULT_GATE_WINDOWS, DEFAULT_GATE_WINDOWS[0]])
    with pytest.raises(ValueError, match="empty window"):
        GateWindows([GateWindow(SPL, Gate.REDEEM, H, -2 * H, requires_start=True)])
