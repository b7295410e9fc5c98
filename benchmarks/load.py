"""Load generator: drive a running facesvc over gRPC with real face images.

    python -m benchmarks.load --spawn                      # start a service, sweep, report
    python -m benchmarks.load --spawn --workers 2 --frame-size 1280x960 --name load-w2-1280
    python -m benchmarks.load --spawn --min-face-px 100    # look for faces of 100 px and up
    python -m benchmarks.load --spawn --soak-s 600 --soak-concurrency 4    # memory soak
    python -m benchmarks.load --target HOST:PORT --api-key KEY --concurrency 1,4,16

Every request is a one-frame Verify of an enrolled person (640x480 JPEG) against a fresh
training id, so the daily caps never cut a run short. For each concurrency level it runs for
a bounded time and reports throughput, p50/p95/p99 latency, errors by status code and
decisions. In the same run, on the same images, it measures the bare pipeline (decode +
detect + landmarks + align + embed + match, in-process, no server) and the
``face_recognition`` library (dlib), so the ratios it prints are side by side on one
machine at one moment. Results go to ``<out>/<name>.json`` and ``<out>/<name>.png``.

With ``--spawn`` it also samples the resident memory (RSS) of every server process (the
supervisor and each worker) every ``--rss-interval-s``; ``--soak-s`` runs one concurrency
for that long and reports each process's RSS over time and its growth. Callers take turns
over ``--channels`` connections; with ``--spawn`` connection k is placed on worker k mod
``--workers`` (``placed_channels``: left to SO_REUSEPORT, all of them landed on one worker in
one run of four), so every level spreads its callers evenly. Each level records the
machine's 1-minute load average at its end: on a shared machine the figures mean little
without it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.config import QualitySettings

FRAME_SIZE = (640, 480)


@dataclass
class Level:
    """What one concurrency level measured. Latencies in milliseconds."""

    concurrency: int
    duration_s: float
    requests: int
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)
    load_average_1m: float = 0.0
    """The machine's 1-minute load average when the level ended."""
    rss_mib: dict[str, float] = field(default_factory=dict)
    """Largest RSS of each server process during the level (with --spawn), in MiB."""


# ---------------------------------------------------------------- images


