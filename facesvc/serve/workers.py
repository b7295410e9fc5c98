"""``facesvc serve``: one server process, or N worker processes under a supervisor.

With ``server.workers == 1`` the calling process serves (:func:`serve_process`).

With ``server.workers = N > 1`` the calling process becomes a :class:`Supervisor` that
loads no model and serves no call. It starts N workers (``multiprocessing`` *spawn*: fresh
interpreters, so nothing of the parent's state is shared), each a complete server with its
own models, its own ONNX Runtime threads (``models.threads``, by default the cores divided
by N) and its own event loop, all listening on the same gRPC and HTTP ports with
SO_REUSEPORT: the kernel spreads incoming connections over them. The supervisor

- points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before any worker imports
  prometheus_client, so ``/metrics`` in any worker reports all of them (facesvc.metrics);
- resolves a port of 0 once, holding a bound but not listening SO_REUSEPORT socket on it
  for the whole run, so every worker binds the same free port and no other program can
  take it between worker restarts;
- forwards SIGTERM/SIGINT to every worker (each drains its calls within
  ``server.grace_s``) and exits once all have stopped: 0 if every one stopped cleanly;
- restarts a worker that exits on its own, after a back-off that doubles with each quick
  failure; a worker that keeps failing at start-up (missing keys or models) makes the
  supervisor stop the others and exit 1 instead of looping for ever, and a worker that
  refuses its settings (exit 2, :data:`CONFIG_ERROR_EXIT`) makes it stop at once with 2,
  as a single ``facesvc serve`` would: no restart can fix a setting.

A worker stops by itself when its supervisor dies, so no orphan keeps the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from facesvc.config import ConfigError, Settings
from facesvc.metrics import Metrics
from facesvc.serve.logs import configure_logging

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONFIG_ERROR_EXIT = 2
"""Exit code of a worker (and of ``facesvc``) whose settings are refused."""


def serve(settings: Settings) -> int:
    """Run ``facesvc serve`` until SIGTERM/SIGINT; the process exit code. Raises ConfigError
    before anything starts when the servers would be exposed without TLS or API keys."""
    from facesvc.serve.tls import check_exposure

    check_exposure(settings)
    if settings.server.workers == 1:
        return asyncio.run(serve_process(settings))
    return Supervisor(settings).run()


async def serve_process(settings: Settings, metrics: Metrics | None = None, tag: str = "") -> int:
    """Serve from this process until SIGTERM/SIGINT (0, after draining) or until the engine
    fails to load (1). ``tag`` ends the "listening" line (which worker this is)."""
    from facesvc.serve.app import App
    from facesvc.serve.memory import pin_malloc_thresholds
    from facesvc.serve.wiring import engine_from_resources

    # Before the models load and the first frame arrives (facesvc.serve.memory says why).
    pin_malloc_thresholds()
    app = App(settings, metrics=metrics, engine_factory=engine_from_resources)
    await app.start()
    s = settings.server
    print(
        f"facesvc listening: gRPC {s.grpc_host}:{app.grpc_port}, "
        f"HTTP {s.http_host}:{app.http_port} (/metrics, /healthz){tag}",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = multiprocessing.parent_process()
    if parent is not None:
        # A worker: its supervisor's sentinel becomes readable when the supervisor dies.
        loop.add_reader(parent.sentinel, stop.set)
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(app.failed.wait())
    await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    if app.failed.is_set():
        print(f"facesvc: the engine failed to load: {app.load_error}", file=sys.stderr)
        await app.stop(0)
        return 1
    log.info("signal received; shutting down")
    await app.stop()
    return 0


def _worker_main(settings: Settings, index: int, metrics_dir: str) -> None:
    """Entry point of a worker process (runs in a freshly spawned interpreter, which has
    inherited ``PROMETHEUS_MULTIPROC_DIR`` before importing prometheus_client)."""
    configure_logging(settings.logging)
    tag = f" [worker {index} of {settings.server.workers}, pid {os.getpid()}]"
    metrics = Metrics(multiprocess_dir=Path(metrics_dir))
    try:
        code = asyncio.run(serve_process(settings, metrics, tag))
    except ConfigError as exc:
        print(f"facesvc: {exc}", file=sys.stderr, flush=True)
        code = CONFIG_ERROR_EXIT
    sys.exit(code)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When the supervisor restarts a worker that exited on its own. Seconds."""

    first_backoff_s: float = 0.5
    """Wait before the first restart; it doubles with each quick failure in a row."""
    max_backoff_s: float = 30.0
    healthy_after_s: float = 60.0
    """A worker that ran this long before exiting failed on its own, not at start-up: its
    back-off starts over."""
    max_quick_failures: int = 5
    """This many quick failures in a row of one worker: give up, stop all, exit 1."""
    kill_after_grace_s: float = 15.0
    """On shutdown, a worker still running ``server.grace_s`` plus this long is killed."""


