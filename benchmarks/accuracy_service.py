"""Accuracy through the service: enroll and verify held-out photos over gRPC, count decisions.

    facesvc calibrate ../shared/data/faces --hold-out 0 --out /tmp/cal-h0.json
    python -m benchmarks.accuracy_service --faces ../shared/data/faces \\
        --calibration /tmp/cal-h0.json --name accuracy-yunet-sface

``facesvc eval`` measures descriptors offline; this measures what a caller gets. It starts
``facesvc serve`` (liveness off) with ``models.calibration`` set to a record made with
``facesvc calibrate --hold-out``, and uses only the identities that record was not
calibrated on. Every photo is sent as it is stored (JPEG or PNG bytes), except a
progressive JPEG too large for the service to decode as progressive (one, 5.3 MP, in
../shared/data/faces), which is sent as the baseline JPEG (quality 95) its caller would send
once the service refused it for its encoding (``as_sent``).

- ``1 photo, 1 frame``: each photo enrolls a participant of its own; every other photo of
  the held-out identities is one Verify against it (genuine when the same person).
- ``2 photos, 3 frames`` (the default rules: the mean of the enrolment descriptors, the
  mean of the frame descriptors): photos s and s+1 (cyclically) enroll; a scan is one of
  the identity's other photos, or any photo of another held-out identity, sent as three
  frames: the photo and two jittered copies (a small random rotation, scale and shift,
  an exposure gain and sensor noise, as in facesvc.accuracy.evaluation.FrameSimulation; real
  frames of one scan differ less than two photos do).

A scan the service does not match or refuse for the face (NO_FACE, LOW_QUALITY...) is
counted apart, as a failure to acquire, not as a false non-match. Per source: FMR over the
impostor scans whose both people come from the source, and its ratio to the overall FMR.
Results: ``<out>/<name>.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image, ImageOps

from benchmarks.load import spawn_service, wait_workers_serving
from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.accuracy.evaluation import scan_identity_folders, source_of
from facesvc.imaging import DecodeLimits
from facesvc.models.calibration import load_calibration

DECISION = {v: k for k, v in pb.Decision.items()}


def as_sent(data: bytes) -> bytes:
    """``data`` as a client sends it: as stored, but a progressive JPEG above what the service
    decodes as progressive (half its pixel budget, facesvc.imaging) re-encoded as a baseline
    JPEG of quality 95, as the refusal's message asks."""
    budget = DecodeLimits().max_decoded_pixels // 2
    with Image.open(io.BytesIO(data)) as im:
        progressive = im.format == "JPEG" and im.info.get("progressive")
        if not progressive or im.width * im.height <= budget:
            return data
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=95, exif=im.info.get("exif", b""))
    return buffer.getvalue()