def frame_jpeg(image: Image.Image, size: tuple[int, int] = FRAME_SIZE) -> bytes:
    """The photo fitted into a 640x480 canvas (as a webcam frame would be), that frame
    scaled to ``size`` (width, height; 4:3 keeps the scene as it is: a camera of higher
    resolution, the same face larger in pixels), JPEG q90."""
    image = image.convert("RGB")
    image.thumbnail(FRAME_SIZE)
    canvas = Image.new("RGB", FRAME_SIZE, (96, 96, 96))
    canvas.paste(image, ((FRAME_SIZE[0] - image.width) // 2, (FRAME_SIZE[1] - image.height) // 2))
    if size != FRAME_SIZE:
        canvas = canvas.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def load_people(
    faces: Path | None, limit: int, size: tuple[int, int] = FRAME_SIZE
) -> list[tuple[bytes, list[bytes]]]:
    """(enrollment photo, probe frames of ``size``) per person: from identity folders (the
    first photo enrolls, the others probe) or, without a folder, the photos that ship with
    the dependencies (each enrolls and probes with itself, re-encoded). Enrollment photos
    are always 640x480."""
    people: list[tuple[bytes, list[bytes]]] = []
    if faces is not None:
        for folder in sorted(p for p in faces.iterdir() if p.is_dir()):
            photos = sorted(
                p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")
            )
            if len(photos) < 2:
                continue
            images = [Image.open(p) for p in photos]
            people.append((frame_jpeg(images[0]), [frame_jpeg(im, size) for im in images[1:]]))
            if len(people) == limit:
                break
        return people
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())  # type: ignore[no-untyped-call]
    return [(frame_jpeg(astronaut), [frame_jpeg(astronaut, size)])]


# ---------------------------------------------------------------- the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Spawned:
    """A ``facesvc serve`` started for the run."""

    proc: subprocess.Popen[bytes]
    target: str
    """host:port of its gRPC server."""
    metrics_url: str
    home: Path
    """Its keys and its log (serve.log)."""


def spawn_service(
    workers: int,
    redis_url: str,
    min_face_px: int,
    extra_env: dict[str, str] | None = None,
    code: Path | None = None,
) -> Spawned:
    """``facesvc serve`` on free ports with liveness off, keys of its own, faces looked
    for and matched from ``min_face_px``, and ``extra_env`` (FACESVC_* settings) on top;
    run from the checkout ``code`` (its package, not the installed one) when given."""
    from facesvc.store.templates import generate_template_key
    from facesvc.tokens.keys import keys_generate

    home = Path(tempfile.mkdtemp(prefix="facesvc-load-"))
    keys_generate(home / "token-keys")
    port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESVC_")}
    env.update(
        {
            "FACESVC_SERVER_GRPC_PORT": str(port),
            "FACESVC_SERVER_HTTP_PORT": str(http_port),
            "FACESVC_SERVER_WORKERS": str(workers),
            "FACESVC_REDIS_URL": redis_url,
            "FACESVC_REDIS_KEY_PREFIX": f"load{uuid.uuid4().hex[:8]}:",
            "FACESVC_TOKENS_KEY_DIR": str(home / "token-keys"),
            "FACESVC_TEMPLATES_KEY": generate_template_key("k1"),
            "FACESVC_LIVENESS_SPL": "off",
            "FACESVC_LIVENESS_WEBINAR": "off",
            "FACESVC_LIVENESS_OFFLINE": "off",
            "FACESVC_LIVENESS_KIOSK": "off",
            "FACESVC_QUALITY_MIN_FACE_PX": str(min_face_px),
            "FACESVC_QUALITY_MIN_DETECT_PX": str(min_face_px),
            "FACESVC_LOGGING_LEVEL": "WARNING",
            **(extra_env or {}),
        }
    )
    if code is not None:
        env["PYTHONPATH"] = str(code)  # with the working directory: python -m looks there first
    log = (home / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "facesvc.commands.cli", "serve"],
        env=env,
        stdout=log,
        stderr=log,
        cwd=code,
    )
    return Spawned(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}/metrics", home)


def per_worker(metrics_url: str, name: str, **labels: str) -> dict[int, float]:
    """pid -> value of the per-worker series ``name`` with ``labels`` in the aggregated
    /metrics (empty while nothing answers there); a server of one process labels no pid,
    and its series is keyed 0."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    return {
        int(sample.labels.get("pid", 0)): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    }


def wait_workers_serving(spawned: Spawned, workers: int, within_s: float = 300) -> list[int]:
    """Wait until ``workers`` processes report SERVING in the aggregated /metrics (one
    gRPC health check would reach only the worker its connection landed on); their pids,
    in order."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if spawned.proc.poll() is not None:
            raise RuntimeError(f"facesvc exited; see {spawned.home / 'serve.log'}")
        serving = per_worker(spawned.metrics_url, "facesvc_serving")
        pids = sorted(pid for pid, value in serving.items() if value == 1)
        if len(pids) >= workers:
            return pids
        time.sleep(0.5)
    raise TimeoutError(f"{workers} facesvc workers did not become SERVING within {within_s:.0f} s")


HEALTH_CHECK = "grpc.health.v1.Health/Check"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 16 << 20),
    # A local subchannel pool gives each channel its own TCP connection.
    ("grpc.use_local_subchannel_pool", 1),
]


