"""Prometheus metrics of one facesvc process.

:class:`Metrics` owns its :class:`~prometheus_client.CollectorRegistry` (never the
global default one), so each server or test builds its own and they never mix.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Latency buckets in seconds: a Verify runs detection + embedding on several
# frames (tens to hundreds of ms), while status RPCs take about a millisecond.
# Redis round trips on loopback take tens of microseconds; the cap check's target is 0.5 ms.
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's metrics, registered in ``registry`` (a fresh one when omitted).

    - ``grpc_calls``: counter by ``method`` (``facesvc.v1.FaceVerification/Verify``)
      and ``code`` (gRPC status name, ``OK``, ``INVALID_ARGUMENT``...).
    - ``grpc_latency``: histogram of seconds per call by ``method``.
    - ``grpc_in_flight``: calls being served now, by ``method``.
    - ``serving`` / ``redis_up`` / ``models_ready``: 1 or 0, mirroring health.
    - ``stage_seconds``: histogram of seconds per verification ``stage`` (for the engine).
    - ``decisions``: counter of Verify outcomes by ``decision`` (for the engine).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.grpc_calls = Counter(
            "facesvc_grpc_calls",
            "gRPC calls finished, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.grpc_latency = Histogram(
            "facesvc_grpc_call_seconds",
            "Time to serve one gRPC call, in seconds.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.grpc_in_flight = Gauge(
            "facesvc_grpc_in_flight_calls", "gRPC calls being served now.", ["method"], registry=r
        )
        self.serving = Gauge("facesvc_serving", "1 when health is SERVING, else 0.", registry=r)
        self.redis_up = Gauge(
            "facesvc_redis_up", "1 when the last Redis ping answered.", registry=r
        )
        self.models_ready = Gauge(
            "facesvc_models_ready", "1 when the model pack is loaded.", registry=r
        )
        self.stage_seconds = Histogram(
            "facesvc_stage_seconds",
            "Time spent in one stage of a verification, in seconds.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "facesvc_decisions",
            "Verify outcomes, by decision, training type and gate.",
            ["decision", "training_type", "gate"],
            registry=r,
        )
        self.cap_exhausted = Counter(
            "facesvc_cap_exhausted",
            "Verify calls refused because the daily attempt cap was reached.",
            ["training_type"],
            registry=r,
        )
        self.redis_latency = Histogram(
            "facesvc_redis_seconds",
            "Time of one Redis operation on the verification path, in seconds.",
            ["op"],
            buckets=_REDIS_BUCKETS,
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for the /metrics endpoint."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