@dataclass(slots=True)
class _Slot:
    """One worker position (0..N-1) and the process currently filling it."""

    index: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Runs ``settings.server.workers`` worker processes until told to stop (module doc)."""

    def __init__(self, settings: Settings, policy: RestartPolicy = RestartPolicy()) -> None:
        self._settings = settings
        self._policy = policy
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(settings.server.workers)]
        self._stopping = False
        self._exit_code = 0

    def run(self) -> int:
        """Start the workers, supervise them; 0 after a clean stop, 2 when a worker refused
        the settings, else 1."""
        metrics_dir, owned = _metrics_dir()
        reserved: list[socket.socket] = []
        wake_r, wake_w = socket.socketpair()
        try:
            settings = self._bind_ports(reserved)
            wake_w.setblocking(False)
            signal.set_wakeup_fd(wake_w.fileno())
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            log.info(
                "supervisor starting workers",
                extra={
                    "workers": settings.server.workers,
                    "threads_per_worker": settings.models.threads,
                    "grpc_port": settings.server.grpc_port,
                    "http_port": settings.server.http_port,
                },
            )
            for slot in self._slots:
                self._start(slot, settings, metrics_dir)
            self._supervise(settings, metrics_dir, wake_r)
        finally:
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()
            for sock in reserved:
                sock.close()
            if owned:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        return self._exit_code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # The wake-up fd interrupts the wait; the loop does the forwarding.
        self._stopping = True

    def _bind_ports(self, reserved: list[socket.socket]) -> Settings:
        """``settings`` with a concrete port in place of each 0, reserved in ``reserved``."""
        s = self._settings.server
        grpc_port = _reserve(s.grpc_host, s.grpc_port, reserved)
        http_port = _reserve(s.http_host, s.http_port, reserved)
        return replace(self._settings, server=replace(s, grpc_port=grpc_port, http_port=http_port))

    def _start(self, slot: _Slot, settings: Settings, metrics_dir: Path) -> None:
        process = self._context.Process(
            target=_worker_main,
            args=(settings, slot.index, str(metrics_dir)),
            name=f"facesvc-worker-{slot.index}",
        )
        process.start()
        slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None
        log.info("worker started", extra={"worker": slot.index, "pid": process.pid})

    def _supervise(self, settings: Settings, metrics_dir: Path, wake: socket.socket) -> None:
        forwarded = False
        kill_at = float("inf")
        while True:
            if self._stopping and not forwarded:
                forwarded = True
                kill_at = (
                    time.monotonic() + settings.server.grace_s + self._policy.kill_after_grace_s
                )
                self._signal_all(signal.SIGTERM)
            running = {s.process.sentinel: s for s in self._slots if s.process is not None}
            if self._stopping and not running:
                return
            if self._stopping and time.monotonic() >= kill_at:
                self._signal_all(signal.SIGKILL)
                kill_at = float("inf")
            # Sleep until a worker exits, a signal arrives, a restart or the kill is due.
            due = min([kill_at, *(s.restart_at for s in self._slots if s.restart_at is not None)])
            timeout = None if due == float("inf") else max(0.0, due - time.monotonic())
            ready = multiprocessing.connection.wait([*running, wake], timeout=timeout)
            for item in ready:
                if item is wake:
                    with contextlib.suppress(BlockingIOError):
                        wake.recv(512)
                else:
                    assert isinstance(item, int)
                    self._exited(running[item], metrics_dir)
            if not self._stopping:
                for slot in self._slots:
                    if slot.restart_at is not None and time.monotonic() >= slot.restart_at:
                        self._start(slot, settings, metrics_dir)

    def _exited(self, slot: _Slot, metrics_dir: Path) -> None:
        """Reap ``slot``'s process; schedule a restart unless stopping or giving up."""
        process = slot.process
        assert process is not None and process.pid is not None
        process.join()
        code = process.exitcode
        slot.process = None
        # Its live gauges go; its counters and histograms stay in the totals.
        mark_process_dead(process.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
        if self._stopping:
            if code != 0:
                self._exit_code = self._exit_code or 1
            log.info(
                "worker stopped", extra={"worker": slot.index, "pid": process.pid, "code": code}
            )
            return
        if code == CONFIG_ERROR_EXIT:
            log.critical("a worker refused the settings; stopping all workers")
            self._exit_code, self._stopping = CONFIG_ERROR_EXIT, True
            return
        lived_s = time.monotonic() - slot.started_at
        p = self._policy
        slot.quick_failures = 0 if lived_s >= p.healthy_after_s else slot.quick_failures + 1
        if slot.quick_failures >= p.max_quick_failures:
            log.critical(
                "worker keeps failing at start-up; stopping all workers",
                extra={"worker": slot.index, "code": code, "failures": slot.quick_failures},
            )
            self._exit_code, self._stopping = 1, True
            return
        backoff = min(p.max_backoff_s, p.first_backoff_s * 2 ** max(0, slot.quick_failures - 1))
        slot.restart_at = time.monotonic() + backoff
        log.error(
            "worker exited; restarting it",
            extra={"worker": slot.index, "pid": process.pid, "code": code, "in_s": backoff},
        )

    def _signal_all(self, sig: signal.Signals) -> None:
        for slot in self._slots:
            slot.restart_at = None
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, sig)


def _metrics_dir() -> tuple[Path, bool]:
    """The workers' ``PROMETHEUS_MULTIPROC_DIR``, emptied, and whether it is ours to remove:
    the operator's (already in the environment) or a fresh temporary one."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        # Files of an earlier run would add its counts to this one's.
        for stale in path.glob("*.db"):
            stale.unlink()
        return path, False
    path = Path(tempfile.mkdtemp(prefix="facesvc-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)  # inherited by every worker spawned from now on
    return path, True


def _reserve(host: str, port: int, reserved: list[socket.socket]) -> int:
    """``port``, or for 0 a free port held by a bound (not listening) SO_REUSEPORT socket
    appended to ``reserved``: the workers' listeners join it; it takes no connections."""
    if port != 0:
        return port
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    reserved.append(sock)
    return int(sock.getsockname()[1])
