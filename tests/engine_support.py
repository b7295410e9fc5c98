"""Real engines for tests: the default model pack loaded once per process, real Redis,
fresh signing and template keys per test.

Its fixtures (``model_pack``, ``engine_kit``) are registered for every test through
``pytest_plugins`` in tests/conftest.py; import the helpers directly.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facesvc.clock import FixedClock
from facesvc.config import Settings, load_settings
from facesvc.engine import Caller, Engine
from facesvc.metrics import Metrics
from facesvc.models.dense_landmarks import DenseLandmarks
from facesvc.models.model_cache import ModelCache
from facesvc.models.pack import ModelPack
from facesvc.models.packs import load_pack
from facesvc.serve.wiring import build_engine
from facesvc.store.connection import AsyncRedis, redis_client_from_url
from facesvc.store.templates import generate_template_key
from facesvc.tokens.keys import keys_generate
from facesvc.transport.grpc_servicer import DEV_TENANT
from tests.clocks import wib_at

ADMIN = Caller(name="test-admin", role="admin", tenant="programme")
LMS = Caller(name="test-lms", role="lms", tenant="lms-a")
TENANTS = frozenset({LMS.tenant})
"""What test participants are enrolled for: the LMS tenant the tests scan as."""
DEV_TENANTS = frozenset({DEV_TENANT})
"""What participants scanned through launch tickets of an unauthenticated (development)
server are enrolled for: its tickets' tenant."""

_PACK: ModelPack | None = None
_DENSE: DenseLandmarks | None = None


def default_pack() -> ModelPack:
    """The default pack (yunet-sface), loaded once per test process: loading takes seconds."""
    global _PACK
    if _PACK is None:
        _PACK = load_pack(load_settings(env={}).models)
    return _PACK


@pytest.fixture(scope="session")
def model_pack() -> ModelPack:
    return default_pack()


def dense_landmarks() -> DenseLandmarks:
    """The liveness landmark stage (dlib's 68 points), loaded once per test process."""
    global _DENSE
    if _DENSE is None:
        _DENSE = DenseLandmarks.load(ModelCache(load_settings(env={}).models.cache_dir))
    return _DENSE


def engine_settings(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    *,
    keys_from: datetime | None = None,
    **overrides: Any,
) -> Settings:
    """Settings for an engine under test: its own keys in ``tmp_path`` (signing from
    ``keys_from``, default the real now), liveness off unless overridden
    (``liveness__spl="passive"``: dotted names with ``__``)."""
    key_dir = tmp_path / "token-keys"
    if not key_dir.exists():
        keys_generate(key_dir, now=keys_from)
    values: dict[str, Any] = {
        "redis.url": redis_url,
        "redis.key_prefix": prefix,
        "tokens.key_dir": key_dir,
        "templates.key": generate_template_key("k1"),
        "liveness.spl": "off",
        "liveness.webinar": "off",
        "liveness.offline": "off",
        "liveness.kiosk": "off",
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_settings(env={}, overrides=values)


@dataclass
class EngineKit:
    engine: Engine
    settings: Settings
    redis: AsyncRedis
    clock: FixedClock
    metrics: Metrics


@contextlib.asynccontextmanager
async def running_engine(
    tmp_path: Path, redis_url: str, prefix: str, pack: ModelPack, **overrides: Any
) -> AsyncIterator[EngineKit]:
    """An engine on ``pack`` and real Redis with ``overrides`` (see ``engine_settings``), its
    clock fixed at 10:00 WIB today (by the real date) so window and day-boundary tests can
    move it, and its signing key active from then."""
    clock = FixedClock(wib_at(10))
    settings = engine_settings(tmp_path, redis_url, prefix, keys_from=clock.now(), **overrides)
    redis = redis_client_from_url(redis_url, socket_timeout_s=2.0, socket_connect_timeout_s=1.0)
    metrics = Metrics()
    engine = await build_engine(settings, redis, metrics, clock=clock, pack=pack)
    try:
        yield EngineKit(engine, settings, redis, clock, metrics)
    finally:
        await engine.close()
        await redis.aclose()


@pytest.fixture
async def engine_kit(
    tmp_path: Path, redis_url: str, redis_prefix: str, model_pack: ModelPack
) -> AsyncIterator[EngineKit]:
    """An engine with liveness off (``running_engine`` with no overrides)."""
    async with running_engine(tmp_path, redis_url, redis_prefix, model_pack) as kit:
        yield kit


def jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    """``image`` ((H, W, 3) uint8 RGB) as JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def astronaut() -> np.ndarray:
    """scikit-image's astronaut photo: one real face, always available."""
    from skimage import data

    return np.asarray(data.astronaut())


def insightface_image(name: str) -> np.ndarray:
    """A photo shipped in the insightface wheel (t1.jpg: several people; Tom_Hanks_54745.png)."""
    import importlib.resources

    path = importlib.resources.files("insightface") / "data" / "images" / name
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))


def two_people() -> np.ndarray:
    """Two of t1.jpg's people, side by side at their own size (faces of about 100x140 px):
    a frame that is MULTIPLE_FACES for every pack, whatever size frames are analysed at
    (the whole group photo is scaled down to server.max_analyze_pixels, where some of its
    faces fall under quality.min_face_px)."""
    return np.ascontiguousarray(insightface_image("t1.jpg")[40:500, 440:880])
