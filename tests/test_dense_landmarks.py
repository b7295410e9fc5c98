"""The liveness landmark stage on many frames at once gives each frame exactly its own
points: both passes batched equal the two passes one frame at a time."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from facesvc.config import QualitySettings
from facesvc.imaging import DecodeLimits, decode_image
from facesvc.models.facework import BatchSettings, FaceWork
from facesvc.models.types import Detection, Points, RGBImage
from tests.engine_support import default_pack, dense_landmarks


def _photos() -> list[RGBImage]:
    data = pytest.importorskip("skimage.data")
    photos = [np.ascontiguousarray(data.astronaut(), dtype=np.uint8)]
    insightface = pytest.importorskip("insightface")
    folder = Path(insightface.__file__).parent / "data" / "images"
    photos += [
        decode_image(p.read_bytes(), DecodeLimits())
        for p in sorted(folder.glob("*"))
        if p.suffix.lower() in {".jpg", ".png"}
    ]
    return photos


def test_frames_at_once_equal_one_by_one() -> None:
    pack = default_pack()
    dense = dense_landmarks()
    assert pack.landmarks is not None
    images: list[RGBImage] = []
    detections: list[Detection] = []
    pack_points: list[Points | None] = []
    for image in _photos():
        for detection in pack.detector.detect(image, 40)[:3]:
            five = pack.landmarks.predict(image, detection.box)
            bare = replace(detection, landmarks=None)
            # Every way the first box is found: the detector's five points, the pack's
            # five, 68 given points, the detection's box alone.
            images += [image] * 4
            detections += [detection, bare, bare, bare]
            pack_points += [five, five, dense.predict(image, detection, five), None]
    assert len(images) >= 20  # five faces, four ways
    together = dense.predict_many(images, detections, pack_points)
    one_by_one = np.stack(
        [dense.predict(*args) for args in zip(images, detections, pack_points, strict=True)]
    )
    assert together.shape == (len(images), 68, 2)
    assert np.array_equal(together, one_by_one)
    # predict is both passes: the box fitted to the first pass's points, predicted again.
    predictor = dense._predictor
    seed = predictor.predict(images[3], detections[3].box)
    again = predictor.predict(images[3], dense._box(tuple((i,) for i in range(68)), seed))
    assert np.array_equal(together[3], again)


def test_lengths_must_agree() -> None:
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="1 images, 0 detections"):
        dense_landmarks().predict_many([image], [], [None])


async def test_face_work_measures_every_frame_in_one_task_within_the_deadline() -> None:
    """FaceWork.landmarks_68 gives each frame what the stage gives it alone, and refuses
    to start past the call's deadline (a timeout, not a model failure)."""
    pack = default_pack()
    dense = dense_landmarks()
    batching = BatchSettings(max_batch=1, max_wait_s=0.0, max_queue=1)
    faces = FaceWork(
        pack.pipeline(QualitySettings()),
        None,
        decode_limits=DecodeLimits(),
        threads=2,
        embed_batching=batching,
        pad_batching=batching,
        dense_landmarks=dense,
    )
    try:
        photo = _photos()[0]
        frames = [photo, np.ascontiguousarray(photo[:, ::-1]), photo[40:, 30:].copy()]
        analyses = await faces.analyze(frames)
        points = await faces.landmarks_68(frames, analyses, time.monotonic() + 30)
        assert len(points) == len(frames)
        for image, analysis, got in zip(frames, analyses, points, strict=True):
            assert analysis.detection is not None
            expected = dense.predict(image, analysis.detection, analysis.landmarks)
            assert np.array_equal(got, expected)
        with pytest.raises(TimeoutError):
            await faces.landmarks_68(frames, analyses, time.monotonic() - 1)
    finally:
        await faces.close()
