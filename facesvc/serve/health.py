"""Service health: one state, published to gRPC health checks, /healthz and metrics.

The service is SERVING only when the model pack is loaded, Redis answered its
last ping, its clock agrees with Redis's, and the process is not shutting down. A
background task (:class:`RedisProbe`) asks Redis for its TIME about once a second with a
short timeout, so load balancers stop sending scans within a second or two of a Redis
outage: without Redis no attempt can be reserved, and the service fails closed. The same
answer measures the skew between the two clocks (:class:`~facesvc.clock.SkewWatch`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.clock import Clock, SkewWatch
from facesvc.metrics import Metrics
from facesvc.store.connection import AsyncRedis

FACESVC_SERVICE: str = pb.DESCRIPTOR.services_by_name["FaceVerification"].full_name
"""The gRPC service name health is reported for, besides the overall ``""``; read from the
proto so that it follows the package (``facesvc.v1.FaceVerification``)."""

LIVENESS_SERVICE = "liveness"
"""A health service name for liveness probes only: SERVING whenever the process answers at
all, whatever Redis and the models do. A Kubernetes liveness probe restarts a pod that fails
it; asked about ``""`` it would restart every pod during a Redis failover (and reload their
models), which would only lengthen the outage. Readiness asks ``""``."""

log = logging.getLogger(__name__)


@dataclass(slots=True)
class HealthState:
    """The conditions that make the service healthy."""

    models_ready: bool = False
    redis_up: bool = False
    clock_trusted: bool = True
    shutting_down: bool = False

    @property
    def serving(self) -> bool:
        return self.models_ready and self.redis_up and self.clock_trusted and not self.shutting_down

    def describe(self) -> str:
        """Why the service is not serving, e.g. "redis unreachable"; "ok" when serving."""
        problems = []
        if not self.models_ready:
            problems.append("models loading")
        if not self.redis_up:
            problems.append("redis unreachable")
        if not self.clock_trusted:
            problems.append("clock skewed from redis")
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

    async def set_clock_trusted(self, trusted: bool) -> None:
        self.state.clock_trusted = trusted
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
        await self.servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)


class RedisProbe:
    """Asks Redis for its TIME every ``interval_s``; an answer slower than ``timeout_s``
    counts as down. Each answer also measures ``clock`` against Redis's into ``skew``."""

    def __init__(
        self,
        redis: AsyncRedis,
        health: Health,
        interval_s: float,
        timeout_s: float,
        *,
        clock: Clock,
        skew: SkewWatch,
        metrics: Metrics,
    ) -> None:
        self._redis = redis
        self._health = health
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._skew = skew
        self._metrics = metrics
        self._warned = False

    async def skew_s(self) -> float | None:
        """This service's clock minus Redis's, in seconds, or None when Redis did not answer
        within the timeout. The service's clock is read half-way through the round trip."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
        # that arrives as the answer completes, and the probe would then outlive stop().
        try:
            async with asyncio.timeout(self._timeout_s):
                sent = time.monotonic()
                reply = await self._redis.time()
                round_trip = time.monotonic() - sent
        except Exception:  # health must never raise: any failure means "not serving"
            return None
        if isinstance(reply, dict):  # a cluster answers per node; any one node's clock will do
            reply = next(iter(reply.values()))
        seconds, micros = reply
        ours = self._clock.now().timestamp() - round_trip / 2
        return ours - (int(seconds) + int(micros) / 1e6)

    async def probe(self) -> None:
        """Ask Redis once and publish what the answer says about Redis and the clock."""
        skew = await self.skew_s()
        await self._health.set_redis_up(skew is not None)
        if skew is not None:
            await self._judge(skew)

    async def run(self) -> None:
        """Probe until cancelled."""
        while True:
            await self.probe()
            await asyncio.sleep(self._interval_s)

    async def _judge(self, skew: float) -> None:
        self._skew.record(skew)
        self._metrics.clock_skew.set(skew)
        too_far = abs(skew) > self._skew.warn_s
        if too_far and not self._warned:
            log.warning(
                "clock skew: this server's clock is %+.3f s off Redis's (warn beyond %g s, "
                "refuse scans beyond %g s); check time synchronisation",
                skew,
                self._skew.warn_s,
                self._skew.max_s,
            )
        elif self._warned and not too_far:
            log.info("clock skew back within bounds: %+.3f s", skew)
        self._warned = too_far
        if self._skew.trusted != self._health.state.clock_trusted:
            await self._health.set_clock_trusted(self._skew.trusted)
