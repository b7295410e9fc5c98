"""The kinds of refusal facesvc gives its callers: one class per thing the caller does next.

Every error that may reach a caller subclasses exactly one kind below, in whichever layer
raises it (``ImageRejected`` in imaging, ``StoreUnavailable`` in store, ``ParticipantLocked``
in limits, ...). The transports turn a kind into a gRPC status code and an HTTP status with a
JSON body through one table, ``facesvc.transport.status``; anything else that escapes the
engine is a bug and is answered INTERNAL / 500. A plain ``ValueError`` is therefore never
mistaken for the caller's fault: input the caller can fix raises ``InvalidRequest``.

``code`` is the machine-readable reason both transports send (the JSON body's
``error.code``; the page keys its messages on it): each kind has one, and an error may
refine it (``IMAGE_REJECTED``, ``TICKET_EXPIRED``).
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "Busy",
    "Conflict",
    "DeadlineExceeded",
    "Exhausted",
    "Internal",
    "InvalidRequest",
    "NotFound",
    "PermissionRefused",
    "PreconditionFailed",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
]


class ServiceError(Exception):
    """A refusal the service explains to its caller; the message says what to do next."""

    code: str = "INTERNAL"


class InvalidRequest(ServiceError, ValueError):
    """The request itself is wrong (a field, an image): fix it and send it again. Nothing
    was spent. Also a ``ValueError`` (a bad value), for code below the engine that checks
    values; only this class, not every ``ValueError``, is the caller's fault."""

    code: str = "BAD_REQUEST"


class NotFound(ServiceError):
    """What the request names does not exist (a participant, an enrollment)."""

    code: str = "NOT_FOUND"


class AlreadyExists(ServiceError):
    """What the request would create exists already."""

    code: str = "ALREADY_EXISTS"


class Unauthenticated(ServiceError):
    """The credential the call presents (a launch ticket) is missing, invalid or used up:
    get a new one."""

    code: str = "UNAUTHENTICATED"


class PermissionRefused(ServiceError):
    """The caller is known but may not do this (another tenant, no venue pass)."""

    code: str = "PERMISSION_DENIED"


class PreconditionFailed(ServiceError):
    """The request is valid but the service's or the participant's state does not allow it
    (no signing key configured, a template the current keys cannot read): an operator or
    another call must change that state first."""

    code: str = "FAILED_PRECONDITION"


class Conflict(ServiceError):
    """Another call for the same participant or ticket is in progress: retry after it ends."""

    code: str = "IN_PROGRESS"


class Exhausted(ServiceError):
    """A limit on this participant or caller is reached; ``retry_after_s`` says when it lifts
    (0 when unknown)."""

    code: str = "EXHAUSTED"

    def __init__(self, message: str, retry_after_s: int = 0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Busy(ServiceError):
    """The service has no room for the call now: retry in a moment, ideally elsewhere."""

    code: str = "BUSY"


class Unavailable(ServiceError):
    """A dependency the decision needs (Redis, a trusted clock) cannot be used: nothing was
    decided; retry later."""

    code: str = "UNAVAILABLE"


class DeadlineExceeded(ServiceError, TimeoutError):
    """The call's deadline passed before its work ran: nothing was spent."""

    code: str = "TIMEOUT"


class Internal(ServiceError):
    """The service failed (a model, a bug): not the caller's fault; report it if it persists."""

    code: str = "INTERNAL"
