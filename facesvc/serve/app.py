"""Builds the object graph from :class:`~facesvc.config.Settings` and runs the servers.

:class:`App` owns the gRPC server (FaceVerification, health, reflection), the
HTTP server (/metrics, /healthz), the Redis client and the health probe.
``start()`` binds (port 0 picks a free port; the bound ports are in
``grpc_port`` / ``http_port``), ``stop()`` drains in-flight calls within
``server.grace_s``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.clock import SkewWatch, SystemClock
from facesvc.config import ConfigError, ServerSettings, Settings
from facesvc.engine import Engine
from facesvc.limits.abuse import ClientRateLimiter, RateRule, RpcRateLimiter
from facesvc.metrics import Metrics
from facesvc.serve.health import Health, RedisProbe
from facesvc.serve.ops_http import build_http_app
from facesvc.serve.tls import add_hsts, check_exposure, insecure_warnings, server_tls
from facesvc.store.connection import AsyncRedis, redis_from_settings
from facesvc.tokens.keys import KeyDirectory, KeyDirectoryError
from facesvc.tokens.launch import LaunchTickets
from facesvc.transport.admission import AdmissionInterceptor, InFlightLimit
from facesvc.transport.auth import (
    ApiKeyAuthenticator,
    AuthInterceptor,
    ClientRegistry,
    KeysFileError,
    http_auth_middleware,
)
from facesvc.transport.call_metrics import MetricsInterceptor
from facesvc.transport.grpc_servicer import (
    DevAuthenticator,
    FaceVerificationServicer,
)
from facesvc.transport.portal import Portal
from facesvc.transport.portal_limits import GatewayLimits
from facesvc.transport.preauth import CredentialsFirst
from facesvc.transport.validation import RequestLimits, transport_limit

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resources:
    """What an engine factory gets to build the engine from."""

    settings: Settings
    redis: AsyncRedis
    metrics: Metrics
    skew: SkewWatch
    keys: KeyDirectory | None
    """The token keys the portal also uses (one directory, one reload); None when
    ``tokens.key_dir`` could not be read at start-up (the engine then reports why)."""


EngineFactory = Callable[[Resources], Awaitable[Engine]]
"""Loads the model pack and builds the engine; runs after the servers are up, while
health says NOT_SERVING."""


def _authenticator(settings: Settings, redis: AsyncRedis) -> ApiKeyAuthenticator | None:
    """API-key and mTLS authentication with the per-client rate limit, or None when
    ``security.api_keys_file`` is unset (development: every caller is an admin, and the
    start-up banner says so)."""
    path = settings.security.api_keys_file
    if path is None:
        return None
    try:
        registry = ClientRegistry.from_file(path)
    except KeysFileError as exc:
        raise ConfigError(f"security.api_keys_file: {exc}") from None
    abuse = settings.abuse
    limiter = ClientRateLimiter(
        redis,
        RateRule(abuse.client_rate, timedelta(seconds=abuse.client_rate_window_s)),
        SystemClock(),
        key_prefix=settings.redis.key_prefix,
    )
    return ApiKeyAuthenticator(registry, RpcRateLimiter.auditing(limiter, abuse.audited_call_cost))


def _key_directory(settings: Settings) -> KeyDirectory | None:
    """The token signing keys, shared by the portal's launch tickets and the engine's tokens
    and venue passes; None (logged) when ``tokens.key_dir`` cannot be read: the page stays up
    and its API answers 503 with the fix, and the engine's start reports the same error."""
    try:
        return KeyDirectory(settings.tokens.key_dir, reload_s=settings.tokens.key_reload_s)
    except KeyDirectoryError as exc:
        log.warning("the scan page cannot issue or check launch tickets: %s", exc)
        return None


def _portal(settings: Settings, redis: AsyncRedis, keys: KeyDirectory | None) -> Portal:
    """The Scan Wajah page and its JSON API; launch tickets signed with ``keys``."""
    tickets = (
        None
        if keys is None
        else LaunchTickets(
            keys,
            redis,
            issuer=settings.tokens.issuer,
            allowed_prefixes=settings.portal.return_prefixes,
            ttl_s=settings.portal.ticket_ttl_s,
            key_prefix=settings.redis.key_prefix,
        )
    )
    return Portal(settings, tickets=tickets, keys=keys, now=SystemClock().now)


