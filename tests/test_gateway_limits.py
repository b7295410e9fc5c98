"""The Scan Wajah gateway's own limits, over real HTTP against the real server and Redis:
rates per scan link and per client address, and scans in flight (issue 18.1: two large
frames cost 7.7 s of CPU with no attempt used, and nothing bounded how often or how many
at once)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2

from facesvc.engine import Engine, VerifyCommand, VerifyOutcome
from tests.browser.support import EngineHolder, http, multipart, portal_overrides
from tests.conftest import RunningServer, ServerStarter
from tests.engine_support import ADMIN, DEV_TENANTS, astronaut, jpeg
from tests.test_gateway import ALLOWLIST, bearer, scope, tickets_of

pytestmark = pytest.mark.calendar

SERVING = health_pb2.HealthCheckResponse.SERVING


def _session(server: RunningServer, ticket: str, **headers: str) -> Any:
    return http("GET", server.http_url + "/api/v1/session", headers={**bearer(ticket), **headers})


def test_a_scan_link_over_its_rate_gets_429_with_retry_after(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    server = start_server(redis_url, **portal_overrides(tmp_path, ALLOWLIST, portal__ticket_rate=3))
    server.wait_health(SERVING)
    first = tickets_of(server).issue(scope()).token
    # No engine here: calls that pass the limits answer 503 STARTING.
    assert [_session(server, first).status for _ in range(3)] == [503] * 3
    refused = _session(server, first)
    assert refused.status == 429
    assert refused.json()["error"]["code"] == "RATE_LIMITED"
    assert "scan link" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 2 * 60
    assert refused.headers["Cache-Control"] == "no-store"
    # Another link (another participant's page) has a budget of its own.
    second = tickets_of(server).issue(scope(participant_id="p-2")).token
    print("DEBUG", http("GET", server.http_url + "/api/v1/session", headers=bearer(second)).body)
    print("DEBUG", http("GET", server.http_url + "/api/v1/session", headers=bearer(first)).body)
    assert _session(server, second).status == 503


def test_a_client_address_over_its_rate_gets_429_whatever_link_it_uses(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    server = start_server(
        redis_url,
        **portal_overrides(
            tmp_path,
            ALLOWLIST,
            portal__client_rate=4,
            portal__client_address_header="X-Forwarded-For",
        ),
    )
    server.wait_health(SERVING)
    tickets = [tickets_of(server).issue(scope(participant_id=f"p-{i}")).token for i in range(6)]
    proxy = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}  # the proxy appended the last
    assert [_session(server, t, **proxy).status for t in tickets[:4]] == [503] * 4
    refused = _session(server, tickets[4], **proxy)
    assert refused.status == 429
    assert "your network" in refused.json()["error"]["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    # Calls without a valid link count too: a forger cannot bypass the address's rate.
    assert _session(server, "not-a-ticket", **proxy).status == 429
    # Another address behind the same proxy has its own budget.
    assert _session(server, tickets[5], **{"X-Forwarded-For": "203.0.113.10"}).status == 503


class GatedEngine:
    """The real engine, whose scans wait until the test opens the gate: a scan stays in
    flight exactly as long as the test needs, with no timing involved."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._loop = loop
        self._open = asyncio.Event()
        self.entered = threading.Event()

    def open(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)

    async def verify(self, cmd: VerifyCommand) -> VerifyOutcome:
        self.entered.set()
        await self._open.wait()
        return await self._engine.verify(cmd)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@pytest.mark.slow
def test_scans_beyond_the_in_flight_bound_get_429_at_once_and_spend_nothing(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    holder = EngineHolder()
    server = start_server(
        redis_url,
        engine_factory=holder,
        **portal_overrides(tmp_path, ALLOWLIST, liveness__spl="off", portal__max_in_flight_scans=1),
    )
    server.wait_health(SERVING, within_s=120)
    assert holder.engine is not None
    for participant in ("p-1", "p-2"):  # enrolled for the scan links' tenant
        enrolled = holder.run(
            holder.engine.enroll(
                participant, [jpeg(astronaut())], replace=True, caller=ADMIN, tenants=DEV_TENANTS
            )
        )
        assert enrolled.enrolled
    gated = GatedEngine(holder.engine, holder.loop)
    server.app.portal.attach_engine(gated)
    first = tickets_of(server).issue(scope()).token
    second = tickets_of(server).issue(scope(participant_id="p-2")).token

    def scan(ticket: str, key: str) -> Any:
        data, kind = multipart({"idempotency_key": key}, [jpeg(astronaut())])
        return http(
            "POST",
            server.http_url + "/api/v1/verify",
            headers={**bearer(ticket), "Content-Type": kind},
            body=data,
            timeout_s=120,
        )

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(scan, first, "scan-a")
        assert gated.entered.wait(60)
        try:
            refused = scan(second, "scan-b")
        finally:
            gated.open()
        assert held.result(timeout=120).status == 200
    assert refused.status == 429
    assert refused.json()["error"]["code"] == "BUSY"
    assert "no attempt was used" in refused.json()["error"]["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    session = http("GET", server.http_url + "/api/v1/session", headers=bearer(second))
    assert session.json()["attempts"]["used"] == 0
    # With the slot free again, the refused page's retry goes through.
    assert scan(second, "scan-b").status == 200
