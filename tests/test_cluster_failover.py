"""A Redis Cluster master dies under load, its replica takes over, and the programme's rules
hold throughout.

Real parts only: a Redis Cluster of three masters and three replicas (redis-server binaries,
AOF on, ``cluster-node-timeout`` 1 s, ``cluster-require-full-coverage no`` as deploy/ sets it),
three ``facesvc serve`` processes (the real engine and default model pack, liveness off, a
small frame of a real face), and the SDK balancing its calls round-robin over the three, as
an LMS gate would over the pods behind a headless Service.

Many participants each send more scans than their daily cap, concurrently; every scan carries
its own idempotency key and is retried, as a gate would, until it gets a decision. Each token
handed out is redeemed twice at once. When a third of the scans are answered, the master of
one third of the slots is killed (SIGKILL) and its replica is promoted by the cluster itself.
Afterwards:

- no participant has more attempts counted than the cap, by the decisions the callers saw and
  by the reservations in Redis;
- every VERIFIED scan's reservation is in its participant's cap set (no token without a
  counted attempt), read from the promoted replica for the dead master's slots;
- no token was accepted twice, during the run or when every token is redeemed once more after;
- while the dead master's slots had no master, every call for a participant there that began
  and ended in that window was answered UNAVAILABLE: never a decision, never a token.

The killed master also holds the audit stream (the key prefix is chosen so): that stream is
one key every scan and redemption appends to, so its master's death is felt by every
participant, not only by the third whose slots it served. The harsher case, every run.

The counts are printed (``pytest -s``) for docs/scaling.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from redis.crc import key_slot

from facesvc.client import (
    CheckReason,
    Decision,
    FaceServiceError,
    FaceVerificationClient,
    Gate,
    TrainingType,
)
from facesvc.store.keys import KeySpace
from facesvc.store.templates import generate_template_key
from facesvc.tokens.jws import b64url_decode
from facesvc.tokens.keys import keys_generate
from tests.engine_support import astronaut, jpeg
from tests.test_redis_topologies import ClusterServer, start_cluster

# Three model packs loading at once, then the load: on a busy 2-core CI machine, past the
# suite's 300 s default.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
PARTICIPANTS = 45
SCANS_EACH = 7  # two more than the SPL cap: the cap must refuse the last ones
CAP = 5
CALLERS = 9  # concurrent scans, three per server
TRAINING = "course-1"
AUDIENCE = "dev"  # the tenant of the anonymous caller (no API keys in this test)
COUNTED = {Decision.VERIFIED, Decision.NOT_MATCHED, Decision.SPOOF_SUSPECTED}
RETRY = {"UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED"}
LISTENING = re.compile(r"facesvc listening: gRPC 127\.0\.0\.1:(\d+), HTTP 127\.0\.0\.1:(\d+)")
LOAD_S = 240.0  # three model packs loading at once on a busy 2-core machine
GIVE_UP_S = 180.0  # a scan or redemption still unanswered after this fails the test


# ---------------------------------------------------------------- three server processes


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ports(self) -> tuple[int, int] | None:
        found = LISTENING.search(self.log())
        return (int(found[1]), int(found[2])) if found else None

    @property
    def grpc_target(self) -> str:
        ports = self.ports()
        assert ports is not None
        return f"127.0.0.1:{ports[0]}"

    def serving(self) -> bool:
        assert self.proc.poll() is None, self.log()
        if self.ports() is None:
            return False
        with grpc.insecure_channel(self.grpc_target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def calls(self) -> float:
        """Verify and RedeemToken calls this server answered (its /metrics)."""
        ports = self.ports()
        assert ports is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "facesvc_grpc_calls_total"
            and sample.labels["method"].rsplit("/", 1)[1] in ("Verify", "RedeemToken")
        )


def _wait_for(predicate: object, what: str, within_s: float) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[ClusterServer]]:
    """Three masters (nodes 0-2) and one replica each (node 3 + i replicates node i)."""
    nodes = start_cluster(
        tmp_path / "cluster",
        replicas=1,
        options=("--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no"),
    )
    yield nodes
    for node in nodes:
        node.stop()


# The master killed: node 0, which start_cluster gives slots 0-5460.
DEAD_SLOTS = range(0, 16384 // 3)


def audit_stream(prefix: str) -> str:
    """The audit stream's key under ``prefix`` (facesvc/serve/wiring.py names it so; the test
    checks the key exists after the run, so a rename cannot pass unnoticed)."""
    return f"{prefix.rstrip(':')}:audit"


@pytest.fixture
def key_prefix() -> str:
    """A prefix whose audit stream lands on the master that will be killed: the stream is
    one key that every scan and redemption appends to, whoever the participant, so its
    master's death is the harsher case and the one this test always runs."""
    while True:
        prefix = f"failover-{uuid.uuid4().hex[:8]}:"
        if key_slot(audit_stream(prefix).encode()) in DEAD_SLOTS:
            return prefix


