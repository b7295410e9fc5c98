"""Overload and deadlines: refuse at once what cannot be served, drop what nobody waits for,
and never spend a participant's attempt on either.

Through the real gRPC server with the real engine and a real Redis (liveness off), and the
engine alone where the moment must be exact (a deadline already past).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.config import QualitySettings
from facesvc.domain import Gate, TrainingType
from facesvc.engine import VerifyCommand
from facesvc.imaging import DecodeLimits
from facesvc.models.facework import BatchSettings, FaceWork
from facesvc.models.pack import ModelPack
from facesvc.transport.admission import InFlightLimit
from tests.conftest import RunningServer, ServerStarter
from tests.engine_support import ADMIN, LMS, TENANTS, EngineKit, astronaut, jpeg
from tests.slow_service import PLUGIN, SLOW_DIR_ENV, SLOW_METHOD, release, started
from tests.test_service_verify import PID, enroll, genuine, start


def verify_request(frames: list[bytes], training_id: str = "course-1") -> pb.VerifyRequest:
    return pb.VerifyRequest(
        participant_id=PID,
        training_id=training_id,
        training_type=pb.TRAINING_TYPE_SPL,
        gate=pb.GATE_SESSION,
        session_id="s1",
        frames=frames,
    )


def attempts_used(server: RunningServer, training_id: str = "course-1") -> int:
    reply = server.stub.GetAttempts(
        pb.GetAttemptsRequest(
            participant_id=PID, training_id=training_id, training_type=pb.TRAINING_TYPE_SPL
        ),
        timeout=10,
    )
    return int(reply.used)


def test_in_flight_limit_refuses_beyond_it_and_frees_a_slot_on_leave() -> None:
    limit = InFlightLimit(2)
    assert limit.try_enter() and limit.try_enter()
    assert not limit.try_enter() and limit.held == 2  # a refusal takes nothing
    limit.leave()
    assert limit.try_enter() and limit.held == 2


def test_a_flood_beyond_the_limit_is_refused_at_once_and_spends_no_attempt(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    server = start(
        start_server,
        redis_url,
        tmp_path,
        throughput__max_in_flight_verify=1,
        throughput__retry_after_s=2,
        limits__cap_spl=50,
    )
    enroll(server)
    # Each call holds its slot for four frames' worth of face work; the others arrive
    # meanwhile (all are sent before any is answered).
    frames = [genuine()] * 4
    calls: list[Future[pb.VerifyResponse]] = [
        server.stub.Verify.future(verify_request(frames), timeout=120) for _ in range(8)
    ]
    served: list[pb.VerifyResponse] = []
    refused: list[grpc.RpcError] = []
    for call in calls:
        try:
            served.append(call.result())
        except grpc.RpcError as exc:
            refused.append(exc)
    assert served and refused
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "server busy" in (error.details() or "")
        assert ("retry-after", "2") in tuple(error.trailing_metadata() or ())
    assert all(reply.decision == pb.DECISION_VERIFIED for reply in served)
    # Only the served calls counted; the refused ones reached no engine.
    assert attempts_used(server) == len(served) == served[-1].attempts_used


def test_a_call_past_its_deadline_is_dropped_and_costs_no_attempt(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    server = start(start_server, redis_url, tmp_path, limits__cap_spl=50)
    enroll(server)
    # Sixteen frames cannot be decoded, analysed and embedded within 50 ms on any machine
    # this runs on: the deadline passes while the call is being served.
    with pytest.raises(grpc.RpcError) as late:
        server.stub.Verify(verify_request([genuine()] * 16), timeout=0.05)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Whatever stage the deadline caught it in, no attempt stays spent: either none was
    # reserved or the engine refunds it as the call is cancelled.
    deadline = time.monotonic() + 30
    while attempts_used(server) != 0:
        assert time.monotonic() < deadline, "the expired call's attempt was never refunded"
        time.sleep(0.05)
    reply = server.stub.Verify(verify_request([genuine()]), timeout=120)
    assert reply.decision == pb.DECISION_VERIFIED and reply.attempts_used == 1


async def test_an_expired_scan_reserves_nothing_and_analyses_no_face(
    engine_kit: EngineKit, model_pack: ModelPack
) -> None:
    outcome = await engine_kit.engine.enroll(
        PID, [jpeg(astronaut())], replace=False, caller=ADMIN, tenants=TENANTS
    )
    assert outcome.enrolled
    command = VerifyCommand(
        participant_id=PID,
        training_id="course-1",
        training_type=TrainingType.SPL,
        gate=Gate.SESSION,
        session_id="s1",
        frames=[genuine()],
        caller=LMS,
        deadline=time.monotonic() - 1.0,
    )
    with pytest.raises(TimeoutError, match="before its attempt was reserved"):
        await engine_kit.engine.verify(command)
    usage = await engine_kit.engine.attempts(PID, "course-1", TrainingType.SPL, caller=ADMIN)
    assert usage.used == 0

    batching = BatchSettings(max_batch=1, max_wait_s=0.0, max_queue=1)
    faces = FaceWork(
        model_pack.pipeline(QualitySettings()),
        None,
        decode_limits=DecodeLimits(),
        threads=1,
        embed_batching=batching,
        pad_batching=batching,
    )
    try:
        images = await faces.decode([genuine()])
        with pytest.raises(TimeoutError, match="before its faces were analysed"):
            await faces.analyze(images, deadline=time.monotonic() - 1.0)
        assert len(await faces.analyze(images, deadline=time.monotonic() + 60)) == 1
    finally:
        await faces.close()


def test_beyond_max_concurrent_rpcs_grpc_refuses_at_once_and_queues_nothing(
    start_server: ServerStarter,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What README and server.max_concurrent_rpcs say: no queue there. A call beyond the
    # limit, a health check too, is refused at once and without a retry-after.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    monkeypatch.setenv(SLOW_DIR_ENV, str(tmp_path))
    server = start_server(
        redis_url,
        server__max_concurrent_rpcs="2",
        server__plugins=PLUGIN,
    )
    slow = server.channel.unary_unary(SLOW_METHOD)
    held = [slow.future(b"", timeout=120) for _ in range(2)]
    try:
        deadline = time.monotonic() + 60
        while len(started(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(started(tmp_path)) == 2
        health = health_pb2_grpc.HealthStub(server.channel)
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Concurrent RPC limit exceeded" in (refused.value.details() or "")
        assert "retry-after" not in dict(refused.value.trailing_metadata() or ())
        assert not any(call.done() for call in held)  # refused while both were in flight
    finally:
        release(tmp_path)
    assert [call.result(timeout=60) for call in held] == [b"finished", b"finished"]
