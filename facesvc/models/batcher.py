"""Gather the inputs of concurrent requests into one model call.

An ONNX Runtime call has a fixed cost (graph dispatch, thread wake-up) that a batch of
eight faces pays once instead of eight times. Items that arrive while a batch runs form the
next one. The batcher also holds a short batch for at most ``max_wait_s`` while it waits for
company, but only when the batch before it had company: a lone caller (the last batch was
one submission) is not delayed at all, and under concurrent load the wait fills batches. It
refuses new work at once when ``max_queue`` items are already waiting: under overload a
caller gets a fast "busy" instead of everyone timing out together.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from facesvc.errors import Busy

BatchFn = Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.float32]]
"""Maps a stacked batch (N, ...) to results (N, ...), row i answering input i."""


class Overloaded(Busy):
    """The batcher's queue is full: retry after a short back-off or shed the request."""


@dataclass(slots=True)
class _Pending:
    items: npt.NDArray[np.uint8]
    future: asyncio.Future[npt.NDArray[np.float32]]
    deadline: float | None


class MicroBatcher:
    """Runs ``fn`` on batches assembled from concurrent ``submit`` calls.

    ``fn`` runs on ``executor`` (ONNX Runtime releases the GIL, so inference overlaps the
    event loop). Items whose deadline (``time.monotonic()`` seconds) has passed before their
    batch starts are dropped with ``asyncio.TimeoutError`` instead of being computed.
    """

    def __init__(
        self,
        fn: BatchFn,
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < max_batch or max_wait_s < 0:
            raise ValueError("need max_batch >= 1, max_queue >= max_batch and max_wait_s >= 0")
        self._fn = fn
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        self._executor = executor
        self._queue: list[_Pending] = []
        self._queued_items = 0
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._last_batch_shared = False

    async def submit(
        self, items: npt.NDArray[np.uint8], deadline: float | None = None
    ) -> npt.NDArray[np.float32]:
        """Results for ``items`` (shape (n, ...)), computed in a shared batch.

        Raises ``Overloaded`` at once when the queue cannot take ``n`` more items.
        """
        n = int(items.shape[0])
        if n == 0:
            raise ValueError("submit needs at least one item")
        if self._queued_items + n > self._max_queue:
            raise Overloaded(
                f"server busy: {self._queued_items} items already queued "
                f"(limit {self._max_queue}); retry shortly"
            )
        loop = asyncio.get_running_loop()
        pending = _Pending(items=items, future=loop.create_future(), deadline=deadline)
        self._queue.append(pending)
        self._queued_items += n
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="micro-batcher")
        self._wakeup.set()
        return await pending.future

    async def close(self) -> None:
        """Stop the worker; pending submissions fail with ``asyncio.CancelledError``."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for pending in self._queue:
            if not pending.future.done():
                pending.future.cancel()
        self._queue.clear()
        self._queued_items = 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            # Wait for company only while the batch is short (a full batch goes at once) and
            # company is likely: the last batch had some.
            started = loop.time()
            while self._last_batch_shared and self._queued_items < self._max_batch:
                remaining = self._max_wait_s - (loop.time() - started)
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take_batch()
            if not batch:
                continue
            self._last_batch_shared = len(batch) > 1
            stacked = np.concatenate([p.items for p in batch], axis=0)
            try:
                results = await loop.run_in_executor(self._executor, self._fn, stacked)
            except Exception as exc:  # the model failed: every caller in the batch learns why
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            offset = 0
            for p in batch:
                n = int(p.items.shape[0])
                if not p.future.done():
                    p.future.set_result(results[offset : offset + n])
                offset += n

    def _take_batch(self) -> list[_Pending]:
        """Pop whole submissions up to ``max_batch`` items, dropping expired ones."""
        now = time.monotonic()
        batch: list[_Pending] = []
        size = 0
        while self._queue:
            head = self._queue[0]
            n = int(head.items.shape[0])
            if batch and size + n > self._max_batch:
                break
            self._queue.pop(0)
            self._queued_items -= n
            if head.future.done():  # the caller gave up (cancelled) while it waited
                continue
            if head.deadline is not None and head.deadline <= now:
                head.future.set_exception(TimeoutError("deadline passed before inference"))
                continue
            batch.append(head)
            size += n
        return batch
