"""Fixtures the browser test modules share (a pytest plugin, see tests/conftest.py): the
stand-in LMS, the holder of the service's engine, and Playwright on Debian's Chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.support import EngineHolder, FakeLms

CHROMIUM = os.environ.get("FACESVC_CHROMIUM", "/usr/bin/chromium")


def need_browser() -> None:
    """Skip without a Chromium, or fail when FACESVC_REQUIRE_BROWSER=1 (as CI sets)."""
    if not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or FACESVC_CHROMIUM)"
        if os.environ.get("FACESVC_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def lms() -> Iterator[FakeLms]:
    server = FakeLms.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def holder() -> EngineHolder:
    return EngineHolder()


@pytest.fixture
def playwright() -> Iterator[Any]:
    need_browser()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        yield p