def _connection_age_options(server: ServerSettings) -> list[tuple[str, int]]:
    """gRPC server options that close each connection after ``server.max_connection_age_s``
    (see that setting), letting calls in flight finish within ``server.grace_s``."""
    if server.max_connection_age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", round(server.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", round(server.grace_s * 1000)),
    ]


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
        self.settings = settings
        # Before anything is built or bound: off loopback, TLS and API keys or nothing.
        for line in check_exposure(settings):
            log.critical(
                "*** INSECURE NETWORK, security.allow_insecure_network IS ON: DEVELOPMENT "
                "ONLY *** %s",
                line,
            )
        self._tls = server_tls(settings.security)
        self._shares_ports = settings.server.workers > 1
        self.metrics = metrics if metrics is not None else Metrics()
        self.health = Health(self.metrics)
        self.skew = SkewWatch(settings.limits.clock_skew_warn_s, settings.limits.clock_skew_max_s)
        server = settings.server
        self.redis = redis_from_settings(settings.redis)
        auth = _authenticator(settings, self.redis)
        # The Scan Wajah page and its JSON gateway (facesvc.transport.portal) share the HTTP server;
        # CreateLaunchTicket issues its tickets.
        self.keys = _key_directory(settings)
        self.portal = _portal(settings, self.redis, self.keys)
        self.servicer = FaceVerificationServicer(
            None,
            limits=RequestLimits.from_settings(server),
            authenticator=auth if auth is not None else DevAuthenticator(),
            loading=engine_factory is not None,
            launcher=self.portal,
        )
        self.http_app: web.Application = build_http_app(self.metrics, self.health)
        """Add HTTP routes here before ``start()``."""
        throughput = settings.throughput
        admission = AdmissionInterceptor(
            self.metrics,
            InFlightLimit(throughput.max_in_flight_verify),
            retry_after_s=throughput.retry_after_s,
        )
        # Refusing under overload is the cheapest answer: before authentication's Redis trip.
        interceptors: list[grpc.aio.ServerInterceptor] = [
            MetricsInterceptor(self.metrics),
            admission,
        ]
        if auth is not None:
            service = pb.DESCRIPTOR.services_by_name["FaceVerification"].full_name
            # Outermost: an anonymous call is refused before its message is read.
            interceptors.insert(0, CredentialsFirst(auth, service, self.metrics))
            interceptors.append(AuthInterceptor(auth, service))
            self.http_app.middlewares.append(http_auth_middleware(auth.registry))
        self.portal.install(self.http_app)
        # The page's API: rates per address and scan link, and scans in flight, before any
        # handler (facesvc.transport.portal_limits).
        self.gateway_limits = GatewayLimits(settings, self.redis, lambda: self.portal.tickets)
        self.http_app.middlewares.append(self.gateway_limits.middleware())
        if self._tls is not None:
            self.http_app.on_response_prepare.append(add_hsts)
        self._engine_factory = engine_factory
        self._grpc = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=server.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", transport_limit(server.max_message_bytes)),
                ("grpc.max_send_message_length", server.max_message_bytes),
                # Workers (server.workers > 1) share the port and the kernel spreads
                # connections over them. A single process keeps it to itself: a second
                # server on its port is an operator error that must fail loudly.
                ("grpc.so_reuseport", int(self._shares_ports)),
                *_connection_age_options(server),
            ],
        )
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._engine: Engine | None = None
        self.failed = asyncio.Event()
        """Set when the engine factory raised (``load_error`` says why)."""
        self.load_error: Exception | None = None
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
        for line in insecure_warnings(s.security):
            log.warning("*** INSECURE, DEVELOPMENT ONLY *** %s", line)
        if self._tls is None:
            self.grpc_port = self._grpc.add_insecure_port(address)
        else:
            self.grpc_port = self._grpc.add_secure_port(address, self._tls.grpc_credentials)
        if self.grpc_port == 0:
            raise OSError(f"could not bind gRPC to {address}")
        await self.health.publish()  # NOT_SERVING until the probe and models say otherwise
        await self._grpc.start()

        # aiohttp waits 60 s for open keep-alive connections by default; the drain bound
        # for HTTP is the same grace as for gRPC.
        self._runner = web.AppRunner(
            self.http_app, access_log=None, shutdown_timeout=s.server.grace_s
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            s.server.http_host,
            s.server.http_port,
            ssl_context=None if self._tls is None else self._tls.http_context,
            reuse_port=self._shares_ports,
        )
        await site.start()
        self.http_port = int(self._runner.addresses[0][1])
        scheme = "http" if self._tls is None else "https"
        self.portal.serve_at(f"{scheme}://{s.server.http_host}:{self.http_port}")

        probe = RedisProbe(
            self.redis,
            self.health,
            s.redis.health_interval_s,
            s.redis.health_timeout_s,
            clock=SystemClock(),
            skew=self.skew,
            metrics=self.metrics,
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
        resources = Resources(self.settings, self.redis, self.metrics, self.skew, self.keys)
        try:
            engine = await self._engine_factory(resources)
        except Exception as exc:
            # A service that cannot verify must not look alive: health stays NOT_SERVING
            # and `facesvc serve` exits non-zero with the reason.
            log.critical("the engine failed to load: %s", exc)
            self.load_error = exc
            self.failed.set()
            return
        self._engine = engine
        self.servicer.attach_engine(engine)
        self.portal.attach_engine(engine)
        await self.health.set_models_ready(True)
        log.info("engine ready", extra={"model_pack": self.settings.models.pack})

    async def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, stop accepting calls, let in-flight calls finish within
        ``grace_s`` (default ``server.grace_s``), then release everything.

        Each step is bounded: a step that overruns is logged and skipped, so that a stop
        (SIGTERM) always ends the process within about ``grace_s`` + 4 x ``_STEP_SLACK_S``.
        """
        grace = self.settings.server.grace_s if grace_s is None else grace_s
        await self.health.enter_shutdown()
        log.info("draining", extra={"grace_s": grace})
        await _bounded("the gRPC drain", self._grpc.stop(grace), grace + _STEP_SLACK_S)
        for task in self._tasks:
            task.cancel()
        await _bounded(
            "background tasks", asyncio.gather(*self._tasks, return_exceptions=True), _STEP_SLACK_S
        )
        if self._engine is not None:
            await _bounded("the engine's model workers", self._engine.close(), _STEP_SLACK_S)
        if self._runner is not None:
            await _bounded("the HTTP drain", self._runner.cleanup(), grace + _STEP_SLACK_S)
        await _bounded("closing Redis", self.redis.aclose(), _STEP_SLACK_S)
        log.info("stopped")


_STEP_SLACK_S = 5.0
"""How long a shutdown step may overrun its own bound before stop() gives up on it."""


async def _bounded(step: str, work: Awaitable[Any], within_s: float) -> None:
    try:
        async with asyncio.timeout(within_s):
            await work
    except TimeoutError:
        log.error("stopping: %s did not finish within %.1f s; going on without it", step, within_s)
