"""Two clocks: the service's decides the WIB day, Redis's the expiry of every key.

A service whose clock is far from Redis's must still count attempts exactly (no counter is
ever written already expired), must say so (metric, log, health NOT_SERVING beyond the hard
bound) and, beyond that bound, refuses scans rather than count them on the wrong day.
The server tests run the real `facesvc serve` under faketime, a day behind and a day ahead
of the real clock that Redis keeps.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.clock import ClockUntrusted, FixedClock, SkewWatch
from facesvc.domain import TrainingType
from facesvc.metrics import Metrics
from facesvc.models.pack import ModelPack
from facesvc.serve.health import Health, RedisProbe
from facesvc.serve.wiring import build_engine
from facesvc.store.connection import redis_client_from_url
from facesvc.store.templates import generate_template_key
from tests.engine_support import ADMIN, TENANTS, EngineKit, astronaut, jpeg
from tests.serve_process import REPO, child_env, serve_process, wait_for
from tests.test_engine import PID, scan

pytestmark = pytest.mark.calendar

DAY = timedelta(days=1)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def redis_now(url: str) -> datetime:
    """Redis's clock (TIME), which tests here shift the service's clock against."""
    client = redis.Redis.from_url(url)
    try:
        seconds, micros = client.time()
    finally:
        client.close()
    return datetime.fromtimestamp(seconds + micros / 1e6, UTC)


async def test_the_probe_measures_the_skew_warns_and_stops_serving_beyond_the_bound(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis_client_from_url(redis_url, socket_timeout_s=2.0, socket_connect_timeout_s=1.0)
    metrics = Metrics()
    health = Health(metrics)
    await health.set_models_ready(True)
    watch = SkewWatch(warn_s=2.0, max_s=60.0)
    clock = FixedClock(redis_now(redis_url))
    probe = RedisProbe(client, health, 1.0, 5.0, clock=clock, skew=watch, metrics=metrics)
    try:
        await probe.probe()
        assert watch.skew_s is not None and abs(watch.skew_s) < 1.0
        assert health.state.serving

        clock.set(redis_now(redis_url) + timedelta(seconds=10))
        with caplog.at_level(logging.WARNING, logger="facesvc.serve.health"):
            await probe.probe()
        assert 9.0 < metrics.clock_skew._value.get() < 11.0
        assert "clock skew" in caplog.text
        assert health.state.serving  # beyond the warning, within the hard bound

        clock.set(redis_now(redis_url) - DAY)
        await probe.probe()
        assert not health.state.serving
        assert health.state.describe() == "clock skewed from redis"
        assert abs(metrics.clock_skew._value.get() + DAY.total_seconds()) < 5.0

        clock.set(redis_now(redis_url))
        await probe.probe()
        assert health.state.serving
    finally:
        await client.aclose()


async def test_a_server_beyond_the_bound_refuses_scans_and_spends_nothing(
    engine_kit: EngineKit, model_pack: ModelPack
) -> None:
    await engine_kit.engine.enroll(
        PID, [jpeg(astronaut())], replace=False, caller=ADMIN, tenants=TENANTS
    )
    watch = SkewWatch(warn_s=2.0, max_s=60.0)
    watch.record(-DAY.total_seconds())
    engine = await build_engine(
        engine_kit.settings,
        engine_kit.redis,
        Metrics(),
        clock=engine_kit.clock,
        pack=model_pack,
        skew=watch,
    )
    try:
        with pytest.raises(ClockUntrusted, match="off Redis's"):
            await engine.verify(scan([jpeg(astronaut())]))
        assert (await engine.attempts(PID, "training-1", TrainingType.SPL, caller=ADMIN)).used == 0
    finally:
        await engine.close()


# ----------------------------------------------------------- the real server under faketime


def faketime() -> str:
    """The faketime wrapper, or skip (fail where FACESVC_REQUIRE_FAKETIME=1, as CI sets)."""
    found = shutil.which("faketime")
    if found is None:
        if os.environ.get("FACESVC_REQUIRE_FAKETIME") == "1":
            pytest.fail("faketime is required here: apt-get install -y faketime")
        pytest.skip("no faketime (apt-get install -y faketime)")
    return found


def _start_args(tmp_path: Path, redis_url: str, redis_prefix: str, offset: str) -> list[str]:
    """Flags for a server whose clock is ``offset`` (faketime's syntax) from Redis's, with a
    signing key made on that same clock."""
    keys = tmp_path / "token-keys"
    made = subprocess.run(
        [faketime(), "-f", offset, sys.executable, "-m", "facesvc.commands.cli", "keys",
         "--tokens-key-dir", str(keys), "generate"],
        cwd=REPO, env=child_env(), capture_output=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    (tmp_path / "templates.key").write_text(generate_template_key("k1") + "\n")
    return [
        "--server-grpc-port", "0",
        "--server-http-port", "0",
        "--redis-url", redis_url,
        "--redis-key-prefix", redis_prefix,
        "--redis-health-interval-s", "0.2",
        "--tokens-key-dir", str(keys),
        "--templates-key-file", str(tmp_path / "templates.key"),
        "--liveness-spl", "off",
        "--logging-format", "kv",
    ]  # fmt: skip


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def _enroll(stub: pb_grpc.FaceVerificationStub) -> None:
    stub.Enroll(pb.EnrollRequest(participant_id=PID, images=[jpeg(astronaut())]), timeout=120)


def _verify(stub: pb_grpc.FaceVerificationStub, frame: bytes) -> str:
    """The decision's name (VERIFIED, ...)."""
    request = pb.VerifyRequest(
        participant_id=PID,
        training_id="course-1",
        training_type=pb.TRAINING_TYPE_SPL,
        gate=pb.GATE_SESSION,
        session_id="s1",
        frames=[frame],
    )
    reply: pb.VerifyResponse = stub.Verify(request, timeout=120)
    return str(pb.Decision.Name(reply.decision)).removeprefix("DECISION_")


@pytest.mark.slow
@pytest.mark.parametrize("offset", ["-1d", "+1d"])
def test_a_server_a_day_off_redis_still_counts_exactly_five_of_twelve(
    offset: str, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    args = _start_args(tmp_path, redis_url, redis_prefix, offset)
    # The skew bound is opened wide here to show that the counters themselves never
    # depend on the clocks agreeing; at the default bound this server would refuse scans.
    args += ["--limits-clock-skew-max-s", str(3 * DAY.total_seconds())]
    wrapper = [faketime(), "-f", offset]
    with serve_process(args, tmp_path / "serve.log", wrapper=wrapper) as server:
        grpc_port, http_port = server.ports(within_s=120)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            wait_for(lambda: _health(channel) == SERVING, "SERVING", within_s=180)
            stub = pb_grpc.FaceVerificationStub(channel)  # type: ignore[no-untyped-call]
            stub.Enroll(
                pb.EnrollRequest(participant_id=PID, images=[jpeg(astronaut())]), timeout=120
            )
            frame = jpeg(astronaut()[20:420, 40:440], quality=80)
            with ThreadPoolExecutor(12) as pool:
                decisions = Counter(pool.map(lambda _: _verify(stub, frame), range(12)))
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    assert decisions == {"VERIFIED": 5, "ATTEMPTS_EXHAUSTED": 7}, server.log()
    skew = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("facesvc_clock_skew_seconds")
    )
    sign = -1 if offset.startswith("-") else 1
    assert abs(skew - sign * DAY.total_seconds()) < 60, skew


@pytest.mark.slow
def test_a_server_a_day_behind_at_the_default_bound_is_not_serving_and_refuses_scans(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    args = _start_args(tmp_path, redis_url, redis_prefix, "-1d")
    with serve_process(args, tmp_path / "serve.log", wrapper=[faketime(), "-f", "-1d"]) as server:
        grpc_port, _ = server.ports(within_s=120)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            wait_for(lambda: "engine ready" in server.log(), "the engine", within_s=180)
            assert _health(channel) == NOT_SERVING
            stub = pb_grpc.FaceVerificationStub(channel)  # type: ignore[no-untyped-call]
            stub.Enroll(
                pb.EnrollRequest(participant_id=PID, images=[jpeg(astronaut())]), timeout=120
            )
            with pytest.raises(grpc.RpcError) as refused:
                _verify(stub, jpeg(astronaut()))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "off Redis's" in (refused.value.details() or "")
            attempts = stub.GetAttempts(
                pb.GetAttemptsRequest(
                    participant_id=PID, training_id="course-1", training_type=pb.TRAINING_TYPE_SPL
                ),
                timeout=10,
            )
    assert attempts.used == 0
    assert "clock skew" in server.log()