@pytest.fixture
def servers(
    tmp_path: Path, redis_cluster: list[ClusterServer], key_prefix: str
) -> Iterator[list[Server]]:
    """Three ``facesvc serve`` processes on one cluster, sharing keys as pods share Secrets."""
    keys_generate(tmp_path / "token-keys")
    (tmp_path / "templates.key").write_text(generate_template_key("k1") + "\n")
    seeds = ",".join(f"127.0.0.1:{node.port}" for node in redis_cluster[:3])
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESVC_")}
    env.update(
        {
            "FACESVC_SERVER_GRPC_PORT": "0",
            "FACESVC_SERVER_HTTP_PORT": "0",
            "FACESVC_SERVER_GRACE_S": "2",
            "FACESVC_REDIS_URL": f"redis+cluster://{seeds}",
            "FACESVC_REDIS_KEY_PREFIX": key_prefix,
            "FACESVC_REDIS_HEALTH_INTERVAL_S": "0.2",
            "FACESVC_REDIS_HEALTH_TIMEOUT_S": "2",  # a busy 2-core machine
            "FACESVC_TOKENS_KEY_DIR": str(tmp_path / "token-keys"),
            "FACESVC_TOKENS_TTL_S": "900",  # tokens are redeemed again after the run
            "FACESVC_TEMPLATES_KEY_FILE": str(tmp_path / "templates.key"),
            "FACESVC_LIVENESS_SPL": "off",
            "FACESVC_LIMITS_CAP_SPL": str(CAP),
            # A scan cut off after its reservation is taken over by its retry this soon.
            "FACESVC_LIMITS_SCAN_LEASE_S": "3",
            "FACESVC_MODELS_THREADS": "1",  # three processes share two cores
            "FACESVC_LOGGING_FORMAT": "kv",
        }
    )
    started: list[Server] = []
    try:
        for index in range(3):
            log_path = tmp_path / f"serve-{index}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "facesvc.commands.cli", "serve"],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            started.append(Server(proc, log_path))
        _wait_for(lambda: all(s.serving() for s in started), "three servers to serve", LOAD_S)
        yield started
    finally:
        for server in started:
            if server.proc.poll() is None:
                server.proc.terminate()
        for server in started:
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


# ---------------------------------------------------------------- the load


@dataclass(frozen=True)
class Call:
    participant: str
    kind: str  # "verify" or "redeem"
    began: float  # time.monotonic()
    ended: float
    outcome: str  # a decision, "VALID", a refusal reason, or a gRPC status name
    token: str | None = None
    verification_id: str = ""
    replayed: bool = False  # the stored answer to an earlier call with the same key


