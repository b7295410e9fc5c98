"""SIGTERM on `facesvc serve`: stop accepting, let the in-flight call finish, exit 0;
and a stop whose step hangs still ends.

The call in flight is a test-only gRPC service that waits for a file, registered
through the ``server.plugins`` setting (``register_slow_service`` below), so the
test decides when it finishes: no sleeps, no timing assertions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from facesvc.commands import cli
from facesvc.config import Settings, load_settings
from facesvc.serve.app import App, Resources
from facesvc.store.templates import generate_template_key
from facesvc.tokens.keys import keys_generate

SLOW_METHOD = "/facesvc.test.Slow/Wait"
SLOW_DIR_ENV = "FACESVC_TEST_SLOW_DIR"
REPO = Path(__file__).resolve().parents[1]


def register_slow_service(server: Any, settings: Settings) -> None:
    """Plugin: ``Slow/Wait`` writes ``started`` and answers once ``release`` exists."""
    directory = Path(os.environ[SLOW_DIR_ENV])

    async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        import asyncio

        (directory / "started").touch()
        while not (directory / "release").exists():
            await asyncio.sleep(0.02)
        return b"finished"

    handler = grpc.unary_unary_rpc_method_handler(wait)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("facesvc.test.Slow", {"Wait": handler}),)
    )


def _wait_for(predicate: Any, what: str, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def serve(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[subprocess.Popen[bytes]]:
    # `facesvc serve` loads the real engine and exits non-zero without its keys: give it
    # a signing key and a template key of its own, so the drain is all that is tested.
    keys = tmp_path / "keys"
    assert cli.main(["keys", "--tokens-key-dir", str(keys / "tokens"), "generate"]) == 0
    key_file = keys / "templates.key"
    assert cli.main(["templates", "--templates-key-file", str(key_file), "keygen"]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESVC_")}
    env[SLOW_DIR_ENV] = str(tmp_path)
    # The real engine loads behind the slow call: it needs its own signing and template keys.
    keys_generate(tmp_path / "token-keys")
    env["FACESVC_TOKENS_KEY_DIR"] = str(tmp_path / "token-keys")
    env["FACESVC_TEMPLATES_KEY"] = generate_template_key("k1")
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "facesvc.commands.cli", "serve",
            "--server-grpc-port", "0",
            "--server-http-port", "0",
            "--server-grace-s", "60",
            "--server-plugins", "tests.test_server_shutdown:register_slow_service",
            "--redis-url", redis_url,
            "--redis-key-prefix", redis_prefix,
            "--tokens-key-dir", str(keys / "tokens"),
            "--templates-key-file", str(key_file),
        ],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _log(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text(errors="replace")


def test_sigterm_drains_the_in_flight_call_then_exits_zero(
    serve: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    listening = re.compile(r"facesvc listening: gRPC 127\.0\.0\.1:(\d+)")
    _wait_for(
        lambda: listening.search(_log(tmp_path)) or serve.poll() is not None, "the server to listen"
    )
    match = listening.search(_log(tmp_path))
    assert match, _log(tmp_path)
    assert "redis.url = " in _log(tmp_path)  # settings printed once at start-up

    channel = grpc.insecure_channel(f"127.0.0.1:{match.group(1)}")
    slow = channel.unary_unary(SLOW_METHOD).future(b"", timeout=120)
    _wait_for((tmp_path / "started").exists, "the slow call to start")

    serve.send_signal(signal.SIGTERM)
    _wait_for(lambda: '"msg": "draining"' in _log(tmp_path), "the server to start draining")
    assert serve.poll() is None  # still draining: the call holds it open
    assert not slow.done()
    # No new calls once draining: the listener is closed.
    with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as fresh:
        with pytest.raises(grpc.RpcError) as refused:
            fresh.unary_unary(SLOW_METHOD)(b"", timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    (tmp_path / "release").touch()
    assert slow.result(timeout=60) == b"finished"
    assert serve.wait(timeout=60) == 0
    assert '"msg": "stopped"' in _log(tmp_path)
    assert "failed to load" not in _log(tmp_path)
    channel.close()


async def test_a_shutdown_step_that_hangs_is_logged_and_the_stop_still_ends(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    class StuckModels:
        """An engine whose model workers never finish closing."""

        async def close(self) -> None:
            await asyncio.Event().wait()

    async def stuck_engine(resources: Resources) -> StuckModels:
        return StuckModels()

    settings = load_settings(
        env={},
        overrides={
            "server.grpc_port": 0,
            "server.http_port": 0,
            "redis.url": redis_url,
            "redis.key_prefix": redis_prefix,
        },
    )
    app = App(settings, engine_factory=stuck_engine)
    await app.start()
    while not app.health.state.models_ready:
        await asyncio.sleep(0.01)
    with caplog.at_level(logging.INFO, logger="facesvc.serve.app"):
        await asyncio.wait_for(app.stop(0), timeout=30)
    messages = [r.getMessage() for r in caplog.records]
    assert any("the engine's model workers did not finish" in m for m in messages)
    assert messages[-1] == "stopped"  # the steps after the stuck one ran
