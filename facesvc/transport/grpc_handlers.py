"""Wrapping a unary gRPC method handler: the one mechanism the server's interceptors
(pre-authentication, metrics, admission, authentication) share to run code around a call."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

UnaryBehaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
"""What a unary-unary handler does: (request, context) -> response."""


def async_unary(handler: grpc.RpcMethodHandler | None) -> UnaryBehaviour | None:
    """The handler's async unary-unary behaviour; None when there is no handler or the call
    streams (health Watch, reflection), which the interceptors leave alone."""
    if handler is None or not inspect.iscoroutinefunction(handler.unary_unary):
        return None
    behaviour: UnaryBehaviour = handler.unary_unary
    return behaviour


def with_behaviour(
    handler: grpc.RpcMethodHandler, behaviour: UnaryBehaviour
) -> grpc.RpcMethodHandler:
    """``handler`` running ``behaviour`` instead (which calls the original as it sees fit),
    with the same request and response (de)serializers."""
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class UnaryInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """An interceptor of async unary-unary calls; streaming calls (health Watch, reflection)
    pass untouched. A subclass says what to do around one method in :meth:`around`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        inner = async_unary(handler)
        if inner is None:
            return handler
        return self.around(str(handler_call_details.method), handler, inner)

    def around(
        self, method: str, handler: grpc.RpcMethodHandler, inner: UnaryBehaviour
    ) -> grpc.RpcMethodHandler:
        """The handler to serve ``method`` (``/package.Service/Method``) with: ``handler``
        itself to leave it alone, or one whose behaviour awaits ``inner``
        (``with_behaviour``)."""
        raise NotImplementedError