class Load:
    """Scans for every participant, retried until decided; tokens redeemed twice at once."""

    def __init__(self, client: FaceVerificationClient, frame: bytes) -> None:
        self._client = client
        self._frame = frame
        self._lock = threading.Lock()
        self.calls: list[Call] = []
        self.decided = 0
        self._redeemers = ThreadPoolExecutor(max_workers=2 * CALLERS)

    def _record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def scan(self, participant: str) -> None:
        key = uuid.uuid4().hex
        deadline = time.monotonic() + GIVE_UP_S
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                result = self._client.verify(
                    participant, TRAINING, TrainingType.SPL, Gate.SESSION, [self._frame],
                    session_id="s1", idempotency_key=key, timeout_s=30,
                )  # fmt: skip
            except FaceServiceError as error:
                self._record(Call(participant, "verify", began, time.monotonic(), error.code.name))
                assert error.code.name in RETRY, error
                time.sleep(0.1)
                continue
            self._record(
                Call(
                    participant,
                    "verify",
                    began,
                    time.monotonic(),
                    result.decision.name,
                    result.token,
                    result.verification_id,
                    result.replayed,
                )
            )
            with self._lock:
                self.decided += 1
            if result.token is not None:
                both = [
                    self._redeemers.submit(self.redeem, participant, result.token) for _ in "ab"
                ]
                for future in both:
                    future.result()
            return
        pytest.fail(f"a scan of {participant} got no decision within {GIVE_UP_S} s")

    def redeem(self, participant: str, token: str) -> str:
        """Redeem until answered; the answer ("VALID" or the refusal's reason)."""
        deadline = time.monotonic() + GIVE_UP_S
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                answer = self._client.redeem(
                    token, participant_id=participant, audience=AUDIENCE, gate=Gate.SESSION,
                    session_id="s1", training_id=TRAINING, timeout_s=30,
                )  # fmt: skip
            except FaceServiceError as error:
                self._record(Call(participant, "redeem", began, time.monotonic(), error.code.name))
                assert error.code.name in RETRY, error
                time.sleep(0.1)
                continue
            outcome = "VALID" if answer.valid else answer.reason.name
            self._record(Call(participant, "redeem", began, time.monotonic(), outcome, token))
            return outcome
        pytest.fail(f"a token of {participant} got no redemption answer within {GIVE_UP_S} s")

    def close(self) -> None:
        self._redeemers.shutdown(wait=True)


@dataclass
class Failover:
    killed_at: float = 0.0
    last_seen_replica: float = 0.0  # the replica still answered ROLE "slave" at this instant
    promoted_seen: float = 0.0


def _kill_master_and_watch(master: ClusterServer, replica: ClusterServer) -> Failover:
    """SIGKILL ``master``; poll ``replica`` until it reports itself master."""
    window = Failover()
    assert master.process is not None
    master.process.kill()
    master.process.wait()
    master.process = None
    window.killed_at = time.monotonic()
    with replica.admin() as admin:
        while True:
            asked = time.monotonic()
            role = admin.execute_command("ROLE")[0]
            if role in (b"master", "master"):
                window.promoted_seen = time.monotonic()
                return window
            window.last_seen_replica = asked
            if asked - window.killed_at > 60:
                pytest.fail("the replica was not promoted within 60 s")
            time.sleep(0.02)


# ---------------------------------------------------------------- the test


