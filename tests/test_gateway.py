"""The Scan Wajah gateway over real HTTP: launch tickets, allowlisted return URLs, JWKS,
security and cache headers, and scans through the real engine and Redis."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.clock import FixedClock
from facesvc.domain import Gate, TrainingType
from facesvc.engine import EnrollOutcome
from facesvc.store.connection import redis_client_from_url
from facesvc.tokens import CheckPolicy, Expectation, PublicKeySet, check_token
from facesvc.tokens.jws import b64url_decode, b64url_encode, sign_compact
from facesvc.tokens.keys import KeyDirectory
from facesvc.tokens.launch import (
    TICKET_TYPE,
    LaunchRefused,
    LaunchScope,
    LaunchTickets,
    check_return_url,
    return_url_with_token,
)
from tests.browser.support import EngineHolder, http, multipart, portal_overrides, stranger
from tests.conftest import RunningServer, ServerStarter
from tests.engine_support import (
    ADMIN,
    DEV_TENANTS,
    astronaut,
    jpeg,
    two_people,
)

pytestmark = pytest.mark.calendar

SERVING = health_pb2.HealthCheckResponse.SERVING
RETURN = "http://127.0.0.1:9/lms/return/"
ALLOWLIST = ("dev=http://127.0.0.1:9/lms/return/", "lms-b=https://lms-b.example/back")


def scope(**changes: Any) -> LaunchScope:
    values: dict[str, Any] = {
        "participant_id": "p-1",
        "training_id": "t-1",
        "training_type": TrainingType.SPL,
        "gate": Gate.SESSION,
        "session_id": "s-1",
        "scheduled_start": None,
        "return_url": RETURN + "?course=7",
        "tenant": "dev",
    }
    values.update(changes)
    return LaunchScope(**values)


def tickets_of(server: RunningServer) -> LaunchTickets:
    tickets = server.app.portal.tickets
    assert tickets is not None
    return tickets


def arriving_in_two_pieces(body: bytes) -> Iterator[bytes]:
    """``body`` as a slow connection delivers it: half, a pause, the rest."""
    yield body[: len(body) // 2]
    time.sleep(0.5)
    yield body[len(body) // 2 :]


def bearer(ticket: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ticket}"}


@pytest.fixture
def server(start_server: ServerStarter, redis_url: str, tmp_path: Path) -> RunningServer:
    """A server without an engine: the page, JWKS and ticket checks need none."""
    running = start_server(redis_url, **portal_overrides(tmp_path, ALLOWLIST))
    running.wait_health(SERVING)
    return running


# ---------------------------------------------------------------- page and headers


def test_page_and_assets_carry_a_strict_csp_and_versioned_caching(server: RunningServer) -> None:
    page = http("GET", server.http_url + "/scan/")
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Cache-Control"] == "no-cache"
    html = page.body.decode()
    # No inline code at all: every script has a src, no on* handler attributes.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert not re.search(r"\son[a-z]+=", html)
    # Every asset is served by the service itself, versioned by its content.
    urls = re.findall(r'(?:src|href)="(/scan/[^"]+)"', html)
    assert {u.split("?")[0] for u in urls} == {"/scan/app.js", "/scan/i18n.js", "/scan/styles.css"}
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html)
    for url in urls:
        asset = http("GET", server.http_url + url)
        assert asset.status == 200
        expected = "text/css" if url.split("?")[0].endswith(".css") else "text/javascript"
        assert asset.headers["Content-Type"].startswith(expected)
        assert "immutable" in asset.headers["Cache-Control"]
        again = http("GET", server.http_url + url, headers={"If-None-Match": asset.headers["ETag"]})
        assert again.status == 304
    stale = http("GET", server.http_url + "/scan/app.js?v=old")
    assert stale.headers["Cache-Control"] == "no-cache"
    assert http("GET", server.http_url + "/scan/../config.py").status == 404
    assert http("GET", server.http_url + "/scan/nope.js").status == 404


def test_jwks_is_served_and_verifies_a_token_signed_with_the_service_key(
    server: RunningServer, tmp_path: Path
) -> None:
    reply = http("GET", server.http_url + "/.well-known/jwks.json")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert "max-age=" in reply.headers["Cache-Control"]
    published = PublicKeySet.from_json(reply.body)
    directory = KeyDirectory(tmp_path / "token-keys")
    key = directory.signing_key(datetime.now(UTC))
    assert key.kid in published
    assert set(published) == set(directory.public_keys(datetime.now(UTC)))


# ---------------------------------------------------------------- tickets


def test_a_ticket_without_an_engine_is_accepted_and_the_scan_waits_for_the_engine(
    server: RunningServer,
) -> None:
    ticket = tickets_of(server).issue(scope())
    reply = http("GET", server.http_url + "/api/v1/session", headers=bearer(ticket.token))
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "STARTING"
    assert reply.headers["Cache-Control"] == "no-store"


def _tamper(ticket: str, **claims: Any) -> str:
    header, payload, signature = ticket.split(".")
    body = json.loads(b64url_decode(payload))
    body.update(claims)
    edited = b64url_encode(json.dumps(body, separators=(",", ":")).encode())
    return f"{header}.{edited}.{signature}"


def test_tampered_forged_and_missing_tickets_are_refused(
    server: RunningServer, tmp_path: Path
) -> None:
    good = tickets_of(server).issue(scope()).token
    url = server.http_url + "/api/v1/session"
    forged_key = Ed25519PrivateKey.generate()
    service_key = KeyDirectory(tmp_path / "token-keys").signing_key(datetime.now(UTC))
    kid = service_key.kid
    payload = json.loads(b64url_decode(good.split(".")[1]))
    cases = {
        # the participant edits who is verified, or where the token goes
        "TICKET_BAD_SIGNATURE": [
            _tamper(good, sub="someone-else"),
            _tamper(good, return_url="https://evil.example/steal"),
            _tamper(good, exp=payload["exp"] + 86400),
            sign_compact(payload, forged_key, kid, typ=TICKET_TYPE),
        ],
        "TICKET_MALFORMED": [
            good[:-5],
            "not-a-ticket",
            # a verification token is signed with the same keys, but it is no ticket
            sign_compact(payload, service_key.private_key, service_key.kid),
            _as_token_type(good),
        ],
    }
    for code, bad in cases.items():
        for token in bad:
            reply = http("GET", url, headers=bearer(token))
            assert reply.status == 401, token
            assert reply.json()["error"]["code"] == code, token
    missing = http("GET", url)
    assert missing.status == 401
    assert missing.json()["error"]["code"] == "TICKET_MISSING"


def _as_token_type(ticket: str) -> str:
    """The same claims and signature under a verification token's header."""
    header, payload, signature = ticket.split(".")
    fields = json.loads(b64url_decode(header))
    fields["typ"] = "facesvc-verification+jwt"
    return f"{b64url_encode(json.dumps(fields).encode())}.{payload}.{signature}"


