"""Service health: one state, published to gRPC health checks, /healthz and metrics.

The service is SERVING only when the model pack is loaded, Redis answered its
last ping, and the process is not shutting down. A background task
(:class:`RedisProbe`) pings Redis about once a second with a short timeout, so
load balancers stop sending scans within a second or two of a Redis outage:
without Redis no attempt can be reserved, and the service fails closed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.metrics import Metrics
from facesvc.redis_client import AsyncRedis, redis_reachable

FACESVC_SERVICE: str = pb.DESCRIPTOR.services_by_name["FaceVerification"].full_name
"""The gRPC service name health is reported for, besides the overall ``""``; read from the
proto so that it follows the package (``facesvc.v1.FaceVerification``)."""

log = logging.getLogger(__name__)


@dataclass(slots=True)
class HealthState:
    """The conditions that make the service healthy."""

    models_ready: bool = False
    redis_up: bool = False
    shutting_down: bool = False

    @property
    def serving(self) -> bool:
        return self.models_ready and self.redis_up and not self.shutting_down

    def describe(self) -> str:
        """Why the service is not serving, e.g. "redis unreachable"; "ok" when serving."""
        problems = []
        if not self.models_ready:
            problems.append("models loading")
        if not self.redis_up:
            problems.append("redis unreachable")
        if self.shutting_down:
            problems.append("shutting down")
        return ", ".join(problems) or "ok"


class Health:
    """Owns the :class:`HealthState` and publishes every change of it.

    ``servicer`` is the ``grpc.health.v1`` servicer added to the gRPC server; its
    status is set for ``""`` and ``facesvc.v1.FaceVerification`` alike.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.servicer = HealthServicer()
        self.state = HealthState()
        self._metrics = metrics

    async def set_models_ready(self, ready: bool) -> None:
        self.state.models_ready = ready
        self._metrics.models_ready.set(int(ready))
        await self.publish()

    async def set_redis_up(self, up: bool) -> None:
        if up != self.state.redis_up:
            log.info("redis %s", "reachable" if up else "unreachable")
        self.state.redis_up = up
        self._metrics.redis_up.set(int(up))
        await self.publish()

    async def enter_shutdown(self) -> None:
        """NOT_SERVING from now on, so that load balancers stop sending new calls."""
        self.state.shutting_down = True
        await self.publish()

    async def publish(self) -> None:
        """Push the current state to every reader (the app calls it once before serving,
        so a health check never finds the service unknown)."""
        serving = self.state.serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._metrics.serving.set(int(serving))
        for service in ("", FACESVC_SERVICE):
            await self.servicer.set(service, status)


class RedisProbe:
    """Pings Redis every ``interval_s``; a ping slower than ``timeout_s`` counts as down."""

    def __init__(
        self, redis: AsyncRedis, health: Health, interval_s: float, timeout_s: float
    ) -> None:
        self._redis = redis
        self._health = health
        self._interval_s = interval_s
        self._timeout_s = timeout_s

    async def ping(self) -> bool:
        """True when Redis answered PING within the timeout."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
        # that arrives as the ping completes, and the probe would then outlive stop().
        try:
            async with asyncio.timeout(self._timeout_s):
                return await redis_reachable(self._redis)
        except TimeoutError:
            return False

    async def run(self) -> None:
        """Probe until cancelled."""
        while True:
            await self._health.set_redis_up(await self.ping())
            await asyncio.sleep(self._interval_s)
