"""What the Scan Wajah gateway lets one browser cost: rate limits per client address and per
scan link, and a bound on scans in flight (issue 18.1).

A scan with no face in it is refunded, so without these a page could send frames for free
all day: two large frames took 7.7 s of server CPU with no attempt used. The gateway's
``/api/v1`` calls therefore pass, before their handler runs:

1. a bound on scans (``POST /api/v1/verify``) this worker serves at once
   (``portal.max_in_flight_scans``): beyond it, 429 BUSY at once, with ``Retry-After``;
2. a rate per client address (``portal.client_rate`` per ``portal.rate_window_s``): the TCP
   peer, or with ``portal.client_address_header`` the address the reverse proxy in front
   recorded; IPv6 clients count per /64, the block one subscriber gets;
3. a rate per scan link (``portal.ticket_rate``), by the launch ticket's id.

Both rates are the sliding-window counters of :class:`~facesvc.limits.abuse.ClientRateLimiter`
in Redis, shared by every worker and replica; a scan counts :data:`SCAN_COST` requests, any
other call one. Over a rate: 429 RATE_LIMITED with ``Retry-After`` (whole seconds). When Redis
cannot answer, the call fails closed: 503, like every other store failure of the gateway.
A call without a valid ticket is still counted against its address, then refused by the
gateway as before.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import timedelta

from aiohttp import web

from facesvc.clock import Clock, SystemClock
from facesvc.config import Settings
from facesvc.limits.abuse import ClientRateLimiter, RateRule
from facesvc.store.connection import AsyncRedis
from facesvc.store.errors import StoreUnavailable
from facesvc.tokens.launch import LaunchTickets, TicketRefused
from facesvc.transport.admission import InFlightLimit
from facesvc.transport.auth import bearer_key

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/"
SCAN_PATH = "/api/v1/verify"
SCAN_COST = 10
"""A scan (up to server.max_frames frames) counts as this many requests against both rates;
a pre-check (one frame), the session or a challenge as one."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def client_address(request: web.Request, header: str) -> str:
    """The id the client's rate is kept under: its IPv4 address, or its IPv6 /64 network.

    With ``header`` (e.g. ``X-Forwarded-For``), the last address in it: the one the reverse
    proxy in front appended, which the client cannot forge (earlier ones it can). Without a
    usable address, ``unknown`` (all such calls share one rate).
    """
    raw = request.remote or ""
    if header:
        forwarded = request.headers.get(header, "")
        if forwarded.strip():
            raw = forwarded.split(",")[-1].strip()
    try:
        address = ipaddress.ip_address(raw.strip("[]"))
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((address, 64), strict=False)
        return "v6-" + network.network_address.exploded.replace(":", "")[:16]
    return str(address)


def _refusal(status: int, code: str, message: str, retry_after_s: float) -> web.Response:
    response = web.json_response({"error": {"code": code, "message": message}}, status=status)
    response.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    response.headers["Cache-Control"] = "no-store"
    return response


class GatewayLimits:
    """The three limits of the module doc; :meth:`middleware` applies them."""

    def __init__(
        self,
        settings: Settings,
        redis: AsyncRedis,
        tickets: Callable[[], LaunchTickets | None],
        clock: Clock | None = None,
    ) -> None:
        portal = settings.portal
        window = timedelta(seconds=portal.rate_window_s)
        clock = clock or SystemClock()
        prefix = settings.redis.key_prefix.removesuffix(":")
        # Key spaces of their own: an address or a ticket id never shares a counter with an
        # API client of the same name.
        self._per_client = ClientRateLimiter(
            redis, RateRule(portal.client_rate, window), clock, key_prefix=f"{prefix}:gw-client"
        )
        self._per_ticket = ClientRateLimiter(
            redis, RateRule(portal.ticket_rate, window), clock, key_prefix=f"{prefix}:gw-ticket"
        )
        self._scans = InFlightLimit(portal.max_in_flight_scans)
        self._retry_after_s = settings.throughput.retry_after_s
        self._address_header = portal.client_address_header
        self._tickets = tickets

    @property
    def scans_in_flight(self) -> int:
        return self._scans.held

    def _ticket_id(self, request: web.Request) -> str | None:
        """The id of the request's launch ticket when it is genuine, else None (the gateway
        itself then refuses the call, with the reason)."""
        tickets = self._tickets()
        token = bearer_key(request.headers.get("Authorization", ""))
        if tickets is None or token is None:
            return None
        try:
            return tickets.open(token).ticket_id
        except TicketRefused:
            return None

    async def _over_rate(self, request: web.Request, cost: int) -> web.Response | None:
        """A 429 when the client address or the ticket is over its rate, else None (and the
        call is counted). Raises StoreUnavailable."""
        address = client_address(request, self._address_header)
        wait_s = await self._per_client.admit(address, min(cost, self._per_client.limit))
        if wait_s is not None:
            return _refusal(
                429,
                "RATE_LIMITED",
                f"too many requests from your network; wait {math.ceil(wait_s)} s and retry",
                wait_s,
            )
        ticket_id = self._ticket_id(request)
        if ticket_id is None:
            return None
        wait_s = await self._per_ticket.admit(ticket_id, min(cost, self._per_ticket.limit))
        if wait_s is not None:
            return _refusal(
                429,
                "RATE_LIMITED",
                f"too many requests for this scan link; wait {math.ceil(wait_s)} s and retry",
                wait_s,
            )
        return None

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        limits = self

        @web.middleware
        async def gateway_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not request.path.startswith(API_PREFIX):
                return await handler(request)
            scan = request.method == "POST" and request.path == SCAN_PATH
            # The cheapest refusal first: a full worker answers without a Redis round trip.
            if scan and not limits._scans.try_enter():
                return _refusal(
                    429,
                    "BUSY",
                    f"the service is busy with {limits._scans.limit} scans; your scan was not "
                    "sent for checking and no attempt was used: retry in a moment",
                    limits._retry_after_s,
                )
            try:
                try:
                    refused = await limits._over_rate(request, SCAN_COST if scan else 1)
                except StoreUnavailable:
                    log.warning("gateway call refused: its rate could not be checked")
                    response = web.json_response(
                        {
                            "error": {
                                "code": "UNAVAILABLE",
                                "message": "the service cannot reach its store; retry in a minute",
                            }
                        },
                        status=503,
                    )
                    response.headers["Cache-Control"] = "no-store"
                    return response
                if refused is not None:
                    return refused
                return await handler(request)
            finally:
                if scan:
                    limits._scans.leave()

        return gateway_limits