async def test_an_expired_ticket_is_refused(
    server: RunningServer, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    redis = redis_client_from_url(redis_url)
    past = LaunchTickets(
        KeyDirectory(tmp_path / "token-keys"),
        redis,
        issuer=server.app.settings.tokens.issuer,
        allowed_prefixes=server.app.settings.portal.return_prefixes,
        ttl_s=60,
        key_prefix=redis_prefix,
        clock=FixedClock(datetime.now(UTC) - timedelta(minutes=5)),
    )
    token = past.issue(scope()).token
    await redis.aclose()
    reply = http("GET", server.http_url + "/api/v1/session", headers=bearer(token))
    assert reply.status == 401
    assert reply.json()["error"]["code"] == "TICKET_EXPIRED"


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/lms/return/",
        "http://127.0.0.1:10/lms/return/",  # another port
        "https://127.0.0.1:9/lms/return/",  # another scheme
        "http://127.0.0.1:9/lms/returned",  # a look-alike path
        "http://127.0.0.1:9/lms/",  # above the prefix
        "http://127.0.0.1:9@evil.example/lms/return/",  # credentials trick
        "http://127.0.0.1:9.evil.example/lms/return/",
        "https://lms-b.example/back/",  # another tenant's prefix
    ],
)
def test_a_return_url_outside_the_callers_allowlist_gets_no_ticket(
    server: RunningServer, url: str
) -> None:
    with pytest.raises(LaunchRefused):
        tickets_of(server).issue(scope(return_url=url))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/lms/return/../../admin",
        "http://127.0.0.1:9/lms/return/%2e%2e/admin",
        "http://127.0.0.1:9/lms/return/\\evil",
        "http://127.0.0.1:9/lms/return/#frag",
        "javascript:alert(1)",
        "/lms/return/",
    ],
)
def test_ambiguous_return_urls_are_refused(url: str) -> None:
    with pytest.raises(LaunchRefused):
        check_return_url(url, ["http://127.0.0.1:9/lms/return/"])


