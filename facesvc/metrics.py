"""Prometheus metrics of one facesvc process, or of all worker processes together.

:class:`Metrics` owns its :class:`~prometheus_client.CollectorRegistry` (never the
global default one), so each server or test builds its own and they never mix.

With ``server.workers > 1`` the supervisor (facesvc.serve.workers) points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before any worker imports
prometheus_client: every worker then keeps its values in files there, and ``/metrics`` in
any worker renders all of them (counters and histograms summed over workers, gauges as
their ``multiprocess_mode`` says).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

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
    - ``clock_skew``: seconds this worker's clock is ahead of Redis's (health's probe).
    - ``stage_seconds``: histogram of seconds per verification ``stage`` (for the engine).
    - ``decisions``: counter of Verify outcomes by ``decision`` (for the engine).
    - ``worker_calls``: unary calls this process has begun, by ``method``; across workers
      it keeps a ``pid`` label per live worker, showing how SO_REUSEPORT spread the load.

    ``multiprocess_dir``: the workers' shared ``PROMETHEUS_MULTIPROC_DIR``; :meth:`render`
    then aggregates every worker's values instead of this registry's. Gauges declare how
    they aggregate: health gauges per live worker (``pid`` label), in-flight calls summed.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: Path | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._multiprocess_dir = multiprocess_dir
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
            "facesvc_grpc_in_flight_calls",
            "gRPC calls being served now.",
            ["method"],
            registry=r,
            multiprocess_mode="livesum",
        )
        # Health is per worker: each live worker reports its own, so one stuck worker shows.
        self.serving = Gauge(
            "facesvc_serving",
            "1 when health is SERVING, else 0.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.redis_up = Gauge(
            "facesvc_redis_up",
            "1 when the last Redis ping answered.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.models_ready = Gauge(
            "facesvc_models_ready",
            "1 when the model pack is loaded.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.clock_skew = Gauge(
            "facesvc_clock_skew_seconds",
            "This worker's clock minus Redis's clock (TIME), in seconds, as last measured.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.worker_calls = Gauge(
            "facesvc_worker_calls",
            "Unary gRPC calls this worker process has begun since it started, by method.",
            ["method"],
            registry=r,
            multiprocess_mode="liveall",
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
        """The exposition text and its content type, for the /metrics endpoint: this
        process's metrics, or every worker's when ``multiprocess_dir`` is set."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        # A fresh registry per scrape: the collector reads the workers' files as they are now.
        workers = CollectorRegistry()
        MultiProcessCollector(workers, path=str(self._multiprocess_dir))  # type: ignore[no-untyped-call]
        return generate_latest(workers), CONTENT_TYPE_LATEST
