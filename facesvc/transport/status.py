"""One table from the service's errors to what each transport answers.

``facesvc.errors`` names the kinds of refusal; this module gives each kind a gRPC status code
and an HTTP status, and the JSON body the portal sends (``{"error": {"code", "message"}}``,
``code`` from the error). Both transports ask :func:`status_of`, so a refusal reads the same
over gRPC and over HTTP. An exception that is not a ``ServiceError`` (or the built-in
``TimeoutError`` of an asyncio deadline) is a bug: INTERNAL / 500, and its text, which may
name internals, is logged rather than sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc

from facesvc.errors import (
    AlreadyExists,
    Busy,
    Conflict,
    DeadlineExceeded,
    Exhausted,
    Internal,
    InvalidRequest,
    NotFound,
    PermissionRefused,
    PreconditionFailed,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from facesvc.imaging import ImageRejected

log = logging.getLogger(__name__)

__all__ = ["Status", "status_of"]


@dataclass(frozen=True, slots=True)
class Status:
    """What to answer for one error: gRPC ``grpc_code``, HTTP ``http_status``, the body's
    ``code`` and ``message``, and ``retry_after_s`` (seconds, for Retry-After / the
    ``retry-after`` trailer) when the caller should wait."""

    grpc_code: grpc.StatusCode
    http_status: int
    code: str
    message: str
    retry_after_s: int | None = None

    def json_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


# Looked up along each error's class order, so a specific entry (ImageRejected) wins over
# its kind's.
_TABLE: dict[type[BaseException], tuple[grpc.StatusCode, int]] = {
    InvalidRequest: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    # The bytes arrived but are not a usable image: 422, so a client can tell "fix the
    # request" from "take another photo".
    ImageRejected: (grpc.StatusCode.INVALID_ARGUMENT, 422),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401),
    PermissionRefused: (grpc.StatusCode.PERMISSION_DENIED, 403),
    NotFound: (grpc.StatusCode.NOT_FOUND, 404),
    AlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, 409),
    PreconditionFailed: (grpc.StatusCode.FAILED_PRECONDITION, 412),
    Conflict: (grpc.StatusCode.ABORTED, 409),
    Exhausted: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    # gRPC's RESOURCE_EXHAUSTED is what its clients retry with back-off; over HTTP an
    # overloaded server is 503, which load balancers route around.
    Busy: (grpc.StatusCode.RESOURCE_EXHAUSTED, 503),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, 503),
    DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    Internal: (grpc.StatusCode.INTERNAL, 500),
}

_DEADLINE_MESSAGE = "the call's deadline passed before the scan was decided; send it again"
_BUG_MESSAGE = "internal error; nothing was decided. Retry, and report it if it persists"


def status_of(exc: BaseException) -> Status:
    """The answer for ``exc``, an error that escaped the engine."""
    for cls in type(exc).__mro__:
        mapped = _TABLE.get(cls)
        if mapped is not None and isinstance(exc, ServiceError):
            retry = exc.retry_after_s if isinstance(exc, Exhausted) else None
            return Status(*mapped, exc.code, str(exc), retry)
    if isinstance(exc, TimeoutError):  # an asyncio deadline inside the engine
        code, http = _TABLE[DeadlineExceeded]
        return Status(code, http, DeadlineExceeded.code, _DEADLINE_MESSAGE)
    log.error("unexpected error answered INTERNAL", exc_info=exc)
    code, http = _TABLE[Internal]
    return Status(code, http, Internal.code, _BUG_MESSAGE)