def jittered(data: bytes, rng: np.random.Generator) -> bytes:
    """The photo moved by a small random similarity about its centre, with an exposure
    gain and sensor noise, as JPEG q90."""
    with Image.open(io.BytesIO(data)) as im:
        image = ImageOps.exif_transpose(im).convert("RGB")
    w, h = image.size
    angle = float(np.degrees(rng.normal(0.0, 0.05)))
    scale = 1.0 + float(rng.normal(0.0, 0.03))
    shift = rng.normal(0.0, 0.03 * min(w, h) / 4, 2)
    moved = image.rotate(angle, resample=Image.Resampling.BILINEAR, translate=tuple(shift))
    if scale != 1.0:
        big = moved.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        left, top = (big.width - w) // 2, (big.height - h) // 2
        moved = (
            big.crop((left, top, left + w, top + h))
            if scale > 1
            else ImageOps.pad(big, (w, h), color=(96, 96, 96))
        )
    pixels = np.asarray(moved, dtype=np.float32) * rng.uniform(0.7, 1.2)
    pixels += rng.normal(0.0, 4.0, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy_service")
    parser.add_argument("--faces", type=Path, required=True, help="identity folders")
    parser.add_argument("--calibration", type=Path, required=True, help="a --hold-out record")
    parser.add_argument("--pack", default="default", help="models.pack of the served pack")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--protocols",
        default="single,default",
        help="single (1 photo, 1 frame) and/or default (2 photos, 3 frames)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="accuracy-service")
    args = parser.parse_args(argv)

    calibration = load_calibration(args.calibration)
    used = set(calibration.data.identity_names)
    if not used:
        parser.error(f"{args.calibration} names no identities: make it with --hold-out")
    photos: dict[str, list[bytes]] = {}
    for item in scan_identity_folders(args.faces):
        if item.identity not in used:
            photos.setdefault(item.identity, []).append(as_sent(item.path.read_bytes()))
    rng = np.random.default_rng(args.seed)
    spawned = spawn_service(
        1,
        args.redis_url,
        80,
        extra_env={
            "FACESVC_MODELS_PACK": args.pack,
            "FACESVC_MODELS_CALIBRATION": str(args.calibration.resolve()),
        },
    )
    print(f"spawned facesvc at {spawned.target} ({spawned.home / 'serve.log'})", file=sys.stderr)
    started = time.monotonic()
    try:
        wait_workers_serving(spawned, 1)
        channel = grpc.insecure_channel(spawned.target)
        stub = pb_grpc.FaceVerificationStub(channel)
        wanted = set(args.protocols.split(","))
        results = {}
        if "single" in wanted:
            results["1 photo, 1 frame"] = run_protocol(stub, photos, 1, 1, rng, args.concurrency)
        if "default" in wanted:
            results["2 photos, 3 frames (the default rules)"] = run_protocol(
                stub, photos, 2, 3, rng, args.concurrency
            )
        channel.close()
    finally:
        spawned.proc.send_signal(signal.SIGTERM)
        spawned.proc.wait(60)
    report = {
        "pack": args.pack,
        "calibration": str(args.calibration),
        "threshold": calibration.threshold,
        "held_out_identities": sorted(photos),
        "protocols": results,
        "load_average_after": os.getloadavg(),
        "seconds": time.monotonic() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    for label, r in results.items():
        print(
            f"{label}: FNMR {r['fnmr']:.2%} ({r['false_non_matches']}/{r['genuine']}), "
            f"FMR {r['fmr']:.3%} ({r['false_matches']}/{r['impostor']}), "
            f"failures to acquire {r['failures_to_acquire']}, worst source "
            f"{r['worst_source']} {r['worst_source_ratio']:.1f}x overall"
        )
    print(f"wrote {args.out / args.name}.json")
    return 0


def run_protocol(
    stub: pb_grpc.FaceVerificationStub,
    photos: dict[str, list[bytes]],
    enroll: int,
    frames: int,
    rng: np.random.Generator,
    concurrency: int,
) -> dict[str, Any]:
    """Enroll every window of ``enroll`` photos, then verify every eligible scan against it."""
    scans: list[tuple[str, str, list[bytes]]] = []
    enrolled = 0
    for identity, own in photos.items():
        if len(own) <= enroll:
            continue
        for s in range(len(own)):
            pid = f"acc-{enroll}-{identity.replace('__', '-')}-{s}"[:128]
            window = [own[(s + k) % len(own)] for k in range(enroll)]
            reply = stub.Enroll(
                pb.EnrollRequest(participant_id=pid, images=window, replace=True), timeout=60
            )
            if not reply.enrolled:
                continue
            enrolled += 1
            held = {(s + k) % len(own) for k in range(enroll)}
            for other, theirs in photos.items():
                for p, photo in enumerate(theirs):
                    if other == identity and p in held:
                        continue
                    extra = [jittered(photo, rng) for _ in range(frames - 1)]
                    scans.append((pid, other, [photo, *extra]))
    claimed_of = {}
    for identity, own in photos.items():
        for s in range(len(own)):
            claimed_of[f"acc-{enroll}-{identity.replace('__', '-')}-{s}"[:128]] = identity

    def verify(n: int) -> tuple[str, str, str]:
        pid, probe, data = scans[n]
        reply = stub.Verify(
            pb.VerifyRequest(
                participant_id=pid,
                training_id=f"acc-{enroll}-{n}",
                training_type=pb.TRAINING_TYPE_SPL,
                gate=pb.GATE_SESSION,
                session_id="s1",
                frames=data,
            ),
            timeout=120,
        )
        return claimed_of[pid], probe, DECISION[reply.decision]

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(verify, range(len(scans))))
    counts: Counter[str] = Counter()
    per_source: dict[str, Counter[str]] = {}
    for claimed, probe, decision in outcomes:
        kind = "genuine" if claimed == probe else "impostor"
        if decision not in ("DECISION_VERIFIED", "DECISION_NOT_MATCHED"):
            counts["failures_to_acquire"] += 1
            continue
        accepted = decision == "DECISION_VERIFIED"
        counts[kind] += 1
        counts["false_non_matches"] += kind == "genuine" and not accepted
        counts["false_matches"] += kind == "impostor" and accepted
        if kind == "impostor" and source_of(claimed) == source_of(probe):
            own = per_source.setdefault(source_of(claimed), Counter())
            own["impostor"] += 1
            own["false_matches"] += accepted
    fmr = counts["false_matches"] / counts["impostor"] if counts["impostor"] else float("nan")
    ratios = {
        s: (c["false_matches"] / c["impostor"]) / fmr if fmr > 0 else float(c["false_matches"] > 0)
        for s, c in per_source.items()
        if c["impostor"]
    }
    worst = max(ratios, key=lambda s: ratios[s]) if ratios else ""
    return {
        "enrolled": enrolled,
        "genuine": counts["genuine"],
        "impostor": counts["impostor"],
        "false_non_matches": counts["false_non_matches"],
        "false_matches": counts["false_matches"],
        "failures_to_acquire": counts["failures_to_acquire"],
        "fnmr": counts["false_non_matches"] / counts["genuine"] if counts["genuine"] else 0.0,
        "fmr": fmr,
        "per_source_same_source_impostors": {s: dict(c) for s, c in per_source.items()},
        "worst_source": worst,
        "worst_source_ratio": ratios.get(worst, 0.0),
    }


if __name__ == "__main__":
    raise SystemExit(main())