async def placed_channels(
    target: str, metrics_url: str, pids: list[int], count: int, tries: int = 50
) -> tuple[list[grpc.aio.Channel], list[int]]:
    """``count`` channels to ``target``, channel k's connection on worker ``pids[k % len(pids)]``,
    and the pid each one reached.

    The kernel hashes every new connection to one of the SO_REUSEPORT workers at random, so
    8 connections opened blindly can all land on one worker: one sweep of four did, and
    measured 16 callers at 3.1x face_recognition where the next one measured 6.4x. A
    channel is kept only if a health check over it reached its worker (told by the
    worker's ``facesvc_worker_calls``), else it is closed and opened again, up to ``tries``
    times (then kept where it landed, and said on stderr). With callers on channels in
    turn, any number of callers is spread evenly."""
    channels: list[grpc.aio.Channel] = []
    reached: list[int] = []
    for k in range(count):
        wanted = pids[k % len(pids)]
        for attempt in range(tries):
            channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            before = await asyncio.to_thread(
                per_worker, metrics_url, "facesvc_worker_calls", method=HEALTH_CHECK
            )
            await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[no-untyped-call]
                health_pb2.HealthCheckRequest(), timeout=10
            )
            after = await asyncio.to_thread(
                per_worker, metrics_url, "facesvc_worker_calls", method=HEALTH_CHECK
            )
            landed = [pid for pid, n in after.items() if n > before.get(pid, 0.0)]
            if landed == [wanted] or attempt == tries - 1:
                if landed != [wanted]:
                    print(f"channel {k}: could not reach worker {wanted}", file=sys.stderr)
                channels.append(channel)
                reached.append(landed[0] if len(landed) == 1 else 0)
                break
            await channel.close()
    return channels, reached


def wait_serving(target: str, within_s: float = 300) -> None:
    deadline = time.monotonic() + within_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"facesvc at {target} did not become SERVING within {within_s:.0f} s")


# ---------------------------------------------------------------- memory


class RssSampler:
    """Samples the resident memory of a process and its descendants (the supervisor and its
    workers) every ``interval_s`` on a thread, from /proc (Linux)."""

    def __init__(self, root_pid: int, interval_s: float) -> None:
        self._root = root_pid
        self._interval_s = interval_s
        self._began = time.monotonic()
        self.samples: list[tuple[float, dict[str, float]]] = []
        """(seconds since start, {"worker <pid>": MiB, ...}) per sample."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> float:
        return time.monotonic() - self._began

    def peak_between(self, start: float, end: float) -> dict[str, float]:
        """Largest RSS of each process over the samples taken between ``start`` and ``end``."""
        peak: dict[str, float] = {}
        for at, rss in self.samples:
            if start <= at <= end:
                for name, mib in rss.items():
                    peak[name] = max(peak.get(name, 0.0), mib)
        return peak

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = {f"{_role(pid)} {pid}": mib for pid, mib in _tree_rss(self._root).items()}
            self.samples.append((round(self.now(), 1), rss))
            self._stop.wait(self._interval_s)


def _tree_rss(root: int) -> dict[int, float]:
    """RSS in MiB of ``root`` and every descendant that is a Python process."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    out: dict[int, float] = {}
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                out[pid] = int(line.split()[1]) / 1024
    return out