def test_a_master_dies_under_load_and_no_rule_breaks(
    redis_cluster: list[ClusterServer], servers: list[Server], key_prefix: str
) -> None:
    participants = [f"p-{index:03d}" for index in range(PARTICIPANTS)]
    target = "ipv4:" + ",".join(s.grpc_target for s in servers)
    # A small frame of a real face: the models run for real, the cluster is what is tested.
    frame = jpeg(astronaut()[30:250, 130:330], quality=85)
    enrolment = jpeg(astronaut()[0:300, 80:380])
    victim, heir = redis_cluster[0], redis_cluster[3]
    space = KeySpace(key_prefix)
    orphaned = {p for p in participants if key_slot(space.participant(p).encode()) in DEAD_SLOTS}
    assert 0 < len(orphaned) < PARTICIPANTS

    with FaceVerificationClient(target, insecure=True, timeout_s=60) as client:
        for participant in participants:
            assert client.enroll(participant, [enrolment]).enrolled
        probe = client.verify(
            "p-000", "warm-up", TrainingType.SPL, Gate.SESSION, [frame], session_id="s1"
        )
        assert probe.decision is Decision.VERIFIED, probe.reason

        load = Load(client, frame)
        # Scan k of every participant before scan k + 1 of any: when the master dies every
        # participant still has scans to come.
        order = [p for _ in range(SCANS_EACH) for p in participants]
        with ThreadPoolExecutor(max_workers=CALLERS) as pool:
            futures = [pool.submit(load.scan, p) for p in order]
            _wait_for(lambda: load.decided >= len(order) // 3, "a third of the scans", 600)
            window = _kill_master_and_watch(victim, heir)
            for future in futures:
                future.result()
        load.close()

        # Every token once more, now that the cluster has settled: a used mark lost in the
        # failover would let one through again.
        tokens = {c.token: c.participant for c in load.calls if c.kind == "verify" and c.token}
        again = Counter(load.redeem(p, t) for t, p in tokens.items())
        attempts = {p: client.attempts(p, TRAINING, TrainingType.SPL).used for p in participants}
    served = [s.calls() for s in servers]
    # Readiness follows: every server reports SERVING again on the healed cluster (a health
    # check that still waited for the dead node would pull every pod out of its Service).
    _wait_for(lambda: all(s.serving() for s in servers), "SERVING after the failover", 60)

    verifies = [c for c in load.calls if c.kind == "verify"]
    decisions = [c for c in verifies if c.outcome in Decision.__members__]
    by_participant: dict[str, Counter[str]] = {p: Counter() for p in participants}
    for call in decisions:
        by_participant[call.participant][call.outcome] += 1
    in_window = [
        c
        for c in load.calls
        if c.participant in orphaned
        and c.began > window.killed_at
        and c.ended < window.last_seen_replica
    ]
    others_in_window = [
        c
        for c in load.calls
        if c.participant not in orphaned
        and c.began > window.killed_at
        and c.ended < window.last_seen_replica
    ]
    valid = Counter(c.token for c in load.calls if c.kind == "redeem" and c.outcome == "VALID")
    cap_sets, verified_records = _stored_reservations(redis_cluster, space, participants)
    live = next(node for node in redis_cluster if node.process is not None)
    with redis.RedisCluster(host="127.0.0.1", port=live.port) as cluster:
        assert cluster.exists(audit_stream(key_prefix)), "the audit stream is not where expected"
        audited = {
            fields[b"verification_id"].decode()
            for _, fields in cluster.xrange(audit_stream(key_prefix))
            if fields.get(b"action") == b"verify"
        }
    verified_ids = {c.verification_id for c in decisions if c.outcome == "VERIFIED"}

    report = {
        "participants": PARTICIPANTS,
        "on_the_killed_master": len(orphaned),
        "scans": len(order),
        "verify_calls": len(verifies),
        "decisions": dict(Counter(c.outcome for c in decisions)),
        "verify_errors": dict(Counter(c.outcome for c in verifies if c.outcome in RETRY)),
        "redeem_calls": sum(c.kind == "redeem" for c in load.calls),
        "redeem_answers": dict(
            Counter(c.outcome for c in load.calls if c.kind == "redeem" and c.outcome not in RETRY)
        ),
        "tokens": len(tokens),
        "tokens_accepted_once": sum(n == 1 for n in valid.values()),
        "tokens_accepted_twice_or_more": sum(n > 1 for n in valid.values()),
        # Spent in Redis, but the redemption's answer was UNAVAILABLE (its audit entry could
        # not be written) and its retry found the token used: fail closed, the gate never
        # heard VALID.
        "tokens_spent_without_valid": len(tokens) - len(valid),
        "redeemed_again_after_failover": dict(again),
        "no_master_window_s": round(window.last_seen_replica - window.killed_at, 2),
        "promotion_seen_after_s": round(window.promoted_seen - window.killed_at, 2),
        "calls_inside_window": dict(Counter(c.outcome for c in in_window)),
        "other_participants_calls_inside_window": dict(
            Counter(c.outcome + (" (replayed)" if c.replayed else "") for c in others_in_window)
        ),
        # A scan whose decision was stored but whose audit entry could not be written is
        # answered UNAVAILABLE; its retry gets the stored answer, token included, and the
        # replay appends no entry.
        "verified_scans_without_audit_entry": len(verified_ids - audited),
        "calls_per_server": served,
    }
    print("\nfailover under load:", json.dumps(report, indent=1))

    # The load really went over all three servers, and the window really had calls in it.
    assert all(n > 0 for n in served), served
    assert in_window, "no call began and ended while the slots had no master"
    # While a slot had no master: UNAVAILABLE, never a decision and never a token.
    assert {c.outcome for c in in_window} == {"UNAVAILABLE"}, report["calls_inside_window"]
    assert not any(c.token for c in in_window)

    for participant, seen in by_participant.items():
        counted = sum(n for name, n in seen.items() if Decision[name] in COUNTED)
        # Every scan got one decision; exactly the cap of them counted, the rest refused.
        assert sum(seen.values()) == SCANS_EACH, (participant, seen)
        assert counted == CAP, (participant, seen)
        assert seen[Decision.ATTEMPTS_EXHAUSTED.name] == SCANS_EACH - CAP, (participant, seen)
        # Redis agrees: the cap set holds exactly the cap.
        assert attempts[participant] == CAP, (participant, attempts[participant])
        assert len(cap_sets[participant]) == CAP, participant
        # Every VERIFIED scan's reservation is one of the counted ones.
        verified = verified_records[participant]
        assert len(verified) == seen[Decision.VERIFIED.name], participant
        assert all(rid in cap_sets[participant] for rid, _ in verified), participant
        seen_tokens = {c.token for c in decisions if c.participant == participant and c.token}
        assert {jti for _, jti in verified} == {_jti(t) for t in seen_tokens}, participant

    # No token was accepted twice; after the failover every one is refused as used.
    assert all(n <= 1 for n in valid.values()), report
    assert set(again) == {CheckReason.ALREADY_USED.name}, again


def _jti(token: str) -> str:
    payload = token.split(".")[1]
    return str(json.loads(b64url_decode(payload))["jti"])


def _stored_reservations(
    nodes: list[ClusterServer], space: KeySpace, participants: list[str]
) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str]]]]:
    """Per participant, read from whichever node now masters its slot: the reservation ids in
    today's cap set of TRAINING, and (reservation id, jti) of every idempotency record whose
    decision is VERIFIED."""
    live = next(node for node in nodes if node.process is not None)
    with redis.RedisCluster(host="127.0.0.1", port=live.port) as cluster:
        cap_sets: dict[str, set[str]] = {}
        verified: dict[str, list[tuple[str, str]]] = {}
        for participant in participants:
            base = space.participant(participant)
            node = cluster.get_node_from_key(base)
            keys = [
                k.decode()
                for k in cluster.scan_iter(match=f"{base}:*", count=1000, target_nodes=node)
            ]
            caps = [k for k in keys if f":cap:{TRAINING}:" in k]
            assert len(caps) == 1, keys  # one WIB day, one training
            cap_sets[participant] = {m.decode() for m in cluster.smembers(caps[0])}
            verified[participant] = []
            for key in keys:
                if ":idem:" not in key or key.endswith(":lease"):
                    continue
                rid, decision = cluster.hmget(key, "rid", "decision")
                remembered = json.loads(decision) if decision else {}
                if remembered.get("decision") == Decision.VERIFIED.value:
                    verified[participant].append((rid.decode(), remembered["claims"]["jti"]))
    return cap_sets, verified
