"""`facesvc serve` as a child process, run as an operator runs it: for tests that need a real
process (signals, worker processes, a clock of its own under faketime).

The child gets the test's environment without its FACESVC_* variables (the flags say what
the test means) and without any faketime of the test process itself, so that a ``wrapper``
such as ``faketime -f -1d`` shifts the child's clock from the real one, which Redis keeps.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"facesvc listening: gRPC 127\.0\.0\.1:(\d+), HTTP 127\.0\.0\.1:(\d+)")


def wait_for(predicate: Callable[[], Any], what: str, within_s: float = 60.0) -> None:
    """Poll ``predicate`` until it is true; fail the test naming ``what`` after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class ServeProcess:
    """A running ``facesvc serve`` and the log it writes (stdout and stderr together)."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ports(self, within_s: float = 60.0) -> tuple[int, int]:
        """The (gRPC, HTTP) ports of the first "listening" line, waiting for it."""
        wait_for(
            lambda: LISTENING.search(self.log()) or self.proc.poll() is not None,
            "the server to listen",
            within_s,
        )
        found = LISTENING.search(self.log())
        assert found, self.log()
        return int(found.group(1)), int(found.group(2))


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment for a child: no FACESVC_*, no faketime, plus ``extra``."""
    dropped = ("FACESVC_", "LD_PRELOAD", "FAKETIME", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(extra or {})
    return env


@contextmanager
def serve_process(
    args: Sequence[str],
    log_path: Path,
    *,
    wrapper: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[ServeProcess]:
    """``[*wrapper, python, -m, facesvc.commands.cli, serve, *args]`` running until the block ends
    (then killed if it has not exited).

    The command runs in a process group of its own, and the whole group is killed: a
    ``wrapper`` such as faketime runs the server as its child, which killing the wrapper
    alone left running (holding its ports and CPU) after the test."""
    command = [*wrapper, sys.executable, "-m", "facesvc.commands.cli", "serve", *args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=child_env(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield ServeProcess(proc, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
