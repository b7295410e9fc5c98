"""Credentials before the request: a gRPC call without a valid key or certificate is refused
before its message is read.

grpc.aio receives a unary call's request message in full (up to the server's receive limit,
``2 x server.max_message_bytes``, 64 MiB by default) before any interceptor's behaviour
runs, because a unary behaviour takes the message as its argument. So an anonymous client
could make every worker buffer and parse 64 MiB per call before :class:`AuthInterceptor`
refused it. :class:`CredentialsFirst` serves each unary method of the service as a
request-streaming one instead: its behaviour runs as soon as the call's metadata has
arrived, checks the credentials (metadata and the TLS peer only), and reads the message
only once they are valid. A refused call's message is never read; the client sees
UNAUTHENTICATED whatever it sends.

It checks identity only; role, scope and rate, which need the decoded request, stay with
:class:`~facesvc.transport.auth.AuthInterceptor` further in. It must be the outermost interceptor:
the others wrap unary handlers and leave streaming ones alone.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from facesvc.metrics import Metrics
from facesvc.transport.auth import ApiKeyAuthenticator
from facesvc.transport.grpc_handlers import UnaryBehaviour, UnaryInterceptor


class CredentialsFirst(UnaryInterceptor):
    """Refuses calls of ``service`` without valid credentials before reading their message;
    counts the refusals in ``metrics`` (the metrics interceptor never sees them)."""

    def __init__(self, authenticator: ApiKeyAuthenticator, service: str, metrics: Metrics):
        self._auth = authenticator
        self._prefix = f"/{service}/"
        self._metrics = metrics

    def around(
        self, method: str, handler: grpc.RpcMethodHandler, inner: UnaryBehaviour
    ) -> grpc.RpcMethodHandler:
        if not method.startswith(self._prefix):
            return handler
        auth = self._auth
        metrics = self._metrics
        label = method.lstrip("/")

        async def credentials_first(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> Any:
            started = time.perf_counter()
            try:
                await auth.identify(context)  # aborts UNAUTHENTICATED; nothing read yet
            except BaseException:
                metrics.grpc_calls.labels(label, "UNAUTHENTICATED").inc()
                metrics.grpc_latency.labels(label).observe(time.perf_counter() - started)
                raise
            # A unary client sends exactly one message; anything after it is not read.
            async for request in requests:
                return await inner(request, context)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")

        return grpc.stream_unary_rpc_method_handler(
            credentials_first,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
