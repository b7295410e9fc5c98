"""`facesvc serve --workers 2`: two worker processes behind one gRPC and one HTTP port.

Each test runs the real command as a subprocess (real engine, real Redis, keys in tmp,
liveness off). A call's worker is told apart by its pid: every worker prints it in its
"listening" line and /metrics labels the per-worker series with it. Each gRPC call goes
over a fresh connection (a local subchannel pool), so SO_REUSEPORT hashes it afresh.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.load import per_worker, placed_channels
from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.config import load_settings, usable_cores
from facesvc.store.templates import generate_template_key
from facesvc.tokens.keys import keys_generate
from tests.serve_process import ServeProcess, serve_process, wait_for
from tests.slow_service import PLUGIN, SLOW_DIR_ENV, SLOW_METHOD, release, started

LISTENING = re.compile(
    r"facesvc listening: gRPC 127\.0\.0\.1:(\d+), HTTP 127\.0\.0\.1:(\d+) .*"
    r"\[worker (\d+) of 2, pid (\d+)\]"
)
GET_ATTEMPTS = "facesvc.v1.FaceVerification/GetAttempts"
OK_GET_ATTEMPTS = ("facesvc_grpc_calls_total", (("code", "OK"), ("method", GET_ATTEMPTS)))
LOAD_S = 240.0  # two model packs loading on a busy 2-core machine


class Workers(ServeProcess):
    """The supervisor process and what its workers printed."""

    def listening(self) -> dict[int, tuple[int, int, int]]:
        """pid -> (gRPC port, HTTP port, worker index) of every worker that has listened."""
        return {
            int(pid): (int(g), int(h), int(i)) for g, h, i, pid in LISTENING.findall(self.log())
        }

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics (served by whichever worker the connection reached)."""
        _, http_port = self.ports()
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def per_worker(self, name: str, **labels: str) -> dict[int, float]:
        """pid -> value of the per-worker series ``name`` with ``labels``."""
        out = {}
        for (sample, keys), value in self.metrics().items():
            found = dict(keys)
            if sample == name and all(found.get(k) == v for k, v in labels.items()):
                out[int(found["pid"])] = value
        return out

    def ready_pids(self) -> set[int]:
        return {pid for pid, v in self.per_worker("facesvc_models_ready").items() if v == 1}

    def channel(self) -> grpc.Channel:
        """A channel with a connection of its own: the kernel picks its worker afresh."""
        grpc_port, _ = self.ports()
        return grpc.insecure_channel(
            f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )


@pytest.fixture
def workers(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[Workers]:
    keys_generate(tmp_path / "token-keys")
    (tmp_path / "templates.key").write_text(generate_template_key("k1") + "\n")
    args = [
        "--workers", "2",
        "--server-grpc-port", "0",
        "--server-http-port", "0",
        "--server-grace-s", "60",
        "--server-plugins", PLUGIN,
        "--redis-url", redis_url,
        "--redis-key-prefix", redis_prefix,
        "--tokens-key-dir", str(tmp_path / "token-keys"),
        "--templates-key-file", str(tmp_path / "templates.key"),
        "--liveness-spl", "off",
        "--logging-format", "kv",
    ]  # fmt: skip
    # The workers share the supervisor's process group, which serve_process kills whole.
    env = {SLOW_DIR_ENV: str(tmp_path)}
    with serve_process(args, tmp_path / "serve.log", env=env) as served:
        yield Workers(served.proc, served.log_path)


def _ready(workers: Workers, count: int = 2) -> set[int]:
    """Wait until ``count`` workers have listened and loaded their models; their pids."""

    def check() -> bool:
        assert workers.proc.poll() is None, workers.log()
        return len(workers.listening()) >= count and len(workers.ready_pids()) >= count

    wait_for(check, f"{count} workers to load their models", LOAD_S)
    return workers.ready_pids()


def test_two_workers_answer_and_their_metrics_add_up(workers: Workers) -> None:
    pids = _ready(workers)
    assert len(pids) == 2 and pids == set(workers.listening())
    grpc_ports = {g for g, _, _ in workers.listening().values()}
    assert len(grpc_ports) == 1  # one shared port, not a port per worker
    # Health is per worker: each live worker reports its own.
    assert set(workers.per_worker("facesvc_serving").values()) == {1.0}

    calls = 0
    request = pb.GetAttemptsRequest(
        participant_id="p-1", training_id="t-1", training_type=pb.TRAINING_TYPE_SPL
    )
    while calls < 60:
        with workers.channel() as channel:
            stub = pb_grpc.FaceVerificationStub(channel)  # type: ignore[no-untyped-call]
            reply = stub.GetAttempts(request, timeout=30)
        assert reply.used == 0 and reply.limit == 5
        calls += 1
        served = workers.per_worker("facesvc_worker_calls", method=GET_ATTEMPTS)
        if calls >= 20 and len(served) == 2 and all(served.values()):
            break
    served = workers.per_worker("facesvc_worker_calls", method=GET_ATTEMPTS)
    assert set(served) == pids and all(served.values()), served  # both workers answered
    assert sum(served.values()) == calls
    # Summed over the workers, whichever one served each call.
    assert workers.metrics()[OK_GET_ATTEMPTS] == calls

    # A worker that dies is replaced; the calls it served stay in the totals.
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(workers.listening()) == 3, "the supervisor to restart the killed worker")
    pids_after = _ready(workers)
    assert victim not in pids_after and len(pids_after) == 2
    assert workers.metrics()[OK_GET_ATTEMPTS] == calls
    assert "worker exited; restarting it" in workers.log()

    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(timeout=90) == 0, workers.log()


