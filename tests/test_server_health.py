"""Health follows Redis: NOT_SERVING while the server is down, SERVING once it is back."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.commands import healthcheck
from facesvc.serve.app import Resources
from facesvc.serve.health import LIVENESS_SERVICE
from tests.conftest import RunningServer
from tools.redis_local import RedisServer

pytestmark = pytest.mark.calendar

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _healthz(server: RunningServer) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"{server.http_url}/healthz", timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_health_turns_not_serving_when_redis_stops_and_back_when_it_returns(
    start_server: Callable[..., RunningServer], dedicated_redis: RedisServer
) -> None:
    server = start_server(dedicated_redis.url)
    server.wait_health(SERVING)

    dedicated_redis.stop()
    server.wait_health(NOT_SERVING)
    assert server.health("") == NOT_SERVING
    assert _healthz(server) == (503, {"status": "NOT_SERVING", "reason": "redis unreachable"})
    assert healthcheck.main(["--target", server.grpc_target]) == 1  # the container's probe
    # A liveness probe (deploy/) asks this name: a Redis outage must not restart the pods.
    assert server.health(LIVENESS_SERVICE) == SERVING

    dedicated_redis.start()
    server.wait_health(SERVING)
    assert server.health("") == SERVING
    assert _healthz(server) == (200, {"status": "SERVING"})


def test_not_serving_while_the_engine_loads_and_calls_answer_unavailable(
    start_server: Callable[..., RunningServer], redis_url: str
) -> None:
    loaded = threading.Event()

    class NoModels:
        """Stands in for the engine: this test is about loading, not about faces."""

        async def close(self) -> None:
            pass

    async def slow_engine_factory(resources: Resources) -> NoModels:
        while not loaded.is_set():  # the test decides when "loading" ends
            await asyncio.sleep(0.02)
        return NoModels()

    server = start_server(redis_url, engine_factory=slow_engine_factory)
    assert server.health() == NOT_SERVING
    status, body = _healthz(server)
    assert status == 503
    assert "models loading" in body["reason"]  # perhaps with "redis unreachable": not probed yet
    with pytest.raises(grpc.RpcError) as info:
        server.stub.GetEnrollment(pb.GetEnrollmentRequest(participant_id="p-1"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    loaded.set()
    server.wait_health(SERVING)
    with pytest.raises(grpc.RpcError) as info:
        server.stub.GetEnrollment(pb.GetEnrollmentRequest(participant_id="p-1"), timeout=10)
    # Past loading: whatever the RPC answers now (UNIMPLEMENTED until it is wired to the
    # engine), it is no longer "come back later".
    assert info.value.code() != grpc.StatusCode.UNAVAILABLE
