"""Admission of gRPC calls on one worker process: a bound on Verify calls in flight.

gRPC's own ``maximum_concurrent_rpcs`` (``server.max_concurrent_rpcs``) does not queue: it
refuses every call beyond it, health checks included, with RESOURCE_EXHAUSTED and no
``retry-after``, before any interceptor runs. A burst of scans must not reach it.
:class:`AdmissionInterceptor` refuses a Verify at once with RESOURCE_EXHAUSTED and a
``retry-after`` (seconds) in the trailing metadata while this worker already serves
``throughput.max_in_flight_verify`` of them, a bound kept below gRPC's: the refusal comes
before the engine runs, so no attempt is reserved for it. Deeper in, the micro-batchers
refuse faces beyond ``throughput.max_queue`` the same way (the engine then refunds the
attempt).

The interceptor also counts every unary call this worker begins in
``Metrics.worker_calls``, so the spread of calls over SO_REUSEPORT workers is visible.
"""

from __future__ import annotations

from typing import Any

import grpc

from facesvc.metrics import Metrics
from facesvc.transport.grpc_handlers import UnaryBehaviour, UnaryInterceptor, with_behaviour

VERIFY_METHOD = "/facesvc.v1.FaceVerification/Verify"


class InFlightLimit:
    """At most ``limit`` holders at once; a caller beyond it is refused, never queued.

    Used from one event loop only, so plain integers suffice (no lock)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit={limit}: must be at least 1")
        self.limit = limit
        self._held = 0

    @property
    def held(self) -> int:
        return self._held

    def try_enter(self) -> bool:
        """Take a slot; False (nothing taken) when all ``limit`` are held."""
        if self._held >= self.limit:
            return False
        self._held += 1
        return True

    def leave(self) -> None:
        """Give back a slot taken by :meth:`try_enter`."""
        self._held -= 1


class AdmissionInterceptor(UnaryInterceptor):
    """Refuses the ``limited`` methods (full names, ``/package.Service/Method``) beyond
    ``limit`` calls in flight, with RESOURCE_EXHAUSTED and ``retry-after: retry_after_s``;
    counts every unary call in ``metrics.worker_calls``."""

    def __init__(
        self,
        metrics: Metrics,
        limit: InFlightLimit,
        *,
        retry_after_s: float,
        limited: frozenset[str] = frozenset({VERIFY_METHOD}),
    ) -> None:
        self._metrics = metrics
        self._limit = limit
        self._retry_after_s = retry_after_s
        self._limited = limited

    def around(
        self, method: str, handler: grpc.RpcMethodHandler, inner: UnaryBehaviour
    ) -> grpc.RpcMethodHandler:
        calls = self._metrics.worker_calls.labels(method.lstrip("/"))
        if method in self._limited:
            limit = self._limit
            retry_after = f"{self._retry_after_s:g}"

            async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
                calls.inc()
                if not limit.try_enter():
                    context.set_trailing_metadata((("retry-after", retry_after),))
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"server busy: {limit.limit} calls of this kind are in progress on "
                        f"this worker; retry after {retry_after} s",
                    )
                try:
                    return await inner(request, context)
                finally:
                    limit.leave()

        else:

            async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
                calls.inc()
                return await inner(request, context)

        return with_behaviour(handler, admitted)
