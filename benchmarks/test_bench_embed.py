"""Time per face of the dlib ResNet embedder on one ONNX Runtime thread, batch 1 and batch 8.

Run: ``pytest benchmarks/test_bench_embed.py --benchmark-only``. Target: 5 ms per face or
less on one core. pytest-benchmark reports time per call; divide the batch-8 figures by 8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import skimage.data
from pytest_benchmark.fixture import BenchmarkFixture

from facesvc.models.dlib_resnet import CHIP_SIZE, DlibResnetEmbedder
from facesvc.models.model_cache import ModelCache


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> DlibResnetEmbedder:
    cache = ModelCache(Path(tmp_path_factory.mktemp("models")))
    return DlibResnetEmbedder.load(cache, threads=1)


def chips(n: int) -> npt.NDArray[np.uint8]:
    """``n`` 150x150 crops of a real photo (the work does not depend on the content)."""
    image = skimage.data.astronaut()
    return np.stack([image[10 * i : 10 * i + CHIP_SIZE, 150:300] for i in range(n)])


@pytest.mark.parametrize("batch", [1, 8])
def test_embed_time_per_call(
    benchmark: BenchmarkFixture, embedder: DlibResnetEmbedder, batch: int
) -> None:
    batch_chips = chips(batch)
    embedder.embed(batch_chips)  # first call allocates
    benchmark.extra_info["faces_per_call"] = batch
    result = benchmark.pedantic(embedder.embed, args=(batch_chips,), rounds=30, warmup_rounds=2)
    assert result.shape == (batch, 128)
