"""The skeleton server over real gRPC: health, reflection, UNIMPLEMENTED, INVALID_ARGUMENT,
and the HTTP side (/metrics, /healthz)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.commands import healthcheck
from tests.conftest import RunningServer, ServerStarter

pytestmark = pytest.mark.calendar

SERVING = health_pb2.HealthCheckResponse.SERVING
FRAME = b"\xff\xd8 not really a jpeg, but bytes are not decoded during validation"


def _verify(**changes: Any) -> pb.VerifyRequest:
    fields: dict[str, Any] = {
        "participant_id": "p-1",
        "training_id": "t-1",
        "training_type": pb.TRAINING_TYPE_WEBINAR,
        "gate": pb.GATE_SESSION,
        "session_id": "s-1",
        "frames": [FRAME],
    }
    fields.update(changes)
    return pb.VerifyRequest(**fields)


# One well-formed request per engine-backed RPC: a server started without an engine
# (as these are) must answer each with UNIMPLEMENTED, never a fake success.
WELL_FORMED: dict[str, Message] = {
    "Enroll": pb.EnrollRequest(participant_id="p-1", images=[FRAME]),
    "GetEnrollment": pb.GetEnrollmentRequest(participant_id="p-1"),
    "DeleteEnrollment": pb.DeleteEnrollmentRequest(participant_id="p-1"),
    "StartLivenessChallenge": pb.StartLivenessChallengeRequest(
        participant_id="p-1",
        training_id="t-1",
        training_type=pb.TRAINING_TYPE_SPL,
        gate=pb.GATE_REDEEM,
    ),
    "Verify": _verify(),
    "GetAttempts": pb.GetAttemptsRequest(
        participant_id="p-1", training_id="t-1", training_type=pb.TRAINING_TYPE_SPL
    ),
    "RedeemToken": pb.RedeemTokenRequest(
        token="a.b.c", expected_gate=pb.GATE_REDEEM, audience="lms-1", expected_participant_id="p-1"
    ),
    "GetSigningKeys": pb.GetSigningKeysRequest(),
    "SetEnrollmentTenants": pb.SetEnrollmentTenantsRequest(participant_id="p-1", tenants=["lms-1"]),
}


def _call(server: RunningServer, rpc: str, request: Message) -> Any:
    method: Callable[..., Any] = getattr(server.stub, rpc)
    return method(request, timeout=30)  # generous: CI machines are shared and loaded


def _error(server: RunningServer, rpc: str, request: Message) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _call(server, rpc, request)
    error: grpc.RpcError = info.value
    return error


def test_health_answers_serving_for_the_service_and_overall(api_server: RunningServer) -> None:
    assert api_server.health("facesvc.v1.FaceVerification") == SERVING
    assert api_server.health("") == SERVING


def test_reflection_lists_the_service(api_server: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(api_server.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert "facesvc.v1.FaceVerification" in names
    assert "grpc.health.v1.Health" in names


@pytest.mark.parametrize("rpc", sorted(WELL_FORMED))
def test_rpc_not_built_answers_unimplemented_naming_what_is_missing(
    api_server: RunningServer, rpc: str
) -> None:
    error = _error(api_server, rpc, WELL_FORMED[rpc])
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    # Our message saying what is missing, not gRPC's generic "Method not implemented!".
    assert error.details()
    assert error.details() != "Method not implemented!"


# RPCs served by something other than the engine (and tested with it).
NOT_ENGINE_BACKED = {"CreateLaunchTicket"}


def test_every_rpc_of_the_contract_is_covered() -> None:
    service = pb.DESCRIPTOR.services_by_name["FaceVerification"]
    assert {m.name for m in service.methods} == set(WELL_FORMED) | NOT_ENGINE_BACKED


MALFORMED: list[tuple[str, Message, str, str]] = [
    ("Verify", _verify(participant_id=""), "participant_id", "required"),
    ("Verify", _verify(participant_id="p 1"), "participant_id", "letters, digits"),
    ("Verify", _verify(training_id=""), "training_id", "required"),
    ("Verify", _verify(training_type=0), "training_type", "required"),
    ("Verify", _verify(training_type=99), "training_type", "99 is not a known TrainingType"),
    ("Verify", _verify(gate=42), "gate", "42 is not a known Gate"),
    ("Verify", _verify(session_id=""), "session_id", "required"),
    (
        "Verify",
        _verify(training_type=pb.TRAINING_TYPE_OFFLINE, gate=pb.GATE_POST_TEST),
        "gate",
        "POST_TEST applies only",
    ),
    ("Verify", _verify(frames=[]), "frames", "at least one"),
    ("Verify", _verify(frames=[FRAME] * 4), "frames", "at most 3"),
    ("Verify", _verify(frames=[FRAME, b""]), "frames[1]", "empty"),
    ("Verify", _verify(frames=[FRAME, b"x" * 5000]), "frames[1]", "per image"),
    ("Verify", _verify(idempotency_key="has space"), "idempotency_key", "printable"),
    (
        "Verify",
        _verify(scheduled_start=Timestamp(seconds=-5)),
        "scheduled_start",
        "not a valid time",
    ),
    ("Enroll", pb.EnrollRequest(images=[FRAME]), "participant_id", "required"),
    ("Enroll", pb.EnrollRequest(participant_id="p-1"), "images", "at least one"),
    ("GetEnrollment", pb.GetEnrollmentRequest(), "participant_id", "required"),
    ("DeleteEnrollment", pb.DeleteEnrollmentRequest(), "participant_id", "required"),
    (
        "StartLivenessChallenge",
        pb.StartLivenessChallengeRequest(participant_id="p-1", training_id="t-1", gate=1),
        "training_type",
        "required",
    ),
    (
        "GetAttempts",
        pb.GetAttemptsRequest(participant_id="p-1", training_id="t-1", training_type=7),
        "training_type",
        "7 is not a known",
    ),
    ("RedeemToken", pb.RedeemTokenRequest(expected_gate=1, audience="a"), "token", "required"),
    (
        "RedeemToken",
        pb.RedeemTokenRequest(token="a.b.c", expected_gate=1),
        "audience",
        "required",
    ),
    (
        "RedeemToken",
        pb.RedeemTokenRequest(token="a.b.c", expected_gate=pb.GATE_SESSION, audience="a"),
        "expected_session_id",
        "required",
    ),
    (
        "RedeemToken",
        pb.RedeemTokenRequest(token="a.b.c", expected_gate=pb.GATE_REDEEM, audience="a"),
        "expected_participant_id",
        "required",
    ),
    (
        "SetEnrollmentTenants",
        pb.SetEnrollmentTenantsRequest(participant_id="p-1", tenants=["lms a"]),
        "tenants[0]",
        "letters, digits",
    ),
    ("Verify", _verify(venue_pass="has space"), "venue_pass", "QR code"),
]


@pytest.fixture(scope="module")
def api_server(start_module_server: ServerStarter, redis_url: str) -> RunningServer:
    """One server for the read-only tests of this module, health SERVING."""
    server = start_module_server(redis_url)
    server.wait_health(SERVING)
    return server


@pytest.fixture(scope="module")
def small_limits_server(start_module_server: ServerStarter, redis_url: str) -> RunningServer:
    """A server with small request limits, so oversize requests are cheap to build."""
    return start_module_server(
        redis_url,
        server__max_frames=3,
        server__max_image_bytes=4096,
        server__max_message_bytes=64 * 1024,
    )


@pytest.mark.parametrize(
    ("rpc", "request_", "field", "why"),
    MALFORMED,
    ids=[f"{rpc}-{field}-{i}" for i, (rpc, _, field, _) in enumerate(MALFORMED)],
)
def test_malformed_request_gets_invalid_argument_naming_the_field(
    small_limits_server: RunningServer, rpc: str, request_: Message, field: str, why: str
) -> None:
    error = _error(small_limits_server, rpc, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: ")
    assert why in error.details()


def test_oversize_message_gets_invalid_argument(small_limits_server: RunningServer) -> None:
    # Each frame is within the per-image limit; together they exceed the message limit.
    request = pb.EnrollRequest(participant_id="p-1", images=[b"x" * 4000] * 20)
    error = _error(small_limits_server, "Enroll", request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("request: ")


def test_message_beyond_the_transport_limit_is_refused(small_limits_server: RunningServer) -> None:
    # Far beyond max_message_bytes gRPC itself refuses it, before it is parsed.
    request = pb.EnrollRequest(participant_id="p-1", images=[b"x" * (256 * 1024)])
    error = _error(small_limits_server, "Enroll", request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.headers.get("Content-Type", ""), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def test_healthz_reflects_health(api_server: RunningServer) -> None:
    status, _, body = _get(f"{api_server.http_url}/healthz")
    assert status == 200
    assert json.loads(body) == {"status": "SERVING"}


def test_metrics_count_calls_by_method_and_code(facesvc_server: RunningServer) -> None:
    _error(facesvc_server, "Verify", WELL_FORMED["Verify"])
    _error(facesvc_server, "Verify", _verify(participant_id=""))
    method = 'method="facesvc.v1.FaceVerification/Verify"'
    expected = {
        f'facesvc_grpc_calls_total{{code="UNIMPLEMENTED",{method}}} 1.0',
        f'facesvc_grpc_calls_total{{code="INVALID_ARGUMENT",{method}}} 1.0',
        f"facesvc_grpc_call_seconds_count{{{method}}} 2.0",
        "facesvc_serving 1.0",
    }
    # gRPC sends an aborted call's status before the handler unwinds, so the client can
    # be told INVALID_ARGUMENT a moment before the call is counted: poll briefly.
    deadline = time.monotonic() + 20
    while True:
        status, content_type, body = _get(f"{facesvc_server.http_url}/metrics")
        lines = set(body.decode().splitlines())
        if expected <= lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200
    assert content_type.startswith("text/plain")
    seen = sorted(line for line in lines if line.startswith(("facesvc_grpc_calls", "facesvc_serv")))
    assert expected <= lines, f"missing {expected - lines}; saw {seen}"


def test_container_healthcheck_probe_passes_when_serving(api_server: RunningServer) -> None:
    assert healthcheck.main(["--target", api_server.grpc_target]) == 0
