"""Builds the object graph from :class:`~facesvc.config.Settings` and runs the servers.

:class:`App` owns the gRPC server (FaceVerification, health, reflection), the
HTTP server (/metrics, /healthz), the Redis client and the health probe.
``start()`` binds (port 0 picks a free port; the bound ports are in
``grpc_port`` / ``http_port``), ``stop()`` drains in-flight calls within
``server.grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.config import ConfigError, Settings
from facesvc.grpc_api import (
    DevAuthenticator,
    Engine,
    FaceVerificationServicer,
    MetricsInterceptor,
)
from facesvc.health import Health, RedisProbe
from facesvc.http_api import build_http_app
from facesvc.metrics import Metrics
from facesvc.redis_client import AsyncRedis, redis_client_from_url
from facesvc.validation import RequestLimits, transport_limit

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resources:
    """What an engine factory gets to build the engine from."""

    settings: Settings
    redis: AsyncRedis
    metrics: Metrics


EngineFactory = Callable[[Resources], Awaitable[Engine]]
"""Loads the model pack and builds the engine; runs after the servers are up, while
health says NOT_SERVING."""


def _grpc_credentials(settings: Settings) -> Any | None:
    sec = settings.security
    if sec.tls_cert is None or sec.tls_key is None:
        return None
    ca = sec.tls_ca.read_bytes() if sec.tls_ca is not None else None
    return grpc.ssl_server_credentials(
        [(sec.tls_key.read_bytes(), sec.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _http_ssl(settings: Settings) -> ssl.SSLContext | None:
    sec = settings.security
    if sec.tls_cert is None or sec.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sec.tls_cert, sec.tls_key)
    return ctx


def _load_plugin(spec: str) -> Callable[[Any, Settings], None]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"server.plugins: {spec!r} is not module:function")
    plugin: Callable[[Any, Settings], None] = getattr(importlib.import_module(module_name), attr)
    return plugin


class App:
    """The running service. Construct, ``await start()``, ``await stop()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        engine_factory: EngineFactory | None = None,
    ) -> None:
        if settings.security.api_keys_file is not None:
            raise ConfigError(
                "security.api_keys_file is set, but API-key authentication arrives with "
                "issue 10; unset it to run without authentication"
            )
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.health = Health(self.metrics)
        server = settings.server
        self.redis = redis_client_from_url(
            settings.redis.url,
            socket_connect_timeout_s=settings.redis.connect_timeout_s,
            socket_timeout_s=settings.redis.socket_timeout_s,
        )
        self.servicer = FaceVerificationServicer(
            None,
            limits=RequestLimits.from_settings(server),
            authenticator=DevAuthenticator(),
            loading=engine_factory is not None,
        )
        self.http_app: web.Application = build_http_app(self.metrics, self.health)
        """Add HTTP routes here before ``start()``."""
        self._engine_factory = engine_factory
        self._grpc = grpc.aio.server(
            interceptors=[MetricsInterceptor(self.metrics)],
            maximum_concurrent_rpcs=server.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", transport_limit(server.max_message_bytes)),
                ("grpc.max_send_message_length", server.max_message_bytes),
                # One process per port: a second server on the same port is an
                # operator error that must fail loudly, not share traffic.
                ("grpc.so_reuseport", 0),
            ],
        )
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.grpc_port = 0
        self.http_port = 0

    async def start(self) -> None:
        """Bind and start both servers, the health probe and (if any) engine loading."""
        s = self.settings
        pb_grpc.add_FaceVerificationServicer_to_server(self.servicer, self._grpc)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._grpc)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["FaceVerification"].full_name,
                "grpc.health.v1.Health",
                reflection.SERVICE_NAME,
            ),
            self._grpc,
        )
        for spec in s.server.plugins:
            _load_plugin(spec)(self._grpc, s)
        address = f"{s.server.grpc_host}:{s.server.grpc_port}"
        credentials = _grpc_credentials(s)
        if credentials is None:
            log.warning("gRPC is plaintext (no security.tls_cert): for local development only")
            self.grpc_port = self._grpc.add_insecure_port(address)
        else:
            self.grpc_port = self._grpc.add_secure_port(address, credentials)
        if self.grpc_port == 0:
            raise OSError(f"could not bind gRPC to {address}")
        await self.health.publish()  # NOT_SERVING until the probe and models say otherwise
        await self._grpc.start()

        self._runner = web.AppRunner(self.http_app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, s.server.http_host, s.server.http_port, ssl_context=_http_ssl(s)
        )
        await site.start()
        self.http_port = int(self._runner.addresses[0][1])

        probe = RedisProbe(
            self.redis, self.health, s.redis.health_interval_s, s.redis.health_timeout_s
        )
        self._tasks.append(asyncio.create_task(probe.run(), name="redis-probe"))
        if self._engine_factory is None:
            await self.health.set_models_ready(True)
        else:
            self._tasks.append(asyncio.create_task(self._load_engine(), name="engine-load"))
        log.info(
            "listening",
            extra={
                "grpc": f"{s.server.grpc_host}:{self.grpc_port}",
                "http": f"{s.server.http_host}:{self.http_port}",
            },
        )

    async def _load_engine(self) -> None:
        assert self._engine_factory is not None
        resources = Resources(self.settings, self.redis, self.metrics)
        engine = await self._engine_factory(resources)
        self.servicer.attach_engine(engine)
        await self.health.set_models_ready(True)
        log.info("engine ready", extra={"model_pack": self.settings.models.pack})

    async def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, stop accepting calls, let in-flight calls finish within
        ``grace_s`` (default ``server.grace_s``), then release everything."""
        grace = self.settings.server.grace_s if grace_s is None else grace_s
        await self.health.enter_shutdown()
        log.info("draining", extra={"grace_s": grace})
        await self._grpc.stop(grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        await self.redis.aclose()
        log.info("stopped")
