"""Wrapping a unary gRPC method handler: the one mechanism the server's interceptors
(metrics, admission, authentication) share to run code around a call."""

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
