"""Load generator: drive a running facesvc over gRPC with real face images.

    python -m benchmarks.load --spawn                      # start a service, sweep, report
    python -m benchmarks.load --target HOST:PORT --api-key KEY --concurrency 1,4,16

Every request is a one-frame Verify of an enrolled person (640x480 JPEG) against a fresh
training id, so the daily caps never cut a run short. For each concurrency level it runs for
a bounded time and reports throughput, p50/p95/p99 latency, errors by status code and
decisions. In the same run, on the same images, it measures the bare pipeline (decode +
detect + landmarks + align + embed + match, in-process, no server) and the
``face_recognition`` library (dlib), so the ratios it prints are side by side on one
machine at one moment. Results go to ``<out>/load.json`` and ``<out>/load.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc

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


def load_people(faces: Path | None, limit: int) -> list[tuple[bytes, list[bytes]]]:
    """(enrollment photo, probe frames) per person: from identity folders (the first photo
    enrolls, the others probe) or, without a folder, the photos that ship with the
    dependencies (each enrolls and probes with itself, re-encoded)."""
    people: list[tuple[bytes, list[bytes]]] = []
    if faces is not None:
        for folder in sorted(p for p in faces.iterdir() if p.is_dir()):
            photos = sorted(
                p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")
            )
            if len(photos) < 2:
                continue
            frames = [frame_jpeg(Image.open(p)) for p in photos]
            people.append((frames[0], frames[1:]))
            if len(people) == limit:
                break
        return people
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())
    frame = frame_jpeg(astronaut)
    return [(frame, [frame])]


# ---------------------------------------------------------------- the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_service(workers: int, redis_url: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``facesvc serve`` on free ports with liveness off and keys of its own."""
    from facesvc.templates import generate_template_key
    from facesvc.tokens.keys import keys_generate

    home = Path(tempfile.mkdtemp(prefix="facesvc-load-"))
    keys_generate(home / "token-keys")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESVC_")}
    env.update(
        {
            "FACESVC_SERVER_GRPC_PORT": str(port),
            "FACESVC_SERVER_HTTP_PORT": str(free_port()),
            "FACESVC_SERVER_WORKERS": str(workers),
            "FACESVC_REDIS_URL": redis_url,
            "FACESVC_REDIS_KEY_PREFIX": f"load{uuid.uuid4().hex[:8]}:",
            "FACESVC_TOKENS_KEY_DIR": str(home / "token-keys"),
            "FACESVC_TEMPLATES_KEY": generate_template_key("k1"),
            "FACESVC_LIVENESS_SPL": "off",
            "FACESVC_LIVENESS_WEBINAR": "off",
            "FACESVC_LIVENESS_OFFLINE": "off",
            "FACESVC_LIVENESS_KIOSK": "off",
            "FACESVC_LOGGING_LEVEL": "WARNING",
        }
    )
    log = (home / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "facesvc.cli", "serve"], env=env, stdout=log, stderr=log
    )
    return proc, f"127.0.0.1:{port}", home


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


# ---------------------------------------------------------------- the sweep


async def run_level(
    stub: pb_grpc.FaceVerificationStub,
    metadata: tuple[tuple[str, str], ...],
    probes: list[tuple[str, bytes]],
    concurrency: int,
    duration_s: float,
) -> Level:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    decisions: Counter[str] = Counter()
    stop_at = time.monotonic() + duration_s
    rng = np.random.default_rng(concurrency)

    async def worker() -> None:
        while time.monotonic() < stop_at:
            participant, frame = probes[int(rng.integers(len(probes)))]
            request = pb.VerifyRequest(
                participant_id=participant,
                training_id=f"load-{uuid.uuid4().hex[:12]}",
                training_type=pb.TRAINING_TYPE_SPL,
                gate=pb.GATE_SESSION,
                session_id="s1",
                frames=[frame],
            )
            started = time.perf_counter()
            try:
                reply = await stub.Verify(request, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            decisions[pb.Decision.Name(reply.decision).removeprefix("DECISION_")] += 1

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
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
    )


