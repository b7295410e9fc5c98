"""Two versions of the service side by side, for a comparison that the machine's noise spares.

    git worktree add /tmp/before <commit>
    python -m benchmarks.side_by_side --before /tmp/before --faces ../shared/data/faces \\
        --lone-s 150 --rounds 8 --name side-by-side

On a shared machine the speed of everything moves by 10-20% from one minute to the next, so
two load runs made one after the other compare the minutes as much as the code. Here both
versions are started at once (``facesvc serve``, ``--workers`` workers each, one run from
the checkout ``--before``, the other from this one), the same people
are enrolled in both, and only one is driven at a time, so that whatever else the machine
does falls on both alike:

- one caller: each probe frame goes to both, in random order, call after call; reported:
  each side's p50 and the median of the paired differences (after - before);
- ``--concurrency`` callers: windows of ``--window-s`` seconds on each, in random order,
  ``--rounds`` times; reported: each side's median throughput and the median of the paired
  ratios (after / before).

Frames and enrolment are those of ``benchmarks.load`` (liveness off, one frame a Verify).
Results: ``<out>/<name>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import (
    FRAME_SIZE,
    enroll_people,
    load_people,
    placed_channels,
    run_level,
    spawn_service,
    verify_request,
    wait_workers_serving,
)
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.config import QualitySettings

SIDES = ("before", "after")


async def _verify_ms(stub: pb_grpc.FaceVerificationStub, participant: str, frame: bytes) -> float:
    started = time.perf_counter()
    await stub.Verify(verify_request(participant, frame), timeout=30)
    return (time.perf_counter() - started) * 1000


async def compare(
    targets: dict[str, str],
    workers: dict[str, tuple[str, list[int]]],
    people: list[tuple[bytes, list[bytes]]],
    lone_s: float,
    concurrency: int,
    window_s: float,
    rounds: int,
    seed: int,
) -> dict[str, Any]:
    """The two comparisons of the module doc, ``targets`` naming each side's host:port and
    ``workers`` its /metrics URL and workers' pids (each side's 8 connections are placed on
    its workers in turn: ``placed_channels``)."""
    channels = {
        side: (await placed_channels(target, *workers[side], 8))[0]
        for side, target in targets.items()
    }
    rng = np.random.default_rng(seed)

    def in_random_order() -> tuple[str, ...]:
        return SIDES if rng.random() < 0.5 else SIDES[::-1]

    try:
        stubs = {
            side: [pb_grpc.FaceVerificationStub(c) for c in opened]  # type: ignore[no-untyped-call]
            for side, opened in channels.items()
        }
        probes = {side: await enroll_people(stubs[side][0], (), people) for side in SIDES}
        if [p for p, _ in probes["before"]] != [p for p, _ in probes["after"]]:
            raise RuntimeError("the two versions enrolled different people: compare like with like")
        for side in SIDES:  # warm both
            await run_level(stubs[side], (), probes[side], 2, 3.0)
        lone: dict[str, list[float]] = {side: [] for side in SIDES}
        stop = time.monotonic() + lone_s
        while time.monotonic() < stop:
            k = int(rng.integers(len(probes["before"])))
            for side in in_random_order():
                lone[side].append(await _verify_ms(stubs[side][0], *probes[side][k]))
        windows: dict[str, list[float]] = {side: [] for side in SIDES}
        for _ in range(rounds):
            for side in in_random_order():
                level = await run_level(stubs[side], (), probes[side], concurrency, window_s)
                windows[side].append(level.throughput_rps)
    finally:
        for opened in channels.values():
            for channel in opened:
                await channel.close()
    before, after = np.array(lone["before"]), np.array(lone["after"])
    result: dict[str, Any] = {"lone_calls_each": int(before.size)}
    if before.size:
        result["lone"] = {
            "p50_ms": {"before": float(np.median(before)), "after": float(np.median(after))},
            "median_paired_difference_ms": float(np.median(after - before)),
        }
    if rounds:
        b, a = np.array(windows["before"]), np.array(windows["after"])
        result["windows"] = {
            "concurrency": concurrency,
            "window_s": window_s,
            "rps": {"before": windows["before"], "after": windows["after"]},
            "median_rps": {"before": float(np.median(b)), "after": float(np.median(a))},
            "median_paired_ratio": float(np.median(a / b)),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the other version")
    parser.add_argument("--faces", type=Path, help="identity folders (default: bundled photos)")
    parser.add_argument("--people", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--redis-url", default=os.environ.get("FACESVC_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--lone-s", type=float, default=120.0, help="0 skips the lone caller")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--window-s", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=8, help="0 skips the windows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="side-by-side", help="output file stem")
    args = parser.parse_args(argv)
    if not (args.before / "facesvc").is_dir():
        parser.error(f"{args.before} is not a facesvc checkout")
    people = load_people(args.faces, args.people, FRAME_SIZE)
    here = Path(__file__).resolve().parent.parent
    trees = {"before": args.before.resolve(), "after": here}
    min_face_px = QualitySettings().min_face_px
    spawned = {
        side: spawn_service(args.workers, args.redis_url, min_face_px, code=tree)
        for side, tree in trees.items()
    }
    try:
        workers = {
            side: (s.metrics_url, wait_workers_serving(s, args.workers))
            for side, s in spawned.items()
        }
        result = asyncio.run(
            compare(
                {side: s.target for side, s in spawned.items()},
                workers,
                people,
                args.lone_s,
                args.concurrency,
                args.window_s,
                args.rounds,
                args.seed,
            )
        )
    finally:
        for s in spawned.values():
            s.proc.terminate()
            s.proc.wait()
    result.update(
        trees={side: str(t) for side, t in trees.items()},
        workers=args.workers,
        load_average_after=os.getloadavg(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k in ("lone", "windows")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
