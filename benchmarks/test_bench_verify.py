"""Time of one whole Verify through the engine, and of the cap check on its own.

Run: ``pytest benchmarks/test_bench_verify.py --benchmark-only`` (a real Redis at
FACESVC_TEST_REDIS_URL, default redis://127.0.0.1:6379/0; keys under a fresh prefix,
deleted afterwards). No server: the engine is driven in-process on one event loop, so the
figures are the service's work without gRPC. Groups:

- ``verify-by-frame-size``: one 1-frame Verify (liveness off) of the enrolled astronaut at
  640x480, 1280x960 and 1920x1440 (JPEG q90) with the default pack (yunet-sface): decode,
  window and template, the atomic reservation, detection, landmarks, alignment, embedding,
  match, audit.
- ``verify-by-pack``: the same at 640x480 with each built-in pack, side by side.
- ``verify-by-enrolled``: the same at 640x480 with 1 or 10,000 participants enrolled:
  a Verify reads only its participant's template, so the cost must not grow.
- ``cap-check``: one ``AttemptCaps.reserve`` round trip (a Lua script on Redis). Target:
  p99 <= 0.5 ms. pytest-benchmark prints no p99: ``extra_info`` has ``awaited_p50_ms`` and
  ``awaited_p99_ms``, the round trip as the engine awaits it (``--benchmark-json``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pytest
import skimage.data
from PIL import Image
from pytest_benchmark.fixture import BenchmarkFixture

from benchmarks.load import frame_jpeg
from facesvc.config import load_settings
from facesvc.domain import Decision, Gate, TrainingType
from facesvc.engine import Engine, VerifyCommand
from facesvc.limits.caps import AttemptCaps, CapRule
from facesvc.metrics import Metrics
from facesvc.models.pack import ModelPack
from facesvc.models.packs import load_pack
from facesvc.serve.wiring import build_engine
from facesvc.store.connection import AsyncRedis, redis_client_from_url
from facesvc.store.templates import Template, TemplateStore, keyring_from_settings
from tests.engine_support import (
    ADMIN,
    LMS,
    TENANTS,
    astronaut,
    default_pack,
    engine_settings,
    jpeg,
)

REDIS_URL = os.environ.get("FACESVC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PID = "bench-participant"
SIZES = ((640, 480), (1280, 960), (1920, 1440))


@dataclass
class Kit:
    loop: asyncio.AbstractEventLoop
    engine: Engine
    redis: AsyncRedis
    templates: TemplateStore
    prefix: str


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    """An engine on the default pack and the real Redis, with the astronaut enrolled."""
    yield from _kit(tmp_path_factory, default_pack())


@pytest.fixture(scope="module")
def dlib_kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    """The same on the dlib pack."""
    settings = load_settings(env={}, overrides={"models.pack": "dlib"})
    yield from _kit(tmp_path_factory, load_pack(settings.models))


def _kit(tmp_path_factory: pytest.TempPathFactory, pack: ModelPack) -> Iterator[Kit]:
    prefix = f"bench:{uuid.uuid4().hex[:12]}:"
    settings = engine_settings(tmp_path_factory.mktemp("keys"), REDIS_URL, prefix)
    loop = asyncio.new_event_loop()
    redis = redis_client_from_url(REDIS_URL)
    engine = loop.run_until_complete(build_engine(settings, redis, Metrics(), pack=pack))
    enrolled = loop.run_until_complete(
        engine.enroll(PID, [jpeg(astronaut())], replace=True, caller=ADMIN, tenants=TENANTS)
    )
    assert enrolled.enrolled, enrolled.reason
    templates = TemplateStore(redis, keyring_from_settings(settings.templates), key_prefix=prefix)
    yield Kit(loop, engine, redis, templates, prefix)

    async def clean() -> None:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await redis.delete(*keys[start : start + 1000])
        await engine.close()
        await redis.aclose()

    loop.run_until_complete(clean())
    loop.close()


def _frame(size: tuple[int, int]) -> bytes:
    """The astronaut photo fitted into a ``size`` canvas, as a webcam frame would be."""
    return frame_jpeg(Image.fromarray(skimage.data.astronaut()), size)


def _bench_verify(benchmark: BenchmarkFixture, kit: Kit, frame: bytes) -> None:
    # A fresh training id per round: the daily cap never cuts the run short.
    run_id = uuid.uuid4().hex[:8]  # each benchmark its own trainings: caps count per training
    training_ids = (f"bench-{run_id}-{n}" for n in itertools.count())

    def run() -> Decision:
        command = VerifyCommand(
            participant_id=PID,
            training_id=next(training_ids),
            training_type=TrainingType.SPL,
            gate=Gate.SESSION,
            session_id="s1",
            frames=[frame],
            caller=LMS,
        )
        return kit.loop.run_until_complete(kit.engine.verify(command)).decision

    decision = benchmark.pedantic(run, rounds=30, warmup_rounds=3)
    assert decision is Decision.VERIFIED


@pytest.mark.benchmark(group="verify-by-frame-size")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_verify_time_by_frame_size(
    benchmark: BenchmarkFixture, kit: Kit, size: tuple[int, int]
) -> None:
    frame = _frame(size)
    benchmark.extra_info.update(frame=f"{size[0]}x{size[1]}", jpeg_bytes=len(frame))
    _bench_verify(benchmark, kit, frame)


@pytest.mark.benchmark(group="verify-by-pack")
@pytest.mark.parametrize("pack", ["yunet-sface", "dlib"])
def test_verify_time_by_pack(
    benchmark: BenchmarkFixture, request: pytest.FixtureRequest, pack: str
) -> None:
    chosen: Kit = request.getfixturevalue("kit" if pack == "yunet-sface" else "dlib_kit")
    benchmark.extra_info.update(pack=chosen.engine.pack.tag, frame="640x480")
    _bench_verify(benchmark, chosen, _frame(SIZES[0]))


@pytest.mark.benchmark(group="verify-by-enrolled")
@pytest.mark.parametrize("enrolled", [1, 10_000])
def test_verify_time_by_enrolled_participants(
    benchmark: BenchmarkFixture, kit: Kit, enrolled: int
) -> None:
    others = enrolled - 1
    if others:
        # Random unit descriptors under other ids: stored exactly as real enrollments are.
        rng = np.random.default_rng(0)
        descriptors = rng.standard_normal((others, 1, 128)).astype(np.float32)
        descriptors /= np.linalg.norm(descriptors, axis=2, keepdims=True)
        now = datetime.now(UTC)

        async def fill() -> None:
            for index in range(others):
                template = Template(
                    participant_id=f"filler-{index}",
                    model_pack=kit.engine.pack.tag,
                    descriptors=descriptors[index],
                    created_at=now,
                    image_count=1,
                )
                await kit.templates.put(template, replace=True)

        kit.loop.run_until_complete(fill())
    benchmark.extra_info.update(enrolled=enrolled, frame="640x480")
    _bench_verify(benchmark, kit, _frame(SIZES[0]))


@pytest.mark.benchmark(group="cap-check")
def test_cap_check_round_trip(benchmark: BenchmarkFixture, kit: Kit) -> None:
    caps = AttemptCaps(
        kit.redis, [CapRule(t, 1_000_000) for t in TrainingType], key_prefix=kit.prefix
    )
    now = datetime.now(UTC)
    seconds: list[float] = []

    async def reserve() -> int:
        # Timed inside the running loop, as the engine awaits it: pytest-benchmark's own
        # figures also include starting the loop for each round.
        started = time.perf_counter()
        held = await caps.reserve(PID, "bench-caps", TrainingType.SPL, now)
        seconds.append(time.perf_counter() - started)
        return held.used

    def run() -> int:
        return kit.loop.run_until_complete(reserve())

    assert benchmark.pedantic(run, rounds=2000, warmup_rounds=50) > 0
    p50, p99 = np.percentile(seconds[50:], [50, 99]) * 1000
    benchmark.extra_info.update(awaited_p50_ms=float(p50), awaited_p99_ms=float(p99))