async def sweep(
    target: str,
    api_key: str | None,
    people: list[tuple[bytes, list[bytes]]],
    levels: list[int],
    duration_s: float,
    warmup_s: float,
) -> list[Level]:
    metadata: tuple[tuple[str, str], ...] = (
        (("authorization", f"Bearer {api_key}"),) if api_key else ()
    )
    options = [("grpc.max_send_message_length", 16 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.FaceVerificationStub(channel)
        probes: list[tuple[str, bytes]] = []
        for index, (enroll_frame, frames) in enumerate(people):
            participant = f"load-{index}"
            await stub.Enroll(
                pb.EnrollRequest(participant_id=participant, images=[enroll_frame], replace=True),
                metadata=metadata,
                timeout=60,
            )
            probes.extend((participant, f) for f in frames)
        await run_level(stub, metadata, probes, 2, warmup_s)
        return [await run_level(stub, metadata, probes, c, duration_s) for c in levels]


# ---------------------------------------------------------------- side-by-side baselines


def _bare_worker(frames: list[bytes], duration_s: float) -> int:
    """Scans done in ``duration_s`` by the in-process pipeline on one thread."""
    from facesvc.config import load_settings
    from facesvc.imaging import DecodeLimits, decode_image
    from facesvc.models.pipeline import FacePipeline
    from facesvc.models.quality import QualityLimits
    from facesvc.wiring import load_pack

    settings = load_settings(env={}, overrides={"models.threads": 1})
    pack = load_pack(settings)
    pipeline = FacePipeline(pack.detector, pack.landmarks, pack.embedder, QualityLimits())
    limits = DecodeLimits()
    template = None
    done = 0
    stop_at = time.monotonic() + duration_s
    while time.monotonic() < stop_at:
        analysis = pipeline.analyze(decode_image(frames[done % len(frames)], limits))
        if analysis.chip is not None:
            descriptor = pipeline.embed([analysis.chip])
            template = descriptor if template is None else template
            pack.match(template, descriptor)
        done += 1
    return done


def _face_recognition_worker(frames: list[bytes], duration_s: float) -> int:
    """Scans done in ``duration_s`` by the face_recognition library (HOG detector, 5-point
    landmarks, dlib's ResNet: its defaults) on one process."""
    import face_recognition

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
    return sum(counts) / duration_s


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
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--duration-s", type=float, default=20.0, help="per concurrency level")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--baseline-s", type=float, default=20.0, help="0 skips the baselines")
    parser.add_argument("--baseline-processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not args.target and not args.spawn:
        parser.error("give --target HOST:PORT or --spawn")

    people = load_people(args.faces, args.people)
    frames = [f for _, probe in people for f in probe]
    proc = None
    target = args.target
    if args.spawn:
        proc, target, home = spawn_service(args.workers, args.redis_url)
        print(f"spawned facesvc at {target} (log: {home / 'serve.log'})", file=sys.stderr)
    try:
        wait_serving(target)
        levels = asyncio.run(
            sweep(
                target,
                args.api_key,
                people,
                [int(c) for c in args.concurrency.split(",")],
                args.duration_s,
                args.warmup_s,
            )
        )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    bare_rps = fr_rps = None
    if args.baseline_s > 0:
        bare_rps = baseline(_bare_worker, frames, args.baseline_s, args.baseline_processes)
        fr_rps = baseline(
            _face_recognition_worker, frames, args.baseline_s, args.baseline_processes
        )

    best = max(lv.throughput_rps for lv in levels)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "frames": len(frames),
        "people": len(people),
        "levels": [asdict(lv) for lv in levels],
        "bare_pipeline_rps": bare_rps,
        "face_recognition_rps": fr_rps,
        "service_over_bare": best / bare_rps if bare_rps else None,
        "service_over_face_recognition": best / fr_rps if fr_rps else None,
        "p50_ms_at_concurrency_1": next((lv.p50_ms for lv in levels if lv.concurrency == 1), None),
        "median_of": "one run; repeat the command for more",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(report, indent=2))
    plot(levels, bare_rps, fr_rps, args.out / "load.png")
    for lv in levels:
        print(
            f"c={lv.concurrency:3d} {lv.throughput_rps:7.1f} rps  p50 {lv.p50_ms:7.1f}  "
            f"p95 {lv.p95_ms:7.1f}  p99 {lv.p99_ms:7.1f} ms  errors {lv.errors}  {lv.decisions}"
        )
    if bare_rps and fr_rps:
        print(
            f"bare pipeline {bare_rps:.1f}/s, face_recognition {fr_rps:.1f}/s, "
            f"best service {best:.1f}/s = {best / bare_rps:.0%} of bare, "
            f"{best / fr_rps:.1f}x face_recognition"
        )
    print(f"wrote {args.out / 'load.json'} and {args.out / 'load.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
