"""The liveness landmark stage on many frames at once gives each frame exactly its own
points: both passes batched equal the two passes one frame at a time."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from facesvc.imaging import DecodeLimits, decode_image
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
