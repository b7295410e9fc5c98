"""Time of one MMOD face detection on a 640x480 frame with one face, two ONNX Runtime threads:
dlib's full-resolution pipeline against the pyramid entered at ``min_face_px`` = 100.

Run: ``pytest benchmarks/test_bench_detect.py --benchmark-only``. Both cases are in one
benchmark group, so pytest-benchmark prints their medians side by side. Target: 30 ms or less
for the scaled case on two cores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from pytest_benchmark.fixture import BenchmarkFixture

from facesvc.models.dlib_mmod import MMODFaceDetector
from facesvc.models.model_cache import ModelCache
from facesvc.models.types import Detection, RGBImage

THREADS = 2
# A selfie's face fills a quarter or more of a 640x480 frame's height (120 px and up); 100 px
# enters dlib's pyramid one level down (5/6 scale).
MIN_FACE_PX = 100


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> MMODFaceDetector:
    cache = ModelCache(Path(tmp_path_factory.mktemp("models")))
    return MMODFaceDetector.load(cache, threads=THREADS)


@pytest.fixture(scope="module")
def frame() -> RGBImage:
    """640x480: the astronaut photo enlarged to 640x640 and cut to 480 rows (face ~120 px)."""
    image = Image.fromarray(skimage.data.astronaut()).resize((640, 640), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image)[:480])


@pytest.mark.benchmark(group="mmod-640x480")
@pytest.mark.parametrize("mode", ["full_resolution", f"min_face_{MIN_FACE_PX}"])
def test_detect_time(
    benchmark: BenchmarkFixture, detector: MMODFaceDetector, frame: RGBImage, mode: str
) -> None:
    calls: dict[str, Callable[[], list[Detection]]] = {
        "full_resolution": lambda: detector.detect_full_resolution(frame),
        f"min_face_{MIN_FACE_PX}": lambda: detector.detect(frame, MIN_FACE_PX),
    }
    run = calls[mode]
    run()  # the first call builds the size's pyramid plan and canvas
    benchmark.extra_info.update(threads=THREADS, image="640x480", mode=mode)
    faces = benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    assert len(faces) == 1
