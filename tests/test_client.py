"""The SDK: offline token verification with a cached JWKS, result mapping, errors from a server."""

from __future__ import annotations

import asyncio
import http.server
import importlib.util
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.client import (
    AsyncFaceVerificationClient,
    AsyncTokenVerifier,
    Decision,
    FaceVerificationClient,
    InvalidArgument,
    KeySetUnavailable,
    TokenVerifier,
    Unauthenticated,
    _redemption,
    check_jwks_url,
    fetch_jwks_url,
)
from facesvc.clock import FixedClock
from facesvc.domain import Gate, LivenessMethod, TrainingType
from facesvc.store.templates import generate_template_key
from facesvc.tokens import (
    CheckReason,
    Expectation,
    PublicKeySet,
    TokenIssuer,
    keys_generate,
    keys_rotate,
    load_key_ring,
)
from facesvc.tokens.jws import TOKEN_TYPE, b64url_encode
from facesvc.transport.auth import Client, Role, new_api_key, write_keys_file
from tests.browser.support import EngineHolder
from tests.clocks import wib_at
from tests.conftest import ServerStarter
from tests.engine_support import astronaut, jpeg

pytestmark = pytest.mark.calendar

T0 = wib_at(16)
ISSUER = "facesvc-test"
EXPECTED = Expectation(audience="lms-a", gate=Gate.SESSION, session_id="s-1", training_id="t-1")


class Service:
    """A key directory standing in for the service: issues tokens, publishes keys, counts
    every fetch of its key set."""

    def __init__(self, directory: Path, clock: FixedClock) -> None:
        self.dir = directory
        self.clock = clock
        self.fetches = 0
        self.failing = False
        keys_generate(directory, now=T0)

    def jwks(self) -> PublicKeySet:
        self.fetches += 1
        if self.failing:
            raise ConnectionError("service down")
        return load_key_ring(self.dir).public_keys(self.clock.now())

    def token(self, gate: Gate = Gate.SESSION) -> str:
        issuer = TokenIssuer(load_key_ring(self.dir), issuer=ISSUER, clock=self.clock)
        return issuer.issue(
            participant_id="p-1",
            audience="lms-a",
            training_id="t-1",
            training_type=TrainingType.SPL,
            gate=gate,
            session_id="s-1",
            liveness=LivenessMethod.PASSIVE,
            model_pack="dlib",
            verification_id="v-1",
        ).token

    def rotate_now(self) -> None:
        """A rotation whose key signs at once (a new kid the cache has never seen)."""
        keys_rotate(self.dir, publish_delay_s=0, token_ttl_s=120, leeway_s=10, now=self.clock.now())


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def service(tmp_path: Path, clock: FixedClock) -> Service:
    return Service(tmp_path / "keys", clock)


def verifier(service: Service, clock: FixedClock) -> TokenVerifier:
    return TokenVerifier(service.jwks, issuer=ISSUER, max_age_s=300, min_refresh_s=10, clock=clock)


def test_keys_are_fetched_once_and_reused_until_they_age_out(
    service: Service, clock: FixedClock
) -> None:
    check = verifier(service, clock)
    token = service.token()
    assert check.verify(token, EXPECTED).ok
    clock.advance(timedelta(seconds=60))
    assert check.verify(service.token(), EXPECTED).ok
    assert service.fetches == 1
    clock.advance(timedelta(seconds=240))  # 300 s after the fetch: aged out
    assert check.verify(service.token(), EXPECTED).ok
    assert service.fetches == 2