def test_the_load_generator_places_its_connections_on_the_workers_in_turn(
    workers: Workers,
) -> None:
    """benchmarks.load's ``placed_channels``: left to SO_REUSEPORT, a sweep's connections
    can all land on one worker; placed, connection k serves on worker k mod 2."""
    pids = sorted(_ready(workers))
    grpc_port, http_port = workers.ports()
    metrics_url = f"http://127.0.0.1:{http_port}/metrics"
    request = pb.GetAttemptsRequest(
        participant_id="p-1", training_id="t-1", training_type=pb.TRAINING_TYPE_SPL
    )

    async def place_then_call() -> tuple[list[int], list[int]]:
        channels, reached = await placed_channels(f"127.0.0.1:{grpc_port}", metrics_url, pids, 4)
        served: list[int] = []
        try:
            for channel in channels:  # a later call rides the channel's placed connection
                before = per_worker(metrics_url, "facesvc_worker_calls", method=GET_ATTEMPTS)
                stub = pb_grpc.FaceVerificationStub(channel)  # type: ignore[no-untyped-call]
                await stub.GetAttempts(request, timeout=30)
                after = per_worker(metrics_url, "facesvc_worker_calls", method=GET_ATTEMPTS)
                served += [pid for pid, n in after.items() if n > before.get(pid, 0.0)]
        finally:
            for channel in channels:
                await channel.close()
        return reached, served

    reached, served = asyncio.run(place_then_call())
    in_turn = [pids[0], pids[1], pids[0], pids[1]]
    assert reached == in_turn
    assert served == in_turn


def _refused(workers: Workers) -> bool:
    """Whether a call on a fresh connection is refused (UNAVAILABLE: nobody listens)."""
    with workers.channel() as fresh:
        try:
            fresh.unary_unary(SLOW_METHOD)(b"probe", timeout=2)
        except grpc.RpcError as exc:
            return bool(exc.code() == grpc.StatusCode.UNAVAILABLE)
    return False


def test_sigterm_drains_every_worker_then_exits_zero(workers: Workers, tmp_path: Path) -> None:
    _ready(workers)
    channels: list[grpc.Channel] = []
    calls: list[grpc.Future] = []
    busy: set[int] = set()
    # Slow calls over fresh connections until each worker holds at least one.
    while len(busy) < 2 and len(calls) < 40:
        n = len(calls)
        channel = workers.channel()
        channels.append(channel)
        calls.append(channel.unary_unary(SLOW_METHOD).future(str(n).encode(), timeout=120))
        wait_for(partial(started, tmp_path, str(n)), f"slow call {n} to start")
        busy.add(started(tmp_path, str(n))[0])
    assert busy == set(workers.listening()), "40 fresh connections all reached one worker"

    workers.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: workers.log().count("msg=draining") == 2, "both workers to start draining")
    assert workers.proc.poll() is None  # the calls in flight hold it open
    assert not any(call.done() for call in calls)
    # A worker logs "draining" just before it closes its listener: soon no worker listens,
    # and a new connection is refused at once while the old calls are still in flight.
    wait_for(partial(_refused, workers), "new connections to be refused")
    assert workers.proc.poll() is None
    assert not any(call.done() for call in calls)

    release(tmp_path)
    assert [call.result(timeout=60) for call in calls] == [b"finished"] * len(calls)
    assert workers.proc.wait(timeout=60) == 0, workers.log()
    assert workers.log().count("msg=stopped") == 2
    assert "restarting" not in workers.log()
    for channel in channels:
        channel.close()


def test_a_worker_refusing_its_settings_stops_the_supervisor_at_once(
    tmp_path: Path, redis_url: str
) -> None:
    # A keys file that does not exist is refused by every worker at start-up: no restart
    # can fix a setting, so the supervisor exits 2 (as one `facesvc serve` does) and says why.
    args = [
        "--workers", "2",
        "--server-grpc-port", "0",
        "--server-http-port", "0",
        "--redis-url", redis_url,
        "--security-api-keys-file", str(tmp_path / "missing.toml"),
    ]  # fmt: skip
    with serve_process(args, tmp_path / "serve.log") as served:
        returncode = served.proc.wait(timeout=LOAD_S)
        log = served.log()
    assert returncode == 2, log[-3000:]
    assert "facesvc: security.api_keys_file" in log
    assert "a worker refused the settings; stopping all workers" in log
    assert "restarting" not in log


def test_threads_per_worker_default_to_the_cores_divided_among_workers() -> None:
    cores = usable_cores()
    assert load_settings(env={}).models.threads == cores
    crowded = load_settings(env={}, overrides={"server.workers": 2 * cores})
    assert crowded.models.threads == 1  # never 0
    chosen = load_settings(env={}, overrides={"server.workers": 2, "models.threads": 3})
    assert chosen.models.threads == 3
