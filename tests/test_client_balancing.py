"""The SDK spreads calls over every replica of its target (client-side round_robin).

Three real servers on loopback ports stand in for three pods behind a headless Service; the
target names all three, as DNS would. Which server took a call is read from each server's
own call counter.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from facesvc.client import (
    AsyncFaceVerificationClient,
    FaceServiceError,
    FaceVerificationClient,
    TrainingType,
)
from tests.conftest import RunningServer, ServerStarter

METHOD = "facesvc.v1.FaceVerification/GetAttempts"
CALLS = 30


def _calls(server: RunningServer) -> float:
    """GetAttempts calls this server answered, whatever their status."""
    total = 0.0
    for family in server.app.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "facesvc_grpc_calls_total" and sample.labels["method"] == METHOD:
                total += sample.value
    return total


def _counts(servers: list[RunningServer]) -> list[float]:
    """Each server's count once all CALLS are in: a server counts a call just after it has
    sent the answer, so the last one may lag the client by a moment."""
    deadline = time.monotonic() + 10
    while sum(counts := [_calls(s) for s in servers]) < CALLS and time.monotonic() < deadline:
        time.sleep(0.01)
    return counts


def _ask(client: FaceVerificationClient) -> None:
    # These servers run without an engine: UNIMPLEMENTED is a server's answer, never the
    # channel's own failure (that would be UNAVAILABLE).
    with pytest.raises(FaceServiceError) as refused:
        client.attempts("p-1", "t-1", TrainingType.SPL)
    assert refused.value.code is grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture
def three(start_server: ServerStarter, redis_url: str) -> list[RunningServer]:
    servers = [start_server(redis_url) for _ in range(3)]
    return servers


def _target(servers: list[RunningServer]) -> str:
    return "ipv4:" + ",".join(s.grpc_target for s in servers)


def test_round_robin_spreads_calls_over_every_replica(three: list[RunningServer]) -> None:
    with FaceVerificationClient(_target(three), insecure=True) as client:
        for _ in range(CALLS):
            _ask(client)
    counts = _counts(three)
    assert sum(counts) == CALLS
    assert all(c >= CALLS / 3 - 2 for c in counts), counts  # round robin: even shares


def test_pick_first_pins_every_call_to_one_replica(three: list[RunningServer]) -> None:
    """What round_robin is for: gRPC's default sends one channel's calls to one server."""
    with FaceVerificationClient(_target(three), insecure=True, load_balancing="pick_first") as c:
        for _ in range(CALLS):
            _ask(c)
    assert sorted(_counts(three)) == [0, 0, CALLS]


def test_the_async_client_balances_too(three: list[RunningServer]) -> None:
    async def main() -> None:
        async with AsyncFaceVerificationClient(_target(three), insecure=True) as client:
            for _ in range(CALLS):
                with pytest.raises(FaceServiceError, match="UNIMPLEMENTED"):
                    await client.attempts("p-1", "t-1", TrainingType.SPL)

    asyncio.run(main())
    assert all(c >= CALLS / 3 - 2 for c in _counts(three))


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        FaceVerificationClient("127.0.0.1:1", insecure=True, load_balancing="random")
