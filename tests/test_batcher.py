"""The micro-batcher shares model calls between concurrent requests and sheds overload."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import numpy.typing as npt
import pytest

from facesvc.models.batcher import MicroBatcher, Overloaded


class CountingModel:
    """Row i of the output is the sum of input i, so routing mistakes show."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batch_sizes: list[int] = []
        self.gate = gate

    def __call__(self, batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batch_sizes.append(int(batch.shape[0]))
        return batch.reshape(batch.shape[0], -1).sum(axis=1).astype(np.float32)[:, None]


def items(values: list[int]) -> npt.NDArray[np.uint8]:
    return np.array(values, dtype=np.uint8).reshape(-1, 1, 1, 1)


async def test_concurrent_requests_share_one_call_and_get_their_own_rows() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=8, max_wait_s=2.0, max_queue=64)
    results = await asyncio.gather(*(batcher.submit(items([i, i])) for i in range(4)))
    await batcher.close()
    assert model.batch_sizes == [8]  # a full batch leaves without waiting out max_wait
    for i, row in enumerate(results):
        assert row.ravel().tolist() == [i, i]


async def test_batches_never_exceed_max_batch() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=3, max_wait_s=0.01, max_queue=64)
    await asyncio.gather(*(batcher.submit(items([1])) for _ in range(10)))
    await batcher.close()
    assert sum(model.batch_sizes) == 10
    assert max(model.batch_sizes) <= 3


async def test_a_lone_request_is_answered_without_waiting_for_company() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=8, max_wait_s=60.0, max_queue=8)
    for value in (7, 8):  # one caller after another: never held for max_wait
        result = await asyncio.wait_for(batcher.submit(items([value])), timeout=10)
        assert result.ravel().tolist() == [value]
    await batcher.close()
    assert model.batch_sizes == [1, 1]


async def test_after_a_shared_batch_a_short_one_waits_for_company() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=8, max_wait_s=0.5, max_queue=64)
    await asyncio.gather(batcher.submit(items([1])), batcher.submit(items([2])))
    early = asyncio.create_task(batcher.submit(items([3])))
    await asyncio.sleep(0.05)  # the next caller comes a moment later, within max_wait
    late = asyncio.create_task(batcher.submit(items([4])))
    await asyncio.wait_for(asyncio.gather(early, late), timeout=10)
    await batcher.close()
    assert model.batch_sizes == [2, 2]


async def test_a_full_queue_refuses_at_once() -> None:
    gate = threading.Event()
    model = CountingModel(gate)
    batcher = MicroBatcher(model, max_batch=2, max_wait_s=0.0, max_queue=2)
    first = asyncio.create_task(batcher.submit(items([1, 2])))
    await asyncio.sleep(0.05)  # the first batch is now inside the (blocked) model
    queued = asyncio.create_task(batcher.submit(items([3, 4])))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await batcher.submit(items([5]))
    gate.set()
    assert (await first).ravel().tolist() == [1, 2]
    assert (await queued).ravel().tolist() == [3, 4]
    await batcher.close()


async def test_work_past_its_deadline_is_dropped_not_computed() -> None:
    model = CountingModel()
    batcher = MicroBatcher(model, max_batch=4, max_wait_s=0.0, max_queue=8)
    with pytest.raises(TimeoutError):
        await batcher.submit(items([1]), deadline=time.monotonic() - 1)
    await batcher.close()
    assert model.batch_sizes == []


async def test_a_model_error_reaches_every_caller_in_the_batch() -> None:
    def broken(batch: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        raise RuntimeError("model exploded")

    batcher = MicroBatcher(broken, max_batch=4, max_wait_s=0.05, max_queue=8)
    results = await asyncio.gather(
        *(batcher.submit(items([1])) for _ in range(3)), return_exceptions=True
    )
    await batcher.close()
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
