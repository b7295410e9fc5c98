"""FaceWork.describe: the faces of a scan analysed and described at once, with the results
of analyse-then-embed; alone, the recogniser runs while the pose and quality are measured,
beside other scans it runs after the gates, batched."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import numpy.typing as npt
import pytest

from facesvc.config import QualitySettings
from facesvc.imaging import DecodeLimits
from facesvc.models.facework import BatchSettings, FaceWork
from facesvc.models.pack import ModelPack
from facesvc.models.pipeline import FacePipeline, FaceStatus, LocatedFace
from facesvc.models.types import RGBImage
from tests.engine_support import astronaut, model_pack, two_people

__all__ = ["model_pack"]  # the fixture, imported for pytest

BATCHING = BatchSettings(max_batch=8, max_wait_s=0.0, max_queue=64)


@pytest.fixture
def pipeline(model_pack: ModelPack) -> FacePipeline:
    return model_pack.pipeline(QualitySettings())


def _face_work(pipeline: FacePipeline) -> FaceWork:
    return FaceWork(
        pipeline,
        None,
        decode_limits=DecodeLimits(),
        threads=1,
        embed_batching=BATCHING,
        pad_batching=BATCHING,
    )


@pytest.fixture
async def faces(pipeline: FacePipeline) -> AsyncIterator[FaceWork]:
    work = _face_work(pipeline)
    yield work
    await work.close()


def _frames() -> list[RGBImage]:
    """A face, a frame without one, two people, and the face mirrored."""
    blank = np.full((480, 640, 3), 128, dtype=np.uint8)
    return [astronaut(), blank, two_people(), np.ascontiguousarray(astronaut()[:, ::-1])]


def test_locate_then_assess_is_analyze(pipeline: FacePipeline) -> None:
    for frame in _frames():
        located = pipeline.locate(frame)
        whole = pipeline.analyze(frame)
        if not isinstance(located, LocatedFace):
            assert (located.status, located.reasons, located.faces) == (
                whole.status,
                whole.reasons,
                whole.faces,
            )
            continue
        parts = pipeline.assess(frame, located)
        assert parts.status is whole.status and parts.reasons == whole.reasons
        np.testing.assert_array_equal(parts.chip, whole.chip)
        np.testing.assert_array_equal(parts.landmarks, whole.landmarks)


async def test_describe_gives_what_analyze_then_embed_gives(
    faces: FaceWork, pipeline: FacePipeline
) -> None:
    frames = _frames()
    analyses, descriptors = await faces.describe(frames)
    expected = [pipeline.analyze(frame) for frame in frames]
    assert [a.status for a in analyses] == [e.status for e in expected]
    assert [a.status for a in analyses] == [
        FaceStatus.OK,
        FaceStatus.NO_FACE,
        FaceStatus.MULTIPLE_FACES,
        FaceStatus.OK,
    ]
    assert descriptors.shape == (4, pipeline.dim)
    assert np.isnan(descriptors[1]).all() and np.isnan(descriptors[2]).all()
    for k in (0, 3):
        chip = expected[k].chip
        assert chip is not None
        np.testing.assert_allclose(descriptors[k], pipeline.embed([chip])[0], atol=1e-6)


async def test_beside_another_scan_faces_are_described_after_their_gates_in_the_batcher(
    pipeline: FacePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    embed, embed_alone = pipeline.embed, pipeline.embed_alone

    def watched_embed(chips: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        threads.append(threading.current_thread().name.split("_")[0] + " embed")
        return embed(chips)

    def watched_embed_alone(chips: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        threads.append(threading.current_thread().name.split("_")[0] + " embed_alone")
        return embed_alone(chips)

    monkeypatch.setattr(pipeline, "embed", watched_embed)
    monkeypatch.setattr(pipeline, "embed_alone", watched_embed_alone)
    faces = _face_work(pipeline)
    frames = _frames()
    try:
        # The second scan starts while the first is in flight.
        (first, first_d), (second, second_d) = await asyncio.gather(
            faces.describe(frames[:2]), faces.describe(frames[2:])
        )
    finally:
        await faces.close()
    # The first scan was alone when it began: the lone recogniser on its own thread.
    assert sorted(threads) == ["facework embed", "lone-embed embed_alone"]
    assert [a.status for a in first + second] == [
        FaceStatus.OK,
        FaceStatus.NO_FACE,
        FaceStatus.MULTIPLE_FACES,
        FaceStatus.OK,
    ]
    for descriptor, frame in ((first_d[0], frames[0]), (second_d[1], frames[3])):
        chip = pipeline.analyze(frame).chip
        assert chip is not None
        np.testing.assert_allclose(descriptor, embed(chip[None])[0], atol=1e-6)
    assert np.isnan(first_d[1]).all() and np.isnan(second_d[0]).all()


async def test_alone_the_recogniser_starts_before_the_quality_gates_finish(
    pipeline: FacePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quality gates of a lone scan's face wait (on the face-work thread) until its chip
    reaches the recogniser (on a thread of its own): describing after assessing would never
    get there."""
    embedding_started = threading.Event()
    gates_waited: list[bool] = []
    embed, assess = pipeline.embed_alone, pipeline.assess

    def watched_embed(chips: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        embedding_started.set()
        return embed(chips)

    def waiting_assess(image: RGBImage, located: LocatedFace) -> object:
        gates_waited.append(embedding_started.wait(timeout=30))
        return assess(image, located)

    monkeypatch.setattr(pipeline, "embed_alone", watched_embed)
    monkeypatch.setattr(pipeline, "assess", waiting_assess)
    work = _face_work(pipeline)
    try:
        analyses, descriptors = await work.describe([astronaut()])
    finally:
        await work.close()
    assert gates_waited == [True]
    assert analyses[0].status is FaceStatus.OK and np.isfinite(descriptors).all()


async def test_describe_with_a_passed_deadline_analyses_nothing(
    faces: FaceWork, pipeline: FacePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    located: list[RGBImage] = []
    locate = pipeline.locate
    monkeypatch.setattr(pipeline, "locate", lambda image: located.append(image) or locate(image))
    with pytest.raises(TimeoutError, match="before its faces were analysed"):
        await faces.describe([astronaut()], deadline=time.monotonic() - 1.0)
    assert located == []
