"""Frames built to cost the server CPU and memory (issue 18.1), through the real engine and
the real gRPC server: refused before decoding when over the decoding budget, and otherwise
analysed at no more than ``server.max_analyze_pixels`` whatever their size.

The costs themselves are measured by ``python -m benchmarks.hostile_frames`` (no timing
here)."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.config import QualitySettings, ServerSettings
from facesvc.imaging import DecodeLimits
from facesvc.models.facework import BatchSettings, FaceWork
from facesvc.models.pack import ModelPack
from facesvc.models.pipeline import FaceStatus
from tests.conftest import ServerStarter
from tests.engine_support import astronaut
from tests.test_service_verify import PID, enroll, start, verify

pytestmark = pytest.mark.calendar


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_verify_refuses_a_png_over_the_decoding_budget_and_counts_no_attempt(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    server = start(start_server, redis_url, tmp_path)
    assert enroll(server).enrolled
    # 2100x2100 = 4.4 MP: under the 25 MP header limit, so it used to be decoded and
    # scanned for faces (seconds of CPU for a few kilobytes; 24 MP took 20 s).
    flat = _encode(Image.new("RGB", (2100, 2100), (128, 128, 128)), "PNG")
    assert len(flat) < 64_000
    with pytest.raises(grpc.RpcError) as refused:
        verify(server, flat)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "2100x2100" in refused.value.details()
    assert "send a smaller picture, or a JPEG" in refused.value.details()
    attempts = server.stub.GetAttempts(
        pb.GetAttemptsRequest(
            participant_id=PID, training_id="course-1", training_type=pb.TRAINING_TYPE_SPL
        ),
        timeout=10,
    )
    assert attempts.used == 0


async def test_face_work_sees_at_most_max_analyze_pixels_of_a_huge_frame(
    model_pack: ModelPack,
) -> None:
    cap = ServerSettings().max_analyze_pixels
    batching = BatchSettings(max_batch=1, max_wait_s=0.0, max_queue=1)
    faces = FaceWork(
        model_pack.pipeline(QualitySettings()),
        None,
        decode_limits=DecodeLimits(),
        max_analyze_pixels=cap,
        threads=1,
        embed_batching=batching,
        pad_batching=batching,
    )
    huge = Image.fromarray(astronaut()).resize((2500, 1875), Image.Resampling.BILINEAR)
    try:
        (image,) = await faces.decode([_encode(huge, "JPEG", quality=85)])
        # Decoded at 1/2 (1250x938, within the 4.2 MP budget), then scaled to the cap.
        assert image.shape[0] * image.shape[1] <= cap
        assert image.shape[:2] == (588, 783)
        (analysis,) = await faces.analyze([image])
        assert analysis.status is FaceStatus.OK  # the face is still found and measured
    finally:
        await faces.close()


def test_frame_sizes_chosen_at_will_leave_a_bounded_detector_cache(model_pack: ModelPack) -> None:
    # The dlib detector keeps a pool of float32 canvases per input size: eight sizes of the
    # largest analysed frame kept about 150 MB resident once the frames were gone.
    from facesvc.models.dlib import mmod as dlib_mmod

    detector = model_pack.detector
    if not isinstance(detector, dlib_mmod.MMODFaceDetector):
        pytest.skip("the default pack's detector is not dlib's")
    cap = ServerSettings().max_analyze_pixels
    for width in range(700, 900, 20):  # ten sizes, each at most the analysed maximum
        height = cap // width
        detector.detect(np.zeros((height, width, 3), dtype=np.uint8), 80)
    pools = [plan.pool.nbytes for plan in detector._plans.values()]
    assert sum(pools[:-1]) <= dlib_mmod._PLAN_CACHE_BYTES  # the newest is always kept
    assert len(pools) < 8
