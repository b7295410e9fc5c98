"""Enroll, Verify, GetAttempts, RedeemToken and GetSigningKeys through the real gRPC server,
with the real engine and a real Redis; Redis dying and the service restarting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.engine import Engine
from facesvc.serve.app import Resources
from facesvc.serve.wiring import build_engine
from facesvc.store.templates import generate_template_key
from facesvc.tokens.keys import keys_generate
from tests.conftest import RunningServer, ServerStarter
from tests.engine_support import astronaut, default_pack, insightface_image, jpeg

pytestmark = pytest.mark.calendar

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PID = "participant-7"
TENANT = "lms-a"
"""The LMS tenant the tests' participant is enrolled for."""


async def real_engine(resources: Resources) -> Engine:
    return await build_engine(
        resources.settings, resources.redis, resources.metrics, pack=default_pack()
    )


def start(
    starter: ServerStarter, redis_url: str, tmp_path: Path, **overrides: Any
) -> RunningServer:
    key_dir = tmp_path / "token-keys"
    if not key_dir.exists():
        keys_generate(key_dir)
    template_key = tmp_path / "templates.key"
    if not template_key.exists():
        template_key.write_text(generate_template_key("k1") + "\n")
    values: dict[str, Any] = {
        "tokens__key_dir": key_dir,
        "templates__key_file": template_key,
        "liveness__spl": "off",
        "liveness__webinar": "off",
        "redis__health_interval_s": 0.1,
    }
    values.update(overrides)
    server = starter(redis_url, engine_factory=real_engine, **values)
    server.wait_health(SERVING, within_s=120)
    return server


def enroll(server: RunningServer) -> pb.EnrollResponse:
    reply: pb.EnrollResponse = server.stub.Enroll(
        pb.EnrollRequest(participant_id=PID, images=[jpeg(astronaut())], tenants=[TENANT]),
        timeout=60,
    )
    return reply


def verify(server: RunningServer, frame: bytes, **fields: Any) -> pb.VerifyResponse:
    request = pb.VerifyRequest(
        participant_id=PID,
        training_id="course-1",
        training_type=pb.TRAINING_TYPE_SPL,
        gate=pb.GATE_SESSION,
        session_id="s1",
        frames=[frame],
        **fields,
    )
    reply: pb.VerifyResponse = server.stub.Verify(request, timeout=60)
    return reply


def genuine() -> bytes:
    return jpeg(astronaut()[20:420, 40:440], quality=80)


def impostor() -> bytes:
    return jpeg(insightface_image("Tom_Hanks_54745.png"))


def test_enroll_verify_redeem_once(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    server = start(start_server, redis_url, tmp_path)
    enrolled = enroll(server)
    assert enrolled.enrolled and enrolled.enrollment.image_count == 1
    assert enrolled.images[0].accepted and enrolled.images[0].face_height_px > 80

    metadata = server.stub.GetEnrollment(pb.GetEnrollmentRequest(participant_id=PID), timeout=5)
    assert metadata.enrollment.model_pack.startswith("yunet-sface@")

    reply = verify(server, genuine())
    assert reply.decision == pb.DECISION_VERIFIED, reply.reason
    assert reply.attempts_used == 1 and reply.attempts_remaining == 4 and reply.attempts_limit == 5
    assert reply.token and reply.token_expires_at.seconds > 0

    keys = server.stub.GetSigningKeys(pb.GetSigningKeysRequest(), timeout=5)
    assert keys.keys and '"kty": "OKP"' in keys.jwks_json

    redeem = pb.RedeemTokenRequest(
        token=reply.token,
        expected_gate=pb.GATE_SESSION,
        expected_session_id="s1",
        audience="dev",
        expected_participant_id=PID,
    )
    first = server.stub.RedeemToken(redeem, timeout=5)
    assert first.valid and first.claims.participant_id == PID
    second = server.stub.RedeemToken(redeem, timeout=5)
    assert not second.valid and second.reason == pb.REDEEM_REASON_ALREADY_USED


def test_impostor_and_bad_frames(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    server = start(start_server, redis_url, tmp_path)
    enroll(server)
    reply = verify(server, impostor())
    assert reply.decision == pb.DECISION_NOT_MATCHED and not reply.token
    with pytest.raises(grpc.RpcError) as bad:
        verify(server, b"definitely not a jpeg")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0" in (bad.value.details() or "")
    attempts = server.stub.GetAttempts(
        pb.GetAttemptsRequest(
            participant_id=PID, training_id="course-1", training_type=pb.TRAINING_TYPE_SPL
        ),
        timeout=5,
    )
    assert attempts.used == 1  # the impostor counted; the undecodable frame did not


def test_a_required_challenge_is_asked_for_before_any_attempt(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    server = start(start_server, redis_url, tmp_path, liveness__spl="challenge")
    enroll(server)
    with pytest.raises(grpc.RpcError) as refused:
        verify(server, genuine())
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "StartLivenessChallenge" in (refused.value.details() or "")


def test_counts_survive_a_restart_of_the_service(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    first = start(start_server, redis_url, tmp_path)
    enroll(first)
    assert verify(first, impostor()).attempts_used == 1
    second = start(start_server, redis_url, tmp_path)
    reply = verify(second, impostor())
    assert reply.attempts_used == 2 and reply.attempts_remaining == 3


def test_redis_dying_answers_unavailable_then_recovers(
    start_server: ServerStarter, dedicated_redis: Any, tmp_path: Path
) -> None:
    server = start(start_server, dedicated_redis.url, tmp_path)
    enroll(server)
    dedicated_redis.stop()
    with pytest.raises(grpc.RpcError) as down:
        verify(server, impostor())
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    server.wait_health(NOT_SERVING)
    dedicated_redis.start()
    server.wait_health(SERVING)
    reply = verify(server, impostor())
    assert reply.decision == pb.DECISION_NOT_MATCHED and reply.attempts_used == 1