def test_allowed_return_urls_and_the_token_parameter() -> None:
    check_return_url("https://lms-b.example/back", ["https://lms-b.example/back"])
    check_return_url("https://lms-b.example:443/back/x?y=1", ["https://lms-b.example/back"])
    url = return_url_with_token("https://lms-b.example/back?x=1&token=old", "abc.def.ghi")
    assert url == "https://lms-b.example/back?x=1&token=abc.def.ghi"


def test_a_ticket_needs_a_session_for_the_session_gate(server: RunningServer) -> None:
    with pytest.raises(LaunchRefused, match="session_id"):
        tickets_of(server).issue(scope(session_id=""))
    with pytest.raises(LaunchRefused, match="participant_id"):
        tickets_of(server).issue(scope(participant_id="p 1"))


# ---------------------------------------------------------------- CreateLaunchTicket (gRPC)


def _launch_request(**changes: Any) -> pb.CreateLaunchTicketRequest:
    fields: dict[str, Any] = {
        "participant_id": "p-1",
        "training_id": "t-1",
        "training_type": pb.TRAINING_TYPE_SPL,
        "gate": pb.GATE_SESSION,
        "session_id": "s-1",
        "return_url": RETURN + "?course=7",
    }
    fields.update(changes)
    return pb.CreateLaunchTicketRequest(**fields)


