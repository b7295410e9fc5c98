"""Health follows Redis: NOT_SERVING while the server is down, SERVING once it is back."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

from grpc_health.v1 import health_pb2

from facesvc import healthcheck
from facesvc.redis_local import RedisServer
from tests.conftest import RunningServer

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

    dedicated_redis.start()
    server.wait_health(SERVING)
    assert server.health("") == SERVING
    assert _healthz(server) == (200, {"status": "SERVING"})
