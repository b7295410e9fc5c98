"""Every unary gRPC call counted by method and status code, timed, and gauged while in
flight (``facesvc.metrics``)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from facesvc.metrics import Metrics
from facesvc.transport.grpc_handlers import UnaryBehaviour, UnaryInterceptor, with_behaviour

_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _status_name(code: Any) -> str:
    """A gRPC status code as its name, whatever form the context reports it in."""
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int) and code in _CODE_BY_VALUE:
        return str(_CODE_BY_VALUE[code].name)
    return "OK" if code is None else "UNKNOWN"


class MetricsInterceptor(UnaryInterceptor):
    """Counts every unary call by method and status code, and times it."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def around(
        self, method: str, handler: grpc.RpcMethodHandler, inner: UnaryBehaviour
    ) -> grpc.RpcMethodHandler:
        method = method.lstrip("/")
        m = self._metrics

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            m.grpc_in_flight.labels(method).inc()
            try:
                response = await inner(request, context)
                code = _status_name(context.code())
                return response
            except BaseException:
                # context.abort() records its code before raising; anything
                # else escaping a handler is a bug, reported to the client as UNKNOWN.
                code = _status_name(context.code())
                if code == "OK":
                    code = "UNKNOWN"
                raise
            finally:
                m.grpc_in_flight.labels(method).dec()
                m.grpc_calls.labels(method, code).inc()
                m.grpc_latency.labels(method).observe(time.perf_counter() - start)

        return with_behaviour(handler, observed)
