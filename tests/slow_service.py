"""A gRPC method that holds each call until the test lets it go: a ``server.plugins`` plugin
for tests that need calls in flight (overload, shutdown, workers) without sleeping.

``/facesvc.test.Slow/Wait`` with the request ``b"<tag>"`` (no ``-`` in it) leaves
``started-<pid>-<tag>-<call>`` in ``$FACESVC_TEST_SLOW_DIR`` when it starts, and answers
``b"finished"`` once ``release`` exists there.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import grpc

SLOW_METHOD = "/facesvc.test.Slow/Wait"
SLOW_DIR_ENV = "FACESVC_TEST_SLOW_DIR"
PLUGIN = "tests.slow_service:register"
"""The ``server.plugins`` value that installs the method."""


def register(server: Any, settings: Any) -> None:
    """The plugin: adds ``Slow/Wait`` to ``server``."""
    directory = Path(os.environ[SLOW_DIR_ENV])

    async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        tag = request.decode()
        (directory / f"started-{os.getpid()}-{tag}-{uuid.uuid4().hex}").touch()
        while not (directory / "release").exists():
            await asyncio.sleep(0.02)
        return b"finished"

    handler = grpc.unary_unary_rpc_method_handler(wait)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("facesvc.test.Slow", {"Wait": handler}),)
    )


def started(directory: Path, tag: str = "*") -> list[int]:
    """The pid of the process serving each call tagged ``tag`` that has started."""
    return [int(p.name.split("-")[1]) for p in directory.glob(f"started-*-{tag}-*")]


def release(directory: Path) -> None:
    """Let every held call, and every later one, answer."""
    (directory / "release").touch()