def _role(pid: int) -> str:
    """ "worker", "helper" (multiprocessing's resource tracker) or "server" (the process
    started: the supervisor when there are workers, else the only server)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    if b"spawn_main" in cmdline:
        return "worker"
    if b"resource_tracker" in cmdline:
        return "helper"
    return "server"


def soak_growth(samples: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Per process: mean RSS over the last fifth of the samples minus the mean over the
    second fifth (the first fifth is warm-up: arenas and caches fill), in MiB."""
    names = {name for _, rss in samples for name in rss}
    n = len(samples)
    early, late = samples[n // 5 : 2 * n // 5], samples[4 * n // 5 :]
    out = {}
    for name in sorted(names):
        a = [rss[name] for _, rss in early if name in rss]
        b = [rss[name] for _, rss in late if name in rss]
        if a and b:
            out[name] = round(float(np.mean(b) - np.mean(a)), 1)
    return out


# ---------------------------------------------------------------- the sweep


async def enroll_people(
    stub: pb_grpc.FaceVerificationStub,
    metadata: tuple[tuple[str, str], ...],
    people: list[tuple[bytes, list[bytes]]],
) -> list[tuple[str, bytes]]:
    """Enroll each person (``load-<index>``) from their enrolment photo; the (participant,
    probe frame) pairs of those enrolled (probes of a refused enrolment would time only
    NOT_ENROLLED)."""
    probes: list[tuple[str, bytes]] = []
    for index, (enroll_frame, frames) in enumerate(people):
        participant = f"load-{index}"
        enrolled = await stub.Enroll(
            pb.EnrollRequest(participant_id=participant, images=[enroll_frame], replace=True),
            metadata=metadata,
            timeout=60,
        )
        if enrolled.enrolled:
            probes.extend((participant, f) for f in frames)
    return probes


def verify_request(participant: str, frame: bytes) -> pb.VerifyRequest:
    """A one-frame SPL session scan of ``participant``, under a training id of its own (so
    that the daily cap never stops a load run)."""
    return pb.VerifyRequest(
        participant_id=participant,
        training_id=f"load-{uuid.uuid4().hex[:12]}",
        training_type=pb.TRAINING_TYPE_SPL,
        gate=pb.GATE_SESSION,
        session_id="s1",
        frames=[frame],
    )


async def run_level(
    stubs: list[pb_grpc.FaceVerificationStub],
    metadata: tuple[tuple[str, str], ...],
    probes: list[tuple[str, bytes]],
    concurrency: int,
    duration_s: float,
    rss: RssSampler | None = None,
) -> Level:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    decisions: Counter[str] = Counter()
    stop_at = time.monotonic() + duration_s
    rng = np.random.default_rng(concurrency)

    async def worker(stub: pb_grpc.FaceVerificationStub) -> None:
        while time.monotonic() < stop_at:
            request = verify_request(*probes[int(rng.integers(len(probes)))])
            started = time.perf_counter()
            try:
                reply = await stub.Verify(request, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            decisions[pb.Decision.Name(reply.decision).removeprefix("DECISION_")] += 1

    began, rss_began = time.monotonic(), rss.now() if rss else 0.0
    await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
    elapsed = time.monotonic() - began
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return Level(
        concurrency=concurrency,
        duration_s=round(elapsed, 2),
        requests=len(latencies),
        throughput_rps=len(latencies) / elapsed,
        p50_ms=float(q[0]),
        p95_ms=float(q[1]),
        p99_ms=float(q[2]),
        errors=dict(errors),
        decisions=dict(decisions),
        load_average_1m=os.getloadavg()[0],
        rss_mib=rss.peak_between(rss_began, rss.now()) if rss else {},
    )


async def sweep(
    target: str,
    api_key: str | None,
    people: list[tuple[bytes, list[bytes]]],
    levels: list[int],
    duration_s: float,
    warmup_s: float,
    channels: int,
    rss: RssSampler | None,
    workers: tuple[str, list[int]] | None = None,
) -> tuple[list[Level], list[int]]:
    """The levels measured, and the worker pid each channel reached: with ``workers``
    (the /metrics URL and the workers' pids of a spawned service) the channels are placed
    on the workers in turn (``placed_channels``), else opened as any client would (pids
    unknown: empty)."""
    metadata: tuple[tuple[str, str], ...] = (
        (("authorization", f"Bearer {api_key}"),) if api_key else ()
    )
    reached: list[int] = []
    if workers is not None:
        opened, reached = await placed_channels(target, *workers, channels)
    else:
        opened = [
            grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(channels)
        ]
    try:
        stubs = [pb_grpc.FaceVerificationStub(channel) for channel in opened]  # type: ignore[no-untyped-call]
        stub = stubs[0]
        probes = await enroll_people(stub, metadata, people)
        await run_level(stubs, metadata, probes, 2, warmup_s)
        return [
            await run_level(stubs, metadata, probes, c, duration_s, rss) for c in levels
        ], reached
    finally:
        for channel in opened:
            await channel.close()


# ---------------------------------------------------------------- side-by-side baselines


def _bare_worker(frames: list[bytes], duration_s: float, min_face_px: int, pack: str) -> int:
    """Scans done in ``duration_s`` by the in-process pipeline of ``pack`` on one thread,
    with the service's quality gates."""
    from facesvc.config import load_settings
    from facesvc.imaging import DecodeLimits, decode_image
    from facesvc.models.packs import load_pack

    settings = load_settings(
        env={},
        overrides={
            "models.threads": 1,
            "models.pack": pack,
            "quality.min_face_px": min_face_px,
            "quality.min_detect_px": min_face_px,
        },
    )
    loaded = load_pack(settings.models)
    pipeline = loaded.pipeline(settings.quality)
    limits = DecodeLimits()
    template = None
    done = 0
    stop_at = time.monotonic() + duration_s
    while time.monotonic() < stop_at:
        analysis = pipeline.analyze(decode_image(frames[done % len(frames)], limits))
        if analysis.chip is not None:
            descriptor = pipeline.embed([analysis.chip])
            template = descriptor if template is None else template
            loaded.match(template, descriptor)
        done += 1
    return done


def _face_recognition_worker(frames: list[bytes], duration_s: float) -> int:
    """Scans done in ``duration_s`` by the face_recognition library (HOG detector, 5-point
    landmarks, dlib's ResNet: its defaults, which have no minimum face size) on one
    process."""
    import face_recognition  # type: ignore[import-untyped]

    known = None
    done = 0
    stop_at = time.monotonic() + duration_s
    while time.monotonic() < stop_at:
        image = np.asarray(Image.open(io.BytesIO(frames[done % len(frames)])).convert("RGB"))
        encodings = face_recognition.face_encodings(image, model="small")
        if encodings:
            known = encodings[0] if known is None else known
            face_recognition.face_distance([known], encodings[0])
        done += 1
    return done


def baseline(worker: Any, frames: list[bytes], duration_s: float, processes: int) -> float:
    """Scans per second over ``processes`` processes each running ``worker``."""
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
        counts = list(pool.map(worker, [frames] * processes, [duration_s] * processes))
    return float(sum(counts)) / duration_s


# ---------------------------------------------------------------- report


def plot(levels: list[Level], bare_rps: float | None, fr_rps: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [lv.concurrency for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(x, [lv.throughput_rps for lv in levels], "o-", label="facesvc over gRPC")
    if bare_rps:
        left.axhline(bare_rps, color="g", ls="--", label="bare pipeline (no server)")
    if fr_rps:
        left.axhline(fr_rps, color="r", ls=":", label="face_recognition (dlib)")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent callers")
    left.set_ylabel("Verify per second")
    left.legend()
    for name in ("p50_ms", "p95_ms", "p99_ms"):
        right.plot(x, [getattr(lv, name) for lv in levels], "o-", label=name.removesuffix("_ms"))
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("concurrent callers")
    right.set_ylabel("latency, ms")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_rss(samples: list[tuple[float, dict[str, float]]], path: Path) -> None:
    """RSS of each server process over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in sorted({n for _, rss in samples for n in rss}):
        points = [(at, rss[name]) for at, rss in samples if name in rss]
        ax.plot([t for t, _ in points], [m for _, m in points], label=name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="host:port of a running facesvc (else --spawn)")
    parser.add_argument("--spawn", action="store_true", help="start facesvc serve for the run")
    parser.add_argument("--workers", type=int, default=1, help="with --spawn: server.workers")
    parser.add_argument(
        "--redis-url", default=os.environ.get("FACESVC_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--api-key", default=os.environ.get("FACESVC_API_KEY"))
    parser.add_argument("--faces", type=Path, help="identity folders (default: bundled photos)")
    parser.add_argument("--people", type=int, default=20, help="identities to enroll")
    parser.add_argument(
        "--pack", default="default", help="with --spawn and the bare pipeline: models.pack"
    )
    parser.add_argument("--frame-size", type=_size, default=FRAME_SIZE, help="probe WxH")
    parser.add_argument(
        "--min-face-px",
        type=int,
        default=QualitySettings().min_face_px,
        help="with --spawn, and for the bare pipeline: quality.min_face_px and min_detect_px",
    )
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--duration-s", type=float, default=20.0, help="per concurrency level")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--channels", type=int, default=8, help="gRPC connections to spread over")
    parser.add_argument("--baseline-s", type=float, default=20.0, help="0 skips the baselines")
    parser.add_argument("--baseline-processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--soak-s", type=float, default=0.0, help="run one level this long")
    parser.add_argument("--soak-concurrency", type=int, default=4)
    parser.add_argument("--rss-interval-s", type=float, default=2.0, help="with --spawn")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="load", help="output file stem")
    args = parser.parse_args(argv)
    if not args.target and not args.spawn:
        parser.error("give --target HOST:PORT or --spawn")
    soak = args.soak_s > 0
    levels_wanted = (
        [args.soak_concurrency] if soak else [int(c) for c in args.concurrency.split(",")]
    )
    duration_s = args.soak_s if soak else args.duration_s
    baseline_s = 0.0 if soak else args.baseline_s

    people = load_people(args.faces, args.people, args.frame_size)
    frames = [f for _, probe in people for f in probe]
    load_before = os.getloadavg()
    spawned = None
    target = args.target
    rss: RssSampler | None = None
    placement: tuple[str, list[int]] | None = None
    if args.spawn:
        spawned = spawn_service(
            args.workers, args.redis_url, args.min_face_px, {"FACESVC_MODELS_PACK": args.pack}
        )
        target = spawned.target
        print(f"spawned facesvc at {target} (log: {spawned.home / 'serve.log'})", file=sys.stderr)
    try:
        if spawned is not None:
            pids = wait_workers_serving(spawned, args.workers)
            placement = (spawned.metrics_url, pids)
            rss = RssSampler(spawned.proc.pid, args.rss_interval_s)
        else:
            wait_serving(target)
        with rss if rss is not None else contextlib.nullcontext():
            levels, reached = asyncio.run(
                sweep(
                    target,
                    args.api_key,
                    people,
                    levels_wanted,
                    duration_s,
                    args.warmup_s,
                    args.channels,
                    rss,
                    placement,
                )
            )
    finally:
        if spawned is not None:
            spawned.proc.send_signal(signal.SIGTERM)
            spawned.proc.wait(60)
    bare_rps = fr_rps = None
    if baseline_s > 0:
        bare = functools.partial(_bare_worker, min_face_px=args.min_face_px, pack=args.pack)
        bare_rps = baseline(bare, frames, baseline_s, args.baseline_processes)
        fr_rps = baseline(_face_recognition_worker, frames, baseline_s, args.baseline_processes)

    best = max(lv.throughput_rps for lv in levels)
    at_16 = next((lv.throughput_rps for lv in levels if lv.concurrency == 16), None)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "workers": args.workers if args.spawn else None,
        "pack": args.pack,
        "frame_size": "x".join(map(str, args.frame_size)),
        "min_face_px": args.min_face_px,
        "frames": len(frames),
        "people": len(people),
        "channels": args.channels,
        "channel_workers": reached,
        "levels": [asdict(lv) for lv in levels],
        "bare_pipeline_rps": bare_rps,
        "face_recognition_rps": fr_rps,
        "service_over_bare": best / bare_rps if bare_rps else None,
        "service_at_16_over_bare": at_16 / bare_rps if bare_rps and at_16 else None,
        "service_over_face_recognition": best / fr_rps if fr_rps else None,
        "p50_ms_at_concurrency_1": next((lv.p50_ms for lv in levels if lv.concurrency == 1), None),
        "rss_samples": rss.samples if rss else [],
        "rss_growth_mib": soak_growth(rss.samples) if rss and soak else None,
        "median_of": "one run; repeat the command for more",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    if soak and rss is not None:
        plot_rss(rss.samples, args.out / f"{args.name}.png")
    else:
        plot(levels, bare_rps, fr_rps, args.out / f"{args.name}.png")
    for lv in levels:
        print(
            f"c={lv.concurrency:3d} {lv.throughput_rps:7.1f} rps  p50 {lv.p50_ms:7.1f}  "
            f"p95 {lv.p95_ms:7.1f}  p99 {lv.p99_ms:7.1f} ms  errors {lv.errors}  {lv.decisions}"
            f"  load {lv.load_average_1m:.1f}  rss {lv.rss_mib}"
        )
    if bare_rps and fr_rps:
        print(
            f"bare pipeline {bare_rps:.1f}/s, face_recognition {fr_rps:.1f}/s, "
            f"best service {best:.1f}/s = {best / bare_rps:.0%} of bare, "
            f"{best / fr_rps:.1f}x face_recognition"
        )
    if report["rss_growth_mib"] is not None:
        print(f"RSS growth over the soak (MiB): {report['rss_growth_mib']}")
    print(f"wrote {args.out / args.name}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