def test_the_lms_gets_a_ticket_and_the_page_url_over_grpc(server: RunningServer) -> None:
    reply = server.stub.CreateLaunchTicket(_launch_request(), timeout=10)
    assert reply.page_url == f"{server.http_url}/scan/#ticket={reply.ticket}"
    expires = reply.expires_at.ToDatetime(tzinfo=UTC)
    assert timedelta(0) < expires - datetime.now(UTC) <= timedelta(seconds=600)
    opened = tickets_of(server).open(reply.ticket)
    # The dev authenticator's tenant becomes the audience: never a request field.
    assert (opened.scope.participant_id, opened.scope.tenant) == ("p-1", "dev")
    assert opened.scope.return_url == RETURN + "?course=7"


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"return_url": "https://evil.example/lms/return/"}, grpc.StatusCode.PERMISSION_DENIED),
        ({"return_url": "https://lms-b.example/back/"}, grpc.StatusCode.PERMISSION_DENIED),
        ({"return_url": RETURN + "../x/"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"return_url": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"session_id": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"gate": 0}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_create_launch_ticket_refusals(
    server: RunningServer, changes: dict[str, Any], code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.stub.CreateLaunchTicket(_launch_request(**changes), timeout=10)
    assert info.value.code() == code, info.value.details()


# ---------------------------------------------------------------- scans with the real engine


def gateway_with_p1_enrolled(
    start_server: ServerStarter, redis_url: str, tmp_path: Path, **overrides: Any
) -> tuple[RunningServer, EnrollOutcome]:
    """A serving gateway on the real engine (SPL liveness off, ``overrides`` on top) with
    participant p-1 enrolled from the astronaut photo, and that enrollment's outcome."""
    holder = EngineHolder()
    running = start_server(
        redis_url,
        engine_factory=holder,
        **portal_overrides(tmp_path, ALLOWLIST, liveness__spl="off", **overrides),
    )
    running.wait_health(SERVING, within_s=120)
    assert holder.engine is not None
    enrolled = holder.run(
        holder.engine.enroll(
            "p-1", [jpeg(astronaut())], replace=True, caller=ADMIN, tenants=DEV_TENANTS
        )
    )
    return running, enrolled


@pytest.mark.slow
def test_a_scan_through_the_gateway_spends_attempts_and_then_reports_the_cap(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    running, enrolled = gateway_with_p1_enrolled(
        start_server, redis_url, tmp_path, limits__cap_spl=1
    )
    assert enrolled.enrolled, enrolled.reason
    ticket = tickets_of(running).issue(scope())
    session = http("GET", running.http_url + "/api/v1/session", headers=bearer(ticket.token))
    assert session.status == 200, session.body
    assert session.json()["attempts"] == {**session.json()["attempts"], "used": 0, "limit": 1}
    assert session.json()["liveness"] == "off"

    # The camera screen's pre-check looks at single frames and costs nothing.
    for image, status, several in (
        (astronaut(), "OK", False),
        (two_people(), "MULTIPLE_FACES", True),
    ):
        checked = http(
            "POST",
            running.http_url + "/api/v1/precheck",
            headers={**bearer(ticket.token), "Content-Type": "image/jpeg"},
            body=jpeg(image),
        )
        assert checked.status == 200, checked.body
        assert checked.json()["status"] == status
        assert (checked.json()["face_count"] > 1) is several
    # A phone's upload arrives in pieces; the frame is read to its end, not cut short.
    slowly = http(
        "POST",
        running.http_url + "/api/v1/precheck",
        headers={**bearer(ticket.token), "Content-Type": "image/jpeg"},
        body=arriving_in_two_pieces(jpeg(astronaut())),
    )
    assert slowly.status == 200, slowly.body
    assert slowly.json()["status"] == "OK"
    not_an_image = http(
        "POST",
        running.http_url + "/api/v1/precheck",
        headers={**bearer(ticket.token), "Content-Type": "image/jpeg"},
        body=b"not a jpeg",
    )
    assert not_an_image.status == 422
    after = http("GET", running.http_url + "/api/v1/session", headers=bearer(ticket.token))
    assert after.json()["attempts"]["used"] == 0

    # Someone else's face: NOT_MATCHED counts against the cap.
    someone_else = jpeg(stranger())
    body, content_type = multipart({"idempotency_key": "k-1"}, [someone_else])
    headers = {**bearer(ticket.token), "Content-Type": content_type}
    first = http("POST", running.http_url + "/api/v1/verify", headers=headers, body=body)
    assert first.status == 200, first.body
    assert first.json()["decision"] == "NOT_MATCHED"
    assert first.json()["attempts"]["remaining"] == 0
    assert "redirect_url" not in first.json()

    # The same scan retried (network retry): answered again, no second attempt.
    again = http("POST", running.http_url + "/api/v1/verify", headers=headers, body=body)
    assert again.json()["decision"] == "NOT_MATCHED"

    # The participant's own face, but the cap is used up: no face work, reason and reset.
    body, content_type = multipart({"idempotency_key": "k-2"}, [jpeg(astronaut())])
    headers = {**bearer(ticket.token), "Content-Type": content_type}
    capped = http("POST", running.http_url + "/api/v1/verify", headers=headers, body=body)
    answer = capped.json()
    assert answer["decision"] == "ATTEMPTS_EXHAUSTED"
    assert answer["attempts"]["remaining"] == 0
    assert datetime.fromisoformat(answer["attempts"]["resets_at"]) > datetime.now(UTC)
    assert "redirect_url" not in answer


@pytest.mark.slow
def test_a_verified_scan_returns_a_token_for_the_lms_and_spends_the_ticket(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    running, _ = gateway_with_p1_enrolled(start_server, redis_url, tmp_path)
    ticket = tickets_of(running).issue(scope())
    body, content_type = multipart({"idempotency_key": "scan-1"}, [jpeg(astronaut(), 80)] * 2)
    headers = {**bearer(ticket.token), "Content-Type": content_type}
    reply = http("POST", running.http_url + "/api/v1/verify", headers=headers, body=body)
    answer = reply.json()
    assert answer["decision"] == "VERIFIED", answer
    redirect = answer["redirect_url"]
    assert redirect.startswith(RETURN + "?course=7&token=")
    token = redirect.split("token=", 1)[1]
    jwks = PublicKeySet.from_json(http("GET", running.http_url + "/.well-known/jwks.json").body)
    result = check_token(
        token,
        jwks,
        Expectation(audience="dev", gate=Gate.SESSION, session_id="s-1", training_id="t-1"),
        CheckPolicy(issuer=running.app.settings.tokens.issuer),
        datetime.now(UTC),
    )
    assert result.ok, result.reason
    assert result.claims is not None and result.claims.sub == "p-1"
    # One ticket, one token: the link is spent ...
    spent = http("GET", running.http_url + "/api/v1/session", headers=bearer(ticket.token))
    assert spent.status == 401
    assert spent.json()["error"]["code"] == "TICKET_SPENT"
    other, other_type = multipart({"idempotency_key": "scan-2"}, [jpeg(astronaut(), 80)] * 2)
    another_scan = http(
        "POST",
        running.http_url + "/api/v1/verify",
        headers={**bearer(ticket.token), "Content-Type": other_type},
        body=other,
    )
    assert another_scan.status == 401
    assert another_scan.json()["error"]["code"] == "TICKET_SPENT"
    # ... except to the scan that spent it, re-sent because its answer was lost on the way:
    # the same answer and token again, and no second attempt.
    resent = http("POST", running.http_url + "/api/v1/verify", headers=headers, body=body)
    assert resent.status == 200, resent.body
    assert resent.json()["redirect_url"] == redirect
    assert resent.json()["attempts"]["used"] == 1


@pytest.mark.slow
def test_one_ticket_yields_one_token_however_many_scans_race_for_it(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    """40 genuine scans sent at once with one ticket: before the ticket was held atomically,
    5 were VERIFIED (the daily cap) with 5 distinct tokens."""
    # The gateway's own limits (facesvc.transport.portal_limits) would turn most of the 40
    # away at the door: raised here, so that all of them race for the ticket.
    running, _ = gateway_with_p1_enrolled(
        start_server,
        redis_url,
        tmp_path,
        portal__max_in_flight_scans=40,
        portal__ticket_rate=400,
        portal__client_rate=400,
    )
    ticket = tickets_of(running).issue(scope())

    def scan(n: int) -> tuple[int, dict[str, Any]]:
        body, content_type = multipart({"idempotency_key": f"race-{n}"}, [jpeg(astronaut(), 80)])
        headers = {**bearer(ticket.token), "Content-Type": content_type}
        reply = http("POST", running.http_url + "/api/v1/verify", headers=headers, body=body)
        return reply.status, reply.json()

    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(scan, range(40)))
    tokens = {a["redirect_url"] for status, a in answers if status == 200 and "redirect_url" in a}
    assert len(tokens) == 1, answers
    refused = Counter(a["error"]["code"] for status, a in answers if status != 200)
    assert set(refused) <= {"IN_PROGRESS", "TICKET_SPENT"}, refused
