"""What one hostile frame costs the real server: CPU per Verify and memory afterwards.

    python -m benchmarks.hostile_frames                       # spawn facesvc serve, measure
    python -m benchmarks.hostile_frames --rss-kind varied     # memory after 100 frame sizes
    python -m benchmarks.hostile_frames --kinds png_24mp_flat --repeats 1 --rss-frames 0

It starts ``facesvc serve`` (one worker, SPL liveness off, keys of its own, the settings'
defaults otherwise; ``--env NAME=VALUE`` changes a setting), enrolls one person and sends
one-frame Verify calls one at a time, reading the server's CPU time (user + system, all its
threads, from /proc) around each batch of ``--repeats`` calls of one kind:

- ``legit_640x480``: the enrolled person in a 640x480 JPEG webcam frame (the Scan Wajah
  page's frame size), the cost every other figure is divided by;
- hostile frames within the byte limit (server.max_image_bytes): flat PNGs and WebPs of
  24 MP (a few kilobytes: decompression bombs by ratio) and at the decoding budget
  (2048x2048), baseline and progressive JPEGs of 25 MP, the enrolled face enlarged to 25 MP
  (4:2:0 and 4:4:4), a noise PNG as large as the byte limit allows.

For each kind it prints the answer (decision or status code), the mean CPU milliseconds per
call and the ratio to the legit frame's, measured in the same run (the kernel counts CPU in
10 ms ticks: a mean over a batch resolves what one call cannot). Memory comes first, while
the server has seen webcam frames only: its RSS then, right after ``--rss-frames`` calls of
``--rss-kind`` (a kind, or ``varied``: face JPEGs of as many sizes), and ``--settle-s``
seconds later; settled/before is the figure issue 18 sets at 1.10. The load average is
printed with the figures: on a shared machine compare ratios from one run, not times
across runs.

The report also goes to ``<out>/<name>.json``. Run it against a checkout by putting that
checkout first on PYTHONPATH (the server is ``python -m facesvc.commands.cli serve`` of this
interpreter).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from benchmarks.load import _tree_rss, frame_jpeg, free_port, wait_serving
from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc

_MIB = 1 << 20
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- frames


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())  # type: ignore[no-untyped-call]


def _flat(side: int) -> Image.Image:
    return Image.new("RGB", (side, side), (120, 130, 140))


def _noise_png_within(limit: int) -> bytes:
    """The largest square noise PNG under ``limit`` bytes (incompressible: the most pixels
    per byte an honest image can carry is what a flat one carries; this is the opposite
    end, the most decode work per pixel)."""
    rng = np.random.default_rng(0)
    side = int((limit / 3) ** 0.5)
    while True:
        data = _encode(
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)),
            "PNG",
            compress_level=1,
        )
        if len(data) <= limit:
            return data
        side = int(side * 0.97)


def _face_jpeg(width: int, height: int, **options: Any) -> bytes:
    """The enrolled face stretched over a ``width`` x ``height`` JPEG."""
    image = _astronaut().resize((width, height), Image.Resampling.BILINEAR)
    return _encode(image, "JPEG", quality=options.pop("quality", 60), **options)


def hostile_frames(max_bytes: int) -> dict[str, Callable[[], bytes]]:
    """Frame makers by kind (made lazily: some take seconds to encode)."""
    rng = np.random.default_rng(1)
    return {
        "png_24mp_flat": lambda: _encode(_flat(4900), "PNG"),
        "png_2048_flat": lambda: _encode(_flat(2048), "PNG"),
        "png_2048_noise": lambda: _encode(
            Image.fromarray(rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8)), "PNG"
        ),
        "png_noise_max_bytes": lambda: _noise_png_within(max_bytes),
        "webp_24mp_flat": lambda: _encode(_flat(4900), "WEBP", lossless=True),
        "webp_2048_flat": lambda: _encode(_flat(2048), "WEBP", lossless=True),
        "jpeg_25mp_flat": lambda: _encode(_flat(5000), "JPEG", quality=50),
        "jpeg_25mp_progressive": lambda: _encode(_flat(5000), "JPEG", quality=50, progressive=True),
        "jpeg_2048_progressive_face": lambda: _face_jpeg(2048, 2048, progressive=True),
        "jpeg_25mp_face": lambda: _face_jpeg(5000, 5000),
        "jpeg_25mp_face_444": lambda: _face_jpeg(5000, 5000, quality=40, subsampling=0),
        "jpeg_2560x1920_face": lambda: frame_jpeg(_astronaut(), (2560, 1920)),
    }


def varied_frames(count: int) -> list[bytes]:
    """``count`` face JPEGs of as many sizes (1000-2600 px wide, 3:4 to 16:9): every size is
    new to the detector's caches and to ONNX Runtime's memory arena."""
    rng = np.random.default_rng(2)
    frames = []
    for _ in range(count):
        width = int(rng.integers(1000, 2600))
        height = int(width * rng.uniform(0.5625, 1.3333))
        frames.append(_face_jpeg(width, height, quality=80))
    return frames


# ---------------------------------------------------------------- the server


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    target: str
    home: Path

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far (every thread)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def rss_mib(self) -> float:
        return _tree_rss(self.proc.pid).get(self.proc.pid, float("nan"))


def spawn(redis_url: str, extra_env: dict[str, str]) -> Server:
    from facesvc.store.templates import generate_template_key
    from facesvc.tokens.keys import keys_generate

    home = Path(tempfile.mkdtemp(prefix="facesvc-hostile-"))
    keys_generate(home / "token-keys")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESVC_")}
    env.update(
        {
            "FACESVC_SERVER_GRPC_PORT": str(port),
            "FACESVC_SERVER_HTTP_PORT": str(free_port()),
            "FACESVC_REDIS_URL": redis_url,
            "FACESVC_REDIS_KEY_PREFIX": f"hostile{uuid.uuid4().hex[:8]}:",
            "FACESVC_TOKENS_KEY_DIR": str(home / "token-keys"),
            "FACESVC_TEMPLATES_KEY": generate_template_key("k1"),
            "FACESVC_LIVENESS_SPL": "off",
            "FACESVC_LOGGING_LEVEL": "WARNING",
            **extra_env,
        }
    )
    log = (home / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "facesvc.commands.cli", "serve"], env=env, stdout=log, stderr=log
    )
    return Server(proc, f"127.0.0.1:{port}", home)


def verify(stub: pb_grpc.FaceVerificationStub, frame: bytes) -> str:
    """One one-frame Verify of the enrolled person; its decision or status code."""
    request = pb.VerifyRequest(
        participant_id="hostile-1",
        # A fresh training each call: the daily cap never cuts the run short.
        training_id=f"t-{uuid.uuid4().hex[:12]}",
        training_type=pb.TRAINING_TYPE_SPL,
        gate=pb.GATE_SESSION,
        session_id="s1",
        frames=[frame],
    )
    try:
        reply = stub.Verify(request, timeout=600)
    except grpc.RpcError as exc:
        return str(exc.code().name)  # type: ignore[attr-defined]
    return str(pb.Decision.Name(reply.decision)).removeprefix("DECISION_")


def measure(
    server: Server, stub: pb_grpc.FaceVerificationStub, frame: bytes, repeats: int
) -> tuple[str, float]:
    """The answers and the server's mean CPU milliseconds per call over ``repeats`` calls
    made one after another (the kernel counts CPU time in 10 ms ticks: a mean over a batch
    resolves what a single call cannot)."""
    before = server.cpu_s()
    answers = [verify(stub, frame) for _ in range(repeats)]
    return "/".join(sorted(set(answers))), (server.cpu_s() - before) * 1000 / repeats


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("FACESVC_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--repeats", type=int, default=10, help="calls per kind (mean)")
    parser.add_argument("--legit-repeats", type=int, default=30)
    parser.add_argument("--kinds", default="", help="comma-separated kinds (default: all)")
    parser.add_argument("--rss-frames", type=int, default=100, help="0 skips the RSS phase")
    parser.add_argument(
        "--rss-kind",
        default="jpeg_25mp_face",
        help="a kind, or 'varied' (face JPEGs of --rss-frames different sizes)",
    )
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for the server (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="hostile-frames")
    args = parser.parse_args(argv)

    max_bytes = 4 * _MIB  # server.max_image_bytes' default
    makers = hostile_frames(max_bytes)
    kinds = [k for k in args.kinds.split(",") if k] or list(makers)
    frames = {kind: makers[kind]() for kind in kinds}
    legit = frame_jpeg(_astronaut())
    extra_env = dict(item.split("=", 1) for item in args.env)
    load_before = os.getloadavg()
    server = spawn(args.redis_url, extra_env)
    report: dict[str, Any] = {"server_env": extra_env, "load_average_before": load_before}
    try:
        wait_serving(server.target)
        options = [("grpc.max_send_message_length", 64 * _MIB)]
        with grpc.insecure_channel(server.target, options=options) as channel:
            stub = pb_grpc.FaceVerificationStub(channel)  # type: ignore[no-untyped-call]
            enrolled = stub.Enroll(
                pb.EnrollRequest(participant_id="hostile-1", images=[legit], replace=True),
                timeout=120,
            )
            if not enrolled.enrolled:
                raise RuntimeError("the enrollment photo was refused")
            measure(server, stub, legit, 5)  # warm-up: the first calls fill caches
            if args.rss_frames > 0:
                # First, while the server has seen webcam frames only.
                report["rss"] = rss_phase(server, stub, args, makers, frames)
            answer, legit_ms = measure(server, stub, legit, args.legit_repeats)
            rows = [("legit_640x480", len(legit), answer, legit_ms)]
            for kind in kinds:
                answer, cost_ms = measure(server, stub, frames[kind], args.repeats)
                rows.append((kind, len(frames[kind]), answer, cost_ms))
        report["load_average_after"] = load_after = os.getloadavg()
        report["cpu"] = [
            {
                "kind": kind,
                "bytes": size,
                "answer": answer,
                "cpu_ms_per_call": round(ms, 1),
                "ratio_to_legit": round(ms / legit_ms, 2),
            }
            for kind, size, answer, ms in rows
        ]
        print(f"load average (1, 5, 15 min) before: {load_before}, after: {load_after}")
        print(f"{'kind':<27} {'bytes':>9}  {'answer':<18} {'cpu ms/call':>11} {'x legit':>8}")
        for kind, size, answer, ms in rows:
            print(f"{kind:<27} {size:>9}  {answer:<18} {ms:>11.1f} {ms / legit_ms:>8.2f}")
        if "rss" in report:
            r = report["rss"]
            print(
                f"RSS with {r['frames']} x {r['kind']} ({'/'.join(r['answers'])}): before "
                f"{r['before_mib']:.0f} MiB, after the first tenth "
                f"{r['after_first_tenth_mib']:.0f} MiB, right after {r['after_mib']:.0f} MiB, "
                f"after {args.settle_s:g} s {r['settled_mib']:.0f} MiB "
                f"(x{r['ratio_settled_to_before']})"
            )
    finally:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def rss_phase(
    server: Server,
    stub: pb_grpc.FaceVerificationStub,
    args: argparse.Namespace,
    makers: dict[str, Callable[[], bytes]],
    frames: dict[str, bytes],
) -> dict[str, Any]:
    """The server's RSS before and after ``args.rss_frames`` Verify calls of one kind."""
    kind = args.rss_kind
    if kind == "varied":
        sequence = varied_frames(args.rss_frames)
    else:
        sequence = [frames.get(kind) or makers[kind]()] * args.rss_frames
    before = server.rss_mib()
    tenth = max(1, len(sequence) // 10)
    answers = [verify(stub, frame) for frame in sequence[:tenth]]
    after_tenth = server.rss_mib()  # a step that stays flat is a working set, not a leak
    answers += [verify(stub, frame) for frame in sequence[tenth:]]
    after = server.rss_mib()
    time.sleep(args.settle_s)
    settled = server.rss_mib()
    return {
        "kind": kind,
        "frames": args.rss_frames,
        "answers": sorted(set(answers)),
        "before_mib": round(before, 1),
        "after_first_tenth_mib": round(after_tenth, 1),
        "after_mib": round(after, 1),
        "settled_mib": round(settled, 1),
        "ratio_settled_to_before": round(settled / before, 3),
    }


if __name__ == "__main__":
    sys.exit(main())
