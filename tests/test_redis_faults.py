"""Redis faults through the real service: a crash and restart of a real redis-server (AOF,
``appendfsync always``) in the middle of a burst of Verify calls, and the whole service on a
real three-node Redis Cluster and behind a real Sentinel.

Accounting in the restart test: every scan carries its own idempotency key and is retried,
as a kiosk or LMS gate would, until it gets a decision. A scan whose attempt was reserved
but whose decision never reached Redis (cut by the crash) answers ABORTED ("still being
decided") until its lease (``limits.scan_lease_s``, a few seconds here) lapses; then a retry
takes it over and decides it with the same attempt. So every scan ends with a decision, and
after the restart the service's count must equal the counted decisions exactly, and never
exceed the cap.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.transport.auth import Client, Role, new_api_key, write_keys_file
from tests.conftest import RunningServer, ServerStarter
from tests.test_audit import as_caller
from tests.test_redis_topologies import (
    SentinelServer,
    cluster,  # noqa: F401  (the three-node cluster fixture)
)
from tests.test_redis_topologies import binary as redis_server_binary
from tests.test_service_verify import PID, enroll, genuine, start
from tools.redis_local import RedisServer

pytestmark = pytest.mark.slow
SERVING = health_pb2.HealthCheckResponse.SERVING
# Decisions that spend an attempt (the engine refunds NO_FACE, MULTIPLE_FACES, LOW_QUALITY;
# ATTEMPTS_EXHAUSTED spent nothing).
COUNTED = {"VERIFIED", "NOT_MATCHED", "SPOOF_SUSPECTED", "CHALLENGE_FAILED"}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}
CAP = 8


class Burst:
    """Scans sent concurrently, each retried with its idempotency key until decided."""

    def __init__(self, server: RunningServer, frame: bytes) -> None:
        self._server = server
        self._frame = frame
        self.unavailable = threading.Event()
        self.answers = 0
        self._lock = threading.Lock()

    def scan(self, training_id: str) -> str:
        """The decision name."""
        request = pb.VerifyRequest(
            participant_id=PID,
            training_id=training_id,
            training_type=pb.TRAINING_TYPE_SPL,
            gate=pb.GATE_SESSION,
            session_id="s1",
            frames=[self._frame],
            idempotency_key=uuid.uuid4().hex,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                reply = self._server.stub.Verify(request, timeout=30)
            except grpc.RpcError as error:
                assert error.code() in RETRYABLE, (error.code(), error.details())
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    self.unavailable.set()
                time.sleep(0.3)
                continue
            with self._lock:
                self.answers += 1
            return str(pb.Decision.Name(reply.decision).removeprefix("DECISION_"))
        pytest.fail("a scan got no answer within 120 s")


def _used(server: RunningServer, training_id: str) -> int:
    reply = server.stub.GetAttempts(
        pb.GetAttemptsRequest(
            participant_id=PID, training_id=training_id, training_type=pb.TRAINING_TYPE_SPL
        ),
        timeout=10,
    )
    return int(reply.used)


def _crash(server: RedisServer) -> None:
    """SIGKILL: no shutdown save, only what AOF (fsync always) already holds survives."""
    assert server.process is not None
    server.process.kill()
    server.process.wait()
    server.process = None


def test_redis_crash_mid_burst_loses_no_count_and_never_passes_the_cap(
    start_server: ServerStarter, dedicated_redis: RedisServer, tmp_path: Path
) -> None:
    server = start(
        start_server, dedicated_redis.url, tmp_path, limits__cap_spl=CAP, limits__scan_lease_s=3
    )
    assert enroll(server).enrolled
    burst = Burst(server, genuine())
    trainings = ["under-cap"] * (CAP - 2) + ["over-cap"] * (CAP + 6)
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(burst.scan, training) for training in trainings]
        while burst.answers < 3:  # some scans decided, most still to come
            time.sleep(0.05)
        _crash(dedicated_redis)
        # Stay down until a call has met the outage, so the burst really straddles it.
        assert burst.unavailable.wait(60), "no call met the Redis outage"
        dedicated_redis.start()
        outcomes = [future.result() for future in futures]

    server.wait_health(SERVING)  # recovered by itself
    by_training: dict[str, Counter[str]] = {"under-cap": Counter(), "over-cap": Counter()}
    for training, outcome in zip(trainings, outcomes, strict=True):
        by_training[training][outcome] += 1

    under = by_training["under-cap"]
    counted = sum(n for decision, n in under.items() if decision in COUNTED)
    assert _used(server, "under-cap") == counted, under

    over = by_training["over-cap"]
    counted = sum(n for decision, n in over.items() if decision in COUNTED)
    assert _used(server, "over-cap") == CAP, over  # every scan tried; the cap held exactly
    assert counted <= CAP and over["ATTEMPTS_EXHAUSTED"] > 0

    # And the service goes on deciding normally after the crash.
    assert burst.scan("after-crash") == "VERIFIED"
    assert _used(server, "after-crash") == 1


def test_the_service_on_a_redis_cluster(
    start_server: ServerStarter,
    cluster: list[RedisServer],  # noqa: F811
    tmp_path: Path,
) -> None:
    url = f"redis+cluster://127.0.0.1:{cluster[0].port}"
    key, key_id, digest = new_api_key()
    keys = tmp_path / "keys.json"
    write_keys_file(keys, [Client("ops", Role.ADMIN, "dev", key_id, digest)])
    # Authenticated, so every call also runs the client rate limit's script on the cluster.
    server = as_caller(
        start(start_server, url, tmp_path, limits__cap_spl=3, security__api_keys_file=keys), key
    )
    assert enroll(server).enrolled
    burst = Burst(server, genuine())
    outcomes = Counter(burst.scan("course-1") for _ in range(5))
    assert outcomes == Counter({"VERIFIED": 3, "ATTEMPTS_EXHAUSTED": 2})
    assert _used(server, "course-1") == 3

    token_scan = pb.VerifyRequest(
        participant_id=PID,
        training_id="course-2",
        training_type=pb.TRAINING_TYPE_SPL,
        gate=pb.GATE_SESSION,
        session_id="s1",
        frames=[genuine()],
    )
    token = server.stub.Verify(token_scan, timeout=60).token
    redeem = pb.RedeemTokenRequest(
        token=token,
        expected_gate=pb.GATE_SESSION,
        expected_session_id="s1",
        audience="dev",
        expected_participant_id=PID,
    )
    assert server.stub.RedeemToken(redeem, timeout=10).valid
    assert not server.stub.RedeemToken(redeem, timeout=10).valid  # one-time, across nodes

    prefix = server.app.settings.redis.key_prefix
    slots: set[int] = set()
    kinds: set[str] = set()
    rate_keys = 0
    for node in cluster:
        with redis.Redis(port=node.port) as admin:
            for key in admin.scan_iter(match=f"{prefix}*{{p:{PID}}}*"):
                slots.add(int(admin.execute_command("CLUSTER", "KEYSLOT", key)))
                kinds.add(key.decode().split("}:", 1)[1].split(":")[0])
            rate_keys += len(list(admin.scan_iter(match=f"{prefix}*{{c:ops}}*")))
    assert {"template", "cap", "idem", "jti"} <= kinds, kinds
    assert len(slots) == 1  # every key of the participant in one slot
    assert rate_keys  # the client's rate windows live on the cluster too


def test_the_service_behind_a_redis_sentinel(
    start_server: ServerStarter, dedicated_redis: RedisServer, tmp_path: Path
) -> None:
    sentinel = SentinelServer(
        redis_server_binary(), tmp_path / "sentinel", dedicated_redis.port, "facesvc-main"
    )
    sentinel.start()
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/facesvc-main/0"
        server = start(start_server, url, tmp_path, limits__cap_spl=2)
        assert enroll(server).enrolled
        burst = Burst(server, genuine())
        outcomes = Counter(burst.scan("course-1") for _ in range(3))
        assert outcomes == Counter({"VERIFIED": 2, "ATTEMPTS_EXHAUSTED": 1})
        with redis.Redis(port=dedicated_redis.port) as master:  # the data is on the master
            assert any(f"{{p:{PID}}}:cap:course-1".encode() in k for k in master.scan_iter())
    finally:
        sentinel.stop()