def test_unknown_kid_refreshes_at_most_once_per_interval(
    service: Service, clock: FixedClock
) -> None:
    check = verifier(service, clock)
    assert check.verify(service.token(), EXPECTED).ok
    clock.advance(timedelta(seconds=20))
    service.rotate_now()
    rotated = service.token()
    assert check.verify(rotated, EXPECTED).ok  # the new kid triggered one refresh
    assert service.fetches == 2

    junk = _header_with_kid("no-such-key") + "." + rotated.split(".", 1)[1]
    assert check.verify(junk, EXPECTED).reason is CheckReason.UNKNOWN_KEY
    clock.advance(timedelta(seconds=9))
    assert check.verify(junk, EXPECTED).reason is CheckReason.UNKNOWN_KEY
    assert service.fetches == 2  # within 10 s of the last fetch: no refresh
    clock.advance(timedelta(seconds=1))
    assert check.verify(junk, EXPECTED).reason is CheckReason.UNKNOWN_KEY
    assert service.fetches == 3


def _header_with_kid(kid: str) -> str:
    return b64url_encode(json.dumps({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": kid}).encode())


def test_stale_keys_are_never_used_when_the_refresh_fails(
    service: Service, clock: FixedClock
) -> None:
    check = verifier(service, clock)
    token = service.token()
    assert check.verify(token, EXPECTED).ok
    clock.advance(timedelta(seconds=300))
    service.failing = True
    with pytest.raises(KeySetUnavailable, match="service down"):
        check.verify(token, EXPECTED)
    with pytest.raises(KeySetUnavailable):  # and no retry storm: the next try waits 10 s
        check.verify(token, EXPECTED)
    assert service.fetches == 2
    service.failing = False
    clock.advance(timedelta(seconds=10))
    assert check.verify(token, EXPECTED).reason is CheckReason.EXPIRED


def test_verifier_applies_the_service_rules(service: Service, clock: FixedClock) -> None:
    check = verifier(service, clock)
    assert check.verify(service.token(gate=Gate.REDEEM), EXPECTED).reason is CheckReason.WRONG_GATE
    other = TokenVerifier(service.jwks, issuer="someone-else", clock=clock)
    assert other.verify(service.token(), EXPECTED).reason is CheckReason.WRONG_ISSUER


def test_async_verifier_follows_the_same_cache_rules(service: Service, clock: FixedClock) -> None:
    async def fetch() -> PublicKeySet:
        return service.jwks()

    async def main() -> None:
        check = AsyncTokenVerifier(fetch, issuer=ISSUER, clock=clock)
        results = await asyncio.gather(*(check.verify(service.token(), EXPECTED) for _ in range(5)))
        assert all(r.ok for r in results)
        assert service.fetches == 1  # concurrent first calls share one fetch
        clock.advance(timedelta(seconds=20))
        service.rotate_now()
        assert (await check.verify(service.token(), EXPECTED)).ok
        assert service.fetches == 2

    asyncio.run(main())


@pytest.fixture
def jwks_http(service: Service) -> Iterator[str]:
    """The key set served over real HTTP at /.well-known/jwks.json on a free port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = service.jwks().to_json().encode()
            self.send_response(200 if self.path == "/.well-known/jwks.json" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    server.shutdown()
    server.server_close()


def test_verifier_fetches_the_jwks_over_http(
    service: Service, clock: FixedClock, jwks_http: str
) -> None:
    check = TokenVerifier.from_url(jwks_http, issuer=ISSUER, clock=clock)
    assert check.verify(service.token(), EXPECTED).ok

    async def main() -> None:
        async_check = AsyncTokenVerifier.from_url(jwks_http, issuer=ISSUER, clock=clock)
        assert (await async_check.verify(service.token(), EXPECTED)).ok

    asyncio.run(main())
    assert service.fetches == 2


@pytest.mark.parametrize(
    "url",
    [
        "http://lms-jwks.example/.well-known/jwks.json",
        "http://10.1.2.3/.well-known/jwks.json",
        "http://127.0.0.1.evil.example/jwks.json",
        "http://localhost.evil.example/jwks.json",
        "ftp://127.0.0.1/jwks.json",
        "https:///jwks.json",
    ],
)
def test_jwks_urls_that_cross_a_network_in_clear_are_refused(url: str) -> None:
    # Keys fetched over plain HTTP let anyone on the path hand the gate keys of their own.
    with pytest.raises(ValueError, match="refused: keys are fetched over https://"):
        TokenVerifier.from_url(url, issuer=ISSUER)
    with pytest.raises(ValueError, match="refused"):
        AsyncTokenVerifier.from_url(url, issuer=ISSUER)
    with pytest.raises(ValueError, match="refused"):
        fetch_jwks_url(url)


def test_jwks_urls_over_https_or_to_this_machine_are_accepted() -> None:
    for url in (
        "https://scan.example.id/.well-known/jwks.json",
        "http://127.0.0.1:8080/.well-known/jwks.json",
        "http://localhost:8080/.well-known/jwks.json",
        "http://[::1]:8080/.well-known/jwks.json",
    ):
        assert check_jwks_url(url) == url


def test_a_redirect_to_a_plain_http_key_set_elsewhere_is_not_followed() -> None:
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            # TEST-NET-1: never routed, so following it could only hang, not succeed.
            self.send_header("Location", "http://192.0.2.1/.well-known/jwks.json")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
        with pytest.raises(ValueError, match=r"192\.0\.2\.1"):
            fetch_jwks_url(url, timeout_s=30)
    finally:
        server.shutdown()
        server.server_close()


def test_every_redeem_reason_maps_to_the_shared_vocabulary() -> None:
    for name in pb.RedeemReason.DESCRIPTOR.values_by_name:
        if name != "REDEEM_REASON_UNSPECIFIED":
            response = pb.RedeemTokenResponse(reason=pb.RedeemReason.Value(name))
            assert _redemption(response).reason.name == name.removeprefix("REDEEM_REASON_")


def test_redemption_claims_are_typed() -> None:
    def stamp(seconds: int) -> Timestamp:
        return Timestamp(seconds=seconds)

    response = pb.RedeemTokenResponse(
        valid=False,
        reason=pb.REDEEM_REASON_ALREADY_USED,
        message="already used",
        claims=pb.TokenClaims(
            token_id="j",
            issuer=ISSUER,
            audience="lms-a",
            participant_id="p-1",
            training_id="t-1",
            training_type=pb.TRAINING_TYPE_OFFLINE,
            gate=pb.GATE_REDEEM,
            issued_at=stamp(100),
            not_before=stamp(100),
            expires_at=stamp(220),
            verification_id="v-9",
            key_id="k-1",
            liveness_method=pb.LIVENESS_METHOD_CHALLENGE,
            model_pack="dlib",
        ),
    )
    redemption = _redemption(response)
    assert not redemption.valid and redemption.reason is CheckReason.ALREADY_USED
    assert redemption.kid == "k-1" and redemption.claims is not None
    assert redemption.claims.training_type is TrainingType.OFFLINE
    assert redemption.claims.gate is Gate.REDEEM
    assert redemption.claims.liveness is LivenessMethod.CHALLENGE
    assert (redemption.claims.iat, redemption.claims.exp) == (100, 220)


def test_server_errors_become_sdk_exceptions(facesvc_server: object) -> None:
    target = facesvc_server.grpc_target  # type: ignore[attr-defined]
    with FaceVerificationClient(target, insecure=True, api_key="secret-key") as client:
        assert "secret-key" not in repr(client) + repr(client._conn)
        with pytest.raises(InvalidArgument) as info:
            client.verify("", "t-1", TrainingType.SPL, Gate.SESSION, [b"x"], session_id="s-1")
    assert "participant_id" in info.value.message
    assert info.value.code.name == "INVALID_ARGUMENT"


# --------------------------------------------------------------------------- end to end


def _example_gate() -> ModuleType:
    """examples/lms_gate.py, imported from its file (examples/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "lms_gate.py"
    spec = importlib.util.spec_from_file_location("lms_gate_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sdk_against_the_real_service(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    """Enroll, verify, check offline, admit once through the example gate: the real engine,
    real Redis, API keys over gRPC metadata."""
    keys = {}
    clients = []
    for name, role, tenant in (("ops", Role.ADMIN, "ops"), ("gate", Role.LMS, "lms-a")):
        key, key_id, digest = new_api_key()
        clients.append(Client(name, role, tenant, key_id, digest))
        keys[name] = key
    write_keys_file(tmp_path / "api-keys.json", clients)
    key_dir = tmp_path / "token-keys"
    keys_generate(key_dir, now=datetime.now(UTC) - timedelta(minutes=1))
    holder = EngineHolder()
    running = start_server(
        redis_url,
        engine_factory=holder,
        security__api_keys_file=tmp_path / "api-keys.json",
        tokens__key_dir=key_dir,
        tokens__issuer=ISSUER,
        templates__key=generate_template_key("k1"),
        liveness__spl="off",
    )
    running.wait_health(health_pb2.HealthCheckResponse.SERVING, within_s=120)
    target = running.grpc_target
    slow = 60.0  # the machine is shared: a first inference may take a while
    with FaceVerificationClient(target, insecure=True) as anonymous, pytest.raises(Unauthenticated):
        anonymous.signing_keys()
    with FaceVerificationClient(
        target, insecure=True, api_key=keys["ops"], timeout_s=slow
    ) as admin:
        enrolled = admin.enroll("p-1", [jpeg(astronaut())], tenants=["lms-a"], replace=True)
        assert enrolled.enrolled, enrolled.reason
        assert enrolled.enrollment is not None and enrolled.enrollment.image_count == 1
        assert enrolled.enrollment.tenants == ["lms-a"]

    lms = FaceVerificationClient(target, insecure=True, api_key=keys["gate"], timeout_s=slow)
    try:
        frames = [jpeg(astronaut(), 80)] * 2
        result = lms.verify("p-1", "t-1", TrainingType.SPL, Gate.SESSION, frames, session_id="s-1")
        assert result.decision is Decision.VERIFIED, result.reason
        assert result.token is not None and result.token_expires_at is not None
        assert lms.attempts("p-1", "t-1", TrainingType.SPL).used == 1
        challenge = lms.start_challenge("p-1", "t-1", TrainingType.SPL, Gate.SESSION)
        assert challenge.steps and challenge.min_frames == len(challenge.steps) + 1
        assert challenge.expires_at is not None and challenge.expires_at > datetime.now(UTC)

        verifier = TokenVerifier.from_client(lms, issuer=ISSUER)
        offline = verifier.verify(result.token, EXPECTED)
        assert offline.ok and offline.claims is not None
        assert offline.claims.sub == "p-1" and offline.claims.aud == "lms-a"
        assert offline.claims.verification_id == result.verification_id
        jti = offline.claims.jti

        gate = _example_gate().Gatekeeper(lms, verifier, audience="lms-a", training_id="t-1")
        assert gate.admit("p-1", "s-2", result.token) == (False, "token refused: WRONG_SESSION")
        # Another participant logged in at the gate cannot use p-1's token.
        assert gate.admit("p-2", "s-1", result.token) == (
            False,
            "token refused: WRONG_PARTICIPANT",
        )
        assert gate.admit("p-1", "s-1", result.token) == (True, "welcome, participant p-1")
        assert gate.admit("p-1", "s-1", result.token) == (False, "token refused: ALREADY_USED")
    finally:
        lms.close()

    async def again() -> None:
        async with AsyncFaceVerificationClient(target, insecure=True, api_key=keys["gate"]) as c:
            used = await c.redeem(
                result.token or "",
                participant_id="p-1",
                audience="lms-a",
                gate=Gate.SESSION,
                session_id="s-1",
            )
            assert not used.valid and used.reason is CheckReason.ALREADY_USED
            assert used.claims is not None and used.claims.jti == jti
            assert list(await c.signing_keys()) == list(load_key_ring(key_dir).public_keys(T0))

    asyncio.run(again())
