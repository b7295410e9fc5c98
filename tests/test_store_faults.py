"""Redis that stops answering, through the real server: every store fails closed with
UNAVAILABLE (HTTP 503) and a message that says what failed, never a crash (gRPC UNKNOWN,
HTTP 500) and never the exception's own text (issue 18.7 and 18.8).

A write pause (``CLIENT PAUSE ... WRITE``, Redis 6.2) is what a failover or a long AOF
rewrite looks like to the service: reads go on, writes hang until the socket timeout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2

from facesvc._proto.v1 import facesvc_pb2 as pb
from tests.browser.support import EngineHolder, http, portal_overrides
from tests.conftest import RunningServer, ServerStarter
from tests.test_gateway import ALLOWLIST, bearer, scope, tickets_of
from tools.redis_local import RedisServer

SERVING = health_pb2.HealthCheckResponse.SERVING


@contextmanager
def writes_paused(server: RedisServer, seconds: float) -> Iterator[None]:
    client = redis.Redis.from_url(server.url)
    try:
        client.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "WRITE")
        yield
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
        client.close()


@pytest.fixture
def served(
    start_server: ServerStarter, dedicated_redis: RedisServer, tmp_path: Path
) -> RunningServer:
    """The real engine on a Redis of this test's own, which it may pause."""
    holder = EngineHolder()
    running = start_server(
        dedicated_redis.url,
        engine_factory=holder,
        **portal_overrides(tmp_path, ALLOWLIST, redis__socket_timeout_s=0.5),
    )
    running.wait_health(SERVING, within_s=120)
    return running


def test_challenges_fail_closed_when_redis_stops_taking_writes(
    served: RunningServer, dedicated_redis: RedisServer
) -> None:
    ticket = tickets_of(served).issue(scope())
    request = pb.StartLivenessChallengeRequest(
        participant_id="p-1",
        training_id="t-1",
        training_type=pb.TRAINING_TYPE_SPL,
        gate=pb.GATE_SESSION,
    )
    with writes_paused(dedicated_redis, 20):
        # The challenge store called Redis bare: the page got an HTTP 500 with a
        # traceback in the log, an LMS gRPC UNKNOWN.
        page = http("POST", served.http_url + "/api/v1/challenge", headers=bearer(ticket.token))
        with pytest.raises(grpc.RpcError) as refused:
            served.stub.StartLivenessChallenge(request, timeout=30)
    assert page.status == 503
    assert page.json()["error"]["code"] == "UNAVAILABLE"
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "liveness challenge" in (refused.value.details() or "")
    # Once Redis takes writes again, challenges are issued as before.
    issued = served.stub.StartLivenessChallenge(request, timeout=30)
    assert issued.challenge_id


def test_unavailable_says_what_failed_and_never_where_redis_is(
    served: RunningServer, dedicated_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    host_port = dedicated_redis.url.split("//", 1)[1].split("/", 1)[0]  # 127.0.0.1:<port>
    port = host_port.rsplit(":", 1)[1]
    dedicated_redis.stop()
    request = pb.GetAttemptsRequest(
        participant_id="p-1", training_id="t-1", training_type=pb.TRAINING_TYPE_SPL
    )
    with pytest.raises(grpc.RpcError) as refused:
        served.stub.GetAttempts(request, timeout=30)
    details = refused.value.details() or ""
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    # The message used to carry the client error: "Error 111 connecting to 127.0.0.1:<port>".
    assert port not in details and "127.0.0.1" not in details and "Error" not in details
    assert "retry" in details
    # The operator still gets the detail, in the log.
    assert any(port in str(getattr(r, "error", "")) for r in caplog.records)


def test_the_gateways_rate_limits_fail_closed(
    served: RunningServer, dedicated_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    ticket = tickets_of(served).issue(scope())
    dedicated_redis.stop()
    reply = http("GET", served.http_url + "/api/v1/session", headers=bearer(ticket.token))
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "UNAVAILABLE"
    # Refused at the limits, before the handler: no rate, no call.
    assert any("its rate could not be checked" in r.getMessage() for r in caplog.records)
