"""The one table from the service's errors to gRPC codes and HTTP statuses
(facesvc/transport/status.py): every refusal has a kind, both transports answer it alike, and
an error nobody classified is INTERNAL, never the caller's fault."""

from __future__ import annotations

import importlib
import pkgutil
from datetime import UTC, datetime

import grpc
import pytest

import facesvc
from facesvc.engine import PolicyError
from facesvc.errors import Internal, ServiceError
from facesvc.imaging import ImageRejected
from facesvc.limits.abuse import ParticipantLocked
from facesvc.store.errors import StoreUnavailable
from facesvc.store.templates import TemplateUnreadable
from facesvc.tokens.launch import ReturnUrlNotAllowed, TicketProblem, TicketRefused
from facesvc.transport.status import status_of

KINDS = {
    cls
    for cls in ServiceError.__subclasses__()
    # The kinds are defined in facesvc.errors; everything else subclasses one of them.
    if cls.__module__ == "facesvc.errors"
}


def _every_service_error() -> set[type[ServiceError]]:
    for module in pkgutil.walk_packages(facesvc.__path__, "facesvc."):
        if not module.name.startswith(("facesvc._proto", "facesvc.kiosk.tui")):
            importlib.import_module(module.name)
    found: set[type[ServiceError]] = set()
    todo = [ServiceError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_service_error_is_of_exactly_one_kind() -> None:
    errors = _every_service_error() - KINDS
    assert len(errors) > 15  # the walk found the service's errors
    for cls in errors:
        if cls.__subclasses__():
            continue  # a group (LaunchRefused): its members each have a kind
        kinds = [k for k in KINDS if issubclass(cls, k)]
        assert len(kinds) == 1, f"{cls.__qualname__} is of kinds {kinds}: it needs one"


def test_a_kind_maps_to_one_grpc_code_and_one_http_status() -> None:
    for kind in KINDS:
        try:
            error = kind("x")
        except TypeError:
            continue
        status = status_of(error)
        if kind is Internal:
            assert (status.grpc_code, status.http_status) == (grpc.StatusCode.INTERNAL, 500)
        else:
            assert status.grpc_code is not grpc.StatusCode.INTERNAL, kind
            assert status.http_status < 500 or status.http_status in (503, 504), kind
        assert status.code == kind.code and status.message == "x"


def test_a_bare_value_error_is_internal_not_the_callers_fault() -> None:
    status = status_of(ValueError("cost=9: must be between 1 and the limit 5"))
    assert (status.grpc_code, status.http_status) == (grpc.StatusCode.INTERNAL, 500)
    assert "cost" not in status.message  # internals stay in the log
    assert status.json_body()["error"]["code"] == "INTERNAL"


def test_an_unreadable_template_is_a_failed_precondition_on_both_transports() -> None:
    status = status_of(TemplateUnreadable("add the missing key"))
    assert (status.grpc_code, status.http_status) == (grpc.StatusCode.FAILED_PRECONDITION, 412)
    assert status.json_body() == {
        "error": {"code": "FAILED_PRECONDITION", "message": "add the missing key"}
    }


@pytest.mark.parametrize(
    ("error", "grpc_code", "http", "code"),
    [
        (ImageRejected("too small"), grpc.StatusCode.INVALID_ARGUMENT, 422, "IMAGE_REJECTED"),
        (
            PolicyError("a challenge is required"),
            grpc.StatusCode.FAILED_PRECONDITION,
            412,
            "POLICY",
        ),
        (StoreUnavailable("cannot reserve"), grpc.StatusCode.UNAVAILABLE, 503, "UNAVAILABLE"),
        (
            TicketRefused(TicketProblem.EXPIRED),
            grpc.StatusCode.UNAUTHENTICATED,
            401,
            "TICKET_EXPIRED",
        ),
        (
            ReturnUrlNotAllowed("off the list"),
            grpc.StatusCode.PERMISSION_DENIED,
            403,
            "PERMISSION_DENIED",
        ),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, 504, "TIMEOUT"),
    ],
)
def test_specific_refusals(
    error: BaseException, grpc_code: grpc.StatusCode, http: int, code: str
) -> None:
    status = status_of(error)
    assert (status.grpc_code, status.http_status, status.code) == (grpc_code, http, code)


def test_a_lockout_says_when_to_retry() -> None:
    status = status_of(ParticipantLocked("p-1", datetime(2030, 1, 1, tzinfo=UTC), 90))
    assert status.grpc_code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (status.http_status, status.code, status.retry_after_s) == (429, "LOCKED", 90)
