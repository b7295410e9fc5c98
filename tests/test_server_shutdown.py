"""SIGTERM on `facesvc serve`: stop accepting, let the in-flight call finish, exit 0;
and a stop whose step hangs still ends.

The call in flight is a test-only gRPC service that waits for a file, registered
through the ``server.plugins`` setting (``tests/slow_service.py``), so the
test decides when it finishes: no sleeps, no timing assertions.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest

from facesvc.commands import cli
from facesvc.config import load_settings
from facesvc.serve.app import App, Resources
from facesvc.store.templates import generate_template_key
from facesvc.tokens.keys import keys_generate
from tests.serve_process import ServeProcess, serve_process, wait_for
from tests.slow_service import PLUGIN, SLOW_DIR_ENV, SLOW_METHOD, release, started


@pytest.fixture
def serve(tmp_path: Path, redis_url: str, redis_prefix: str) -> Iterator[ServeProcess]:
    # `facesvc serve` loads the real engine and exits non-zero without its keys: give it
    # a signing key and a template key of its own, so the drain is all that is tested.
    keys = tmp_path / "keys"
    assert cli.main(["keys", "--tokens-key-dir", str(keys / "tokens"), "generate"]) == 0
    key_file = keys / "templates.key"
    assert cli.main(["templates", "--templates-key-file", str(key_file), "keygen"]) == 0
    # The real engine loads behind the slow call: it needs its own signing and template keys.
    keys_generate(tmp_path / "token-keys")
    env = {
        SLOW_DIR_ENV: str(tmp_path),
        "FACESVC_TOKENS_KEY_DIR": str(tmp_path / "token-keys"),
        "FACESVC_TEMPLATES_KEY": generate_template_key("k1"),
    }
    args = [
        "--server-grpc-port", "0",
        "--server-http-port", "0",
        "--server-grace-s", "60",
        "--server-plugins", PLUGIN,
        "--redis-url", redis_url,
        "--redis-key-prefix", redis_prefix,
        "--tokens-key-dir", str(keys / "tokens"),
        "--templates-key-file", str(key_file),
    ]  # fmt: skip
    with serve_process(args, tmp_path / "serve.log", env=env) as served:
        yield served


def refuses_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_sigterm_drains_the_in_flight_call_then_exits_zero(
    serve: ServeProcess, tmp_path: Path
) -> None:
    grpc_port, _ = serve.ports()
    assert "redis.url = " in serve.log()  # settings printed once at start-up

    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    slow = channel.unary_unary(SLOW_METHOD).future(b"", timeout=120)
    wait_for(partial(started, tmp_path), "the slow call to start")

    serve.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: '"msg": "draining"' in serve.log(), "the server to start draining")
    assert serve.proc.poll() is None  # still draining: the call holds it open
    assert not slow.done()
    # No new calls once draining: the listener is closed. "draining" is logged as the
    # drain starts, so a connection made in that instant is accepted and then cancelled;
    # wait for the port to refuse before asking.
    wait_for(partial(refuses_connections, grpc_port), "the gRPC listener to close")
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as fresh:
        with pytest.raises(grpc.RpcError) as refused:
            fresh.unary_unary(SLOW_METHOD)(b"", timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    release(tmp_path)
    assert slow.result(timeout=60) == b"finished"
    assert serve.proc.wait(timeout=60) == 0
    assert '"msg": "stopped"' in serve.log()
    assert "failed to load" not in serve.log()
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
