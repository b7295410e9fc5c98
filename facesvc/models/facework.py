"""Face work for one request, kept off the event loop and batched across requests.

Decoding, detection and landmarks run per frame on a thread pool (ONNX Runtime and Pillow
release the GIL while they work); a challenge's liveness landmarks run on that pool as one
task for all its frames (numpy, batched across the frames). Embedding and the
presentation-attack model go through micro-batchers, so the faces of concurrent requests
share one ONNX Runtime call.

``describe`` (a Verify's faces) adapts to load. A scan that is alone in its worker has its
faces described on a thread of their own while the pool measures their pose and quality,
so a lone caller does not wait for the pose landmarks before the recogniser starts, and
by the pack's lone recogniser (``FacePipeline.embed_alone``), which spreads each layer
over ``models.lone_threads`` threads: the cores a lone scan leaves idle. Alone in its
worker is not alone on the machine (another worker may be busy); two workers both
describing that way on two cores lost 3% of their throughput to the threads they then
share, measured (docs/benchmarks.md). With other scans in flight the pool and the batcher
already keep the cores busy, an extra thread only made the workers compete for them (16
callers: 10-15% fewer Verify/s), and faces are described after their gates, batched, as
``analyze`` then ``embed`` would.

A model that fails (an ONNX Runtime error, a model whose outputs break its contract) is
never an answer about the face: it surfaces as ``ModelFailure``, which the transports
answer INTERNAL with its message (no attempt counted), and is logged with its cause.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt

from facesvc.errors import Internal
from facesvc.imaging import DecodeLimits, ImageRejected, decode_image, fit_pixels
from facesvc.models.batcher import MicroBatcher, Overloaded
from facesvc.models.dense_landmarks import DenseLandmarks
from facesvc.models.fas import crop_face, resize_and_pad
from facesvc.models.pipeline import FaceAnalysis, FacePipeline, FaceStatus, LocatedFace
from facesvc.models.types import Points, PresentationAttackModel, RGBImage

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class ModelFailure(Internal):
    """A face model failed on this request: not a decision about the face. Nothing was
    decided, so the attempt is not counted; the message says what failed."""

    code = "MODEL_FAILURE"


_PASSED_THROUGH = (TimeoutError, Overloaded, asyncio.CancelledError)


def _model_work(what: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Turn any error of the wrapped model work other than a deadline, an overload or a
    cancellation into ``ModelFailure`` naming ``what`` failed, logging the cause."""

    def wrap(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(*args, **kwargs)
            except _PASSED_THROUGH:
                raise
            except Exception as exc:
                log.exception("model failure in %s", what)
                raise ModelFailure(
                    f"the face models failed while {what} ({type(exc).__name__}: {exc}); "
                    "nothing was decided and no attempt was counted: retry, and report it to "
                    "the operator if it persists"
                ) from exc

        return run

    return wrap


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Micro-batching of one model: at most ``max_batch`` faces a call, waiting at most
    ``max_wait_s`` for company, refusing work beyond ``max_queue`` waiting faces (the
    ``throughput`` settings)."""

    max_batch: int
    max_wait_s: float
    max_queue: int


@dataclass(frozen=True, slots=True)
class PadCrop:
    """How a face is cut out for the presentation-attack model: a square ``expand`` times
    the detector box's longer side, centred on the box, resized to the model's input. It
    must be the crop the model's threshold was calibrated with (FasCalibration.crop_expand)."""

    expand: float = 2.5


class FaceWork:
    """Decode, analyse, embed and score faces for the engine; owns its thread pool."""

    def __init__(
        self,
        pipeline: FacePipeline,
        pad_model: PresentationAttackModel | None,
        *,
        decode_limits: DecodeLimits,
        max_analyze_pixels: int = 460_800,
        threads: int,
        embed_batching: BatchSettings,
        pad_batching: BatchSettings,
        pad_crop: PadCrop = PadCrop(),
        dense_landmarks: DenseLandmarks | None = None,
    ) -> None:
        """``dense_landmarks``: the liveness landmark stage (68 points on any detector's
        face), loaded when some policy asks for a challenge."""
        self.pipeline = pipeline
        self._dense = dense_landmarks
        self._decode_limits = decode_limits
        if max_analyze_pixels <= 0:
            raise ValueError("max_analyze_pixels must be positive")
        self._max_analyze_pixels = max_analyze_pixels
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="facework"
        )
        # A lone scan's recogniser (describe): one scan at a time, so one thread.
        self._lone_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lone-embed"
        )
        self._describing = 0
        self._embedder = MicroBatcher(
            pipeline.embed,
            max_batch=embed_batching.max_batch,
            max_wait_s=embed_batching.max_wait_s,
            max_queue=embed_batching.max_queue,
            executor=self._executor,
        )
        self._pad_model = pad_model
        self._pad_crop = pad_crop
        self._pad: MicroBatcher | None = None
        if pad_model is not None:
            self._pad = MicroBatcher(
                _scores_of(pad_model),
                max_batch=pad_batching.max_batch,
                max_wait_s=pad_batching.max_wait_s,
                max_queue=pad_batching.max_queue,
                executor=self._executor,
            )

    async def decode(self, blobs: Sequence[bytes]) -> list[RGBImage]:
        """Decoded frames, in order, each scaled down to at most ``max_analyze_pixels``: every
        later stage (detection, landmarks, alignment, quality, the liveness crop) works on
        that one picture, so a huge frame costs what a frame of that size costs. Raises
        ``ImageRejected`` for the first bad one, its message prefixed with the frame's
        position."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self._executor, self._decode_one, blob) for blob in blobs),
            return_exceptions=True,
        )
        images: list[RGBImage] = []
        for index, result in enumerate(results):
            if isinstance(result, BaseException):
                if isinstance(result, ImageRejected):
                    raise ImageRejected(f"image {index}: {result}") from result
                raise result
            images.append(result)
        return images

    def _decode_one(self, blob: bytes) -> RGBImage:
        return fit_pixels(decode_image(blob, self._decode_limits), self._max_analyze_pixels)

    def warm_up(self) -> None:
        """Analyse one blank frame of the largest size analysed (``max_analyze_pixels``, 4:3),
        so the detector's buffers and ONNX Runtime's memory arena are sized for it at
        start-up: the largest frame a caller can send then costs no new memory, and the
        memory an operator sees after start is what the worker keeps under attack."""
        width = int((self._max_analyze_pixels * 4 / 3) ** 0.5)
        height = self._max_analyze_pixels // width
        self.pipeline.analyze(np.zeros((height, width, 3), dtype=np.uint8))

    @_model_work("finding and measuring the faces")
    async def analyze(
        self, images: Sequence[RGBImage], deadline: float | None = None
    ) -> list[FaceAnalysis]:
        """One analysis per image (detection, landmarks, quality, aligned chip).

        Raises ``TimeoutError`` without analysing anything when ``deadline``
        (``time.monotonic()`` seconds) has already passed: nobody waits for the answer.
        """
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("the call's deadline passed before its faces were analysed")
        loop = asyncio.get_running_loop()
        return list(
            await asyncio.gather(
                *(loop.run_in_executor(self._executor, self.pipeline.analyze, im) for im in images)
            )
        )

    @_model_work("finding, measuring and describing the faces")
    async def describe(
        self, images: Sequence[RGBImage], deadline: float | None = None
    ) -> tuple[list[FaceAnalysis], npt.NDArray[np.float32]]:
        """``analyze`` and ``embed`` in one (module doc): the analyses, and (N, D) descriptors,
        row i that of frame i's face (NaN where frame i has no face to describe).

        Alone in the worker, every face found is described while it is assessed (a face
        that then fails its gates was described for nothing); otherwise the faces that pass
        their gates, or fail only the pose ones (an active-liveness frame may be turned), are
        described after, batched with other requests. Raises ``TimeoutError`` without
        analysing anything when ``deadline`` has already passed.
        """
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("the call's deadline passed before its faces were analysed")
        alone = self._describing == 0
        self._describing += 1
        try:
            return await self._describe(images, deadline, alone)
        finally:
            self._describing -= 1

    async def _describe(
        self, images: Sequence[RGBImage], deadline: float | None, alone: bool
    ) -> tuple[list[FaceAnalysis], npt.NDArray[np.float32]]:
        loop = asyncio.get_running_loop()
        located = await asyncio.gather(
            *(loop.run_in_executor(self._executor, self.pipeline.locate, im) for im in images)
        )
        early = None
        if alone:
            chips = {i: f.chip for i, f in enumerate(located) if isinstance(f, LocatedFace)}
            if chips:
                batch = np.stack(list(chips.values()))
                early = loop.run_in_executor(self._lone_executor, self.pipeline.embed_alone, batch)

        async def assessed(image: RGBImage, face: FaceAnalysis | LocatedFace) -> FaceAnalysis:
            if isinstance(face, FaceAnalysis):
                return face
            return await loop.run_in_executor(self._executor, self.pipeline.assess, image, face)

        try:
            analyses = list(await asyncio.gather(*map(assessed, images, located)))
        except BaseException:
            if early is not None:
                # Its own failure, if it had one, is not the one to report.
                early.add_done_callback(_retrieved)
            raise
        descriptors = np.full((len(images), self.pipeline.dim), np.nan, dtype=np.float32)
        if early is not None:
            descriptors[list(chips)] = await early
            return analyses, descriptors
        usable = {
            i: a.chip
            for i, a in enumerate(analyses)
            if a.chip is not None and (a.status is FaceStatus.OK or a.only_pose_failed)
        }
        if usable:
            batch = np.stack(list(usable.values()))
            descriptors[list(usable)] = await self._embedder.submit(batch, deadline)
        return analyses, descriptors

    @_model_work("describing the faces")
    async def embed(
        self, chips: Sequence[RGBImage], deadline: float | None = None
    ) -> npt.NDArray[np.float32]:
        """(N, D) L2-normalised descriptors of N aligned chips, batched with other requests."""
        return await self._embedder.submit(np.stack(chips), deadline)

    @_model_work("measuring the faces for liveness")
    async def landmarks_68(
        self,
        images: Sequence[RGBImage],
        analyses: Sequence[FaceAnalysis],
        deadline: float | None = None,
    ) -> list[Points]:
        """(68, 2) points of the chosen face in each frame, for the liveness geometry: all
        the frames in one task on the face-work threads (``DenseLandmarks.predict_many``
        runs each pass for every frame at once, far fewer numpy calls than a task per
        frame)."""
        if self._dense is None:
            raise RuntimeError("no liveness landmark stage is loaded (no challenge policy)")
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("the call's deadline passed before the liveness landmarks")
        detections = []
        for analysis in analyses:
            assert analysis.detection is not None, "only measured faces reach liveness"
            detections.append(analysis.detection)
        points = await asyncio.get_running_loop().run_in_executor(
            self._executor,
            self._dense.predict_many,
            images,
            detections,
            [analysis.landmarks for analysis in analyses],
        )
        return list(points)

    @_model_work("scoring the faces for presentation attacks")
    async def live_scores(
        self,
        images: Sequence[RGBImage],
        analyses: Sequence[FaceAnalysis],
        deadline: float | None = None,
    ) -> npt.NDArray[np.float32]:
        """(N,) live scores in [0, 1] of the chosen face in each of N frames."""
        if self._pad is None or self._pad_model is None:
            raise RuntimeError("no presentation-attack model is loaded (liveness policy off)")
        size = self._pad_model.input_size
        expand = self._pad_crop.expand

        def crops() -> npt.NDArray[np.uint8]:
            out = []
            for image, analysis in zip(images, analyses, strict=True):
                assert analysis.detection is not None
                out.append(resize_and_pad(crop_face(image, analysis.detection.box, expand), size))
            return np.stack(out)

        batch = await asyncio.get_running_loop().run_in_executor(self._executor, crops)
        return (await self._pad.submit(batch, deadline)).reshape(-1)

    async def close(self) -> None:
        await self._embedder.close()
        if self._pad is not None:
            await self._pad.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._lone_executor.shutdown(wait=False, cancel_futures=True)


def _retrieved(future: asyncio.Future[npt.NDArray[np.float32]]) -> None:
    """Mark a future's outcome as seen, so asyncio does not log an unretrieved exception."""
    if not future.cancelled():
        future.exception()


def _scores_of(
    model: PresentationAttackModel,
) -> Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.float32]]:
    def run(batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        return model.live_scores(list(batch))

    return run
