"""One factory that turns a ``FACESVC_REDIS_URL`` into an asyncio Redis client.

Accepted URLs (credentials go in the usual ``user:password@`` part):

``redis://host:6379/0``, ``rediss://host:6380/0``, ``unix:///run/redis.sock``
    A single server (or a proxy), plain TCP, TLS or a Unix socket; redis-py's own parser.
``redis+cluster://host:7000`` (``rediss+cluster://`` for TLS)
    Redis Cluster: one or more seed nodes (extra seeds as ``,host:port`` after the first);
    the client discovers the rest and routes each key by slot. ``cluster=True`` does the same
    for a plain ``redis://`` URL.
``redis+sentinel://host1:26379,host2:26379/mymaster/0`` (``rediss+sentinel://`` for TLS)
    Redis Sentinel: the sentinels to ask, then the master's service name and an optional DB.
    The client follows failovers; the credentials are the master's.

Every client gets the same socket timeouts and a small connection-retry budget, so a server
that is down costs a request about ``retries * socket_connect_timeout_s`` before the caller
sees :class:`facesvc.store.errors.StoreUnavailable` (fail closed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias, cast
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff

from facesvc.config import RedisSettings

#: Either kind of client; both run the same commands and Lua scripts for single-slot keys.
AsyncRedis: TypeAlias = Redis | RedisCluster


def redis_client_from_url(
    url: str,
    *,
    socket_timeout_s: float = 0.5,
    socket_connect_timeout_s: float = 0.5,
    retries: int = 1,
    cluster: bool = False,
    max_connections: int | None = None,
) -> AsyncRedis:
    """Build an asyncio client for ``url`` (see the module docstring for the schemes).

    ``socket_timeout_s`` bounds each command's wait for a reply and ``socket_connect_timeout_s``
    each connection attempt, in seconds. ``retries`` is how many times a command is re-sent
    after a connection error or timeout; the Lua scripts here are safe to re-send (they carry
    the reservation id), so one retry lets a pooled connection that died in a Redis restart
    reconnect without failing a request. ``max_connections`` caps the pool (None: redis-py's
    default). Raises ValueError for an unknown scheme or a malformed sentinel URL.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_connect_timeout_s,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries),
    }
    if max_connections is not None:
        common["max_connections"] = max_connections
    if scheme in ("redis+cluster", "rediss+cluster") or (cluster and scheme in ("redis", "rediss")):
        return _cluster_client(url, scheme.removesuffix("+cluster"), common)
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return _sentinel_client(url, tls=scheme == "rediss+sentinel", common=common)
    if scheme in ("redis", "rediss", "unix"):
        return Redis.from_url(url, **common)
    raise ValueError(
        f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss://, unix://, "
        "redis+cluster://, rediss+cluster://, redis+sentinel:// or rediss+sentinel://"
    )


def redis_from_settings(settings: RedisSettings) -> AsyncRedis:
    """The client for ``[redis]``: its URL and its connect and reply timeouts. The one way the
    service and its commands reach Redis, so none of them waits on Redis unbounded."""
    return redis_client_from_url(
        settings.url,
        socket_connect_timeout_s=settings.connect_timeout_s,
        socket_timeout_s=settings.socket_timeout_s,
    )


def _cluster_client(url: str, scheme: str, common: dict[str, Any]) -> RedisCluster:
    """A cluster client seeded from every ``host:port`` in the URL's comma-separated netloc."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds = [_host_port(item, default_port=6379) for item in hosts.split(",") if item]
    if not seeds:
        raise ValueError(f"Redis Cluster URL names no node: {url!r}")
    first = f"{scheme}://{credentials + '@' if credentials else ''}{seeds[0][0]}:{seeds[0][1]}"
    kwargs = dict(common)  # max_connections, when given, is per node in a cluster
    if len(seeds) > 1:
        kwargs["startup_nodes"] = [ClusterNode(host, port) for host, port in seeds]
    return RedisCluster.from_url(first, **kwargs)


def _sentinel_client(url: str, *, tls: bool, common: dict[str, Any]) -> Redis:
    """A client for the master that the sentinels in ``url`` name; follows failovers."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    sentinels = [_host_port(item, default_port=26379) for item in hosts.split(",") if item]
    path = [segment for segment in parts.path.split("/") if segment]
    if not sentinels or not path or len(path) > 2:
        raise ValueError(
            "Sentinel URL must look like redis+sentinel://host:26379[,host:26379]/master[/db] "
            f"(got {url!r})"
        )
    username, _, password = credentials.partition(":")
    master_kwargs: dict[str, Any] = dict(common)
    master_kwargs["db"] = int(path[1]) if len(path) == 2 else 0
    if username:
        master_kwargs["username"] = unquote(username)
    if password:
        master_kwargs["password"] = unquote(password)
    if tls:
        master_kwargs["ssl"] = True
    sentinel = Sentinel(
        sentinels,
        sentinel_kwargs={
            "socket_timeout": common["socket_timeout"],
            "socket_connect_timeout": common["socket_connect_timeout"],
            "ssl": tls,
        },
        **master_kwargs,
    )
    return cast(Redis, sentinel.master_for(unquote(path[0])))


def _host_port(item: str, *, default_port: int) -> tuple[str, int]:
    """Split ``host[:port]`` or ``[ipv6][:port]`` into host and port."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    return host, int(port) if port else default_port


async def scan_keys(
    client: AsyncRedis, pattern: str, *, slot_of: str | None = None, count: int = 500
) -> AsyncIterator[str]:
    """Yield every key matching the SCAN MATCH ``pattern`` (SCAN, never KEYS: no blocking).

    ``slot_of`` is any key whose hash tag every match shares (e.g. a participant's
    ``<prefix>:{p:<id>}``): on a cluster only the primary owning that slot is scanned; without
    it every primary is. ``count`` is SCAN's per-call hint. A key written during the scan may
    or may not be seen (SCAN's guarantee). Keys are yielded as text (the service's keys are
    ASCII by construction).
    """
    if isinstance(client, RedisCluster) and slot_of is not None:
        node = client.get_node_from_key(slot_of)
        if node is None:
            raise RuntimeError(f"no cluster node owns the slot of {slot_of!r}")
        cursor = 0
        while True:
            # With one target node redis-py answers ({node name: cursor}, keys).
            reply = cast(
                tuple[dict[str, int], list[bytes | str]],
                await client.scan(cursor, match=pattern, count=count, target_nodes=node),
            )
            for key in reply[1]:
                yield reply_text(key)
            cursor = reply[0][node.name]
            if cursor == 0:
                return
    async for key in client.scan_iter(match=pattern, count=count):
        yield reply_text(key)


def reply_text(value: bytes | str) -> str:
    """A reply item (key, field) as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value
