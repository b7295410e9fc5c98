"""The Scan Wajah page and its JSON gateway, on the service's aiohttp application.

Browsers cannot speak native gRPC, so the page talks to these routes; they drive the same
engine as the gRPC transport and, like it, compute nothing themselves::

    GET  /scan/                   the page (index.html); its assets under /scan/<name>
    GET  /.well-known/jwks.json   the published token keys (RFC 7517)
    GET  /api/v1/session          what the launch ticket allows and today's attempts
    POST /api/v1/challenge        a liveness challenge for the ticket's scan
    POST /api/v1/precheck         one camera frame (raw image/jpeg body) through the quality
                                  gates, for live guidance; costs no attempt
    POST /api/v1/verify           multipart/form-data: ``frame`` files (JPEG/PNG/WebP, in
                                  capture order), ``challenge_id``, ``idempotency_key``

Every ``/api/v1`` call carries the launch ticket as ``Authorization: Bearer <ticket>``
(see :mod:`facesvc.tokens.launch`); who is verified, for what, and the return URL come only from
the ticket. Answers are JSON; failures are ``{"error": {"code", "message"}}`` where the
message says what to do next. Decisions (NOT_MATCHED, ATTEMPTS_EXHAUSTED, ...) are 200
answers, as in gRPC.

Frames travel as multipart files rather than base64 JSON: a third smaller, and streamed
part by part against the per-frame byte limit instead of being buffered whole.

Every response carries a strict Content-Security-Policy (scripts, styles and connections
to this origin only, no inline code, no framing), X-Frame-Options, a no-referrer policy
(the page URL holds the ticket in its fragment) and nosniff.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Protocol

from aiohttp import BodyPartReader, web

from facesvc.config import Settings
from facesvc.domain import Decision, Gate, LivenessMethod, TrainingType
from facesvc.engine import (
    Caller,
    FrameReport,
    VerifyCommand,
    VerifyOutcome,
)
from facesvc.limits.caps import CapUsage
from facesvc.liveness.challenges import Challenge
from facesvc.tokens.keys import (
    NoSigningKeyError,
    PublicKeySource,
)
from facesvc.tokens.launch import (
    LaunchScope,
    LaunchTicket,
    LaunchTickets,
    return_url_with_token,
)
from facesvc.transport.auth import bearer_key
from facesvc.transport.status import status_of

log = logging.getLogger(__name__)

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob: mediastream:; connect-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Permissions-Policy": "camera=(self), microphone=(), geolocation=()",
    "Cross-Origin-Opener-Policy": "same-origin",
}
"""Set on every HTTP response of the service (page, API, JWKS, metrics)."""

PAGE_PATH = "/scan/"
"""Where the page is served; a launch sends the browser to ``<base>/scan/#ticket=...``."""

_ASSETS: Mapping[str, str] = {
    "app.js": "text/javascript",
    "i18n.js": "text/javascript",
    "styles.css": "text/css",
}
_VERSION_MARK = "__VERSION__"
_MAX_FIELD_CHARS = 128
_FRAMES_PER_POSE = 2
"""Frames the page takes per pose (the frontal one and each challenge step)."""
_PRECHECK_CONCURRENCY = 2
"""Pre-checks run at once per process; more are refused (503) rather than queued."""
_PASSIVE_MIN_FRAMES = 3
"""Frames of a scan without a challenge: several frames are the service's own lever on
accuracy (docs/accuracy.md), and a few JPEGs of 640 px are still small."""


_HOLD_SLACK_S = 30.0
"""A scan holds its ticket this long beyond portal.verify_timeout_s (after which the engine
drops its model work): a server that dies mid-scan frees the ticket then."""


def _caller(ticket: LaunchTicket) -> Caller:
    """Who the page's calls act as: the LMS tenant that issued the ticket (CreateLaunchTicket
    checked it may act for the participant, and the engine checks again)."""
    return Caller(name="scan-page", role="portal", tenant=ticket.scope.tenant)


class ScanEngine(Protocol):
    """What the gateway uses of :class:`facesvc.engine.Engine`."""

    async def verify(self, cmd: VerifyCommand) -> VerifyOutcome: ...

    async def start_challenge(
        self,
        participant_id: str,
        training_id: str,
        training_type: TrainingType,
        gate: Gate,
        *,
        caller: Caller,
    ) -> Challenge: ...

    async def attempts(
        self, participant_id: str, training_id: str, training_type: TrainingType, *, caller: Caller
    ) -> CapUsage: ...

    async def inspect(self, frame: bytes) -> FrameReport: ...

    def liveness_method(self, training_type: TrainingType, caller: Caller) -> LivenessMethod: ...


class ApiError(Exception):
    """A refusal the gateway answers as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Asset:
    """One static file, read once at start-up."""

    body: bytes
    content_type: str
    etag: str


def _load_assets() -> tuple[Asset, dict[str, Asset], str]:
    """The page (with asset URLs versioned by content hash), its assets, and the version."""
    root = resources.files("facesvc") / "web"
    assets: dict[str, Asset] = {}
    digest = hashlib.sha256()
    for name, content_type in _ASSETS.items():
        body = (root / name).read_bytes()
        digest.update(body)
        assets[name] = Asset(body, content_type, _etag(body))
    version = digest.hexdigest()[:12]
    html = (root / "index.html").read_text(encoding="utf-8").replace(_VERSION_MARK, version)
    page = html.encode()
    return Asset(page, "text/html", _etag(page)), assets, version


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _usage_json(usage: CapUsage) -> dict[str, Any]:
    return {
        "used": usage.used,
        "remaining": usage.remaining,
        "limit": usage.limit,
        "resets_at": _iso(usage.resets_at),
    }


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class Portal:
    """The page, its assets, JWKS and the JSON gateway; ``install`` adds the routes.

    ``tickets`` is ``None`` when the token key directory cannot be read (the API then
    answers 503 saying so); ``engine`` arrives with :meth:`attach_engine` once the model
    pack has loaded (503 "starting" until then).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tickets: LaunchTickets | None,
        keys: PublicKeySource | None,
        now: Callable[[], datetime],
        engine: ScanEngine | None = None,
    ) -> None:
        self._settings = settings
        self._tickets = tickets
        self._keys = keys
        self._now = now
        self._engine = engine
        self._page, self._assets, self._version = _load_assets()
        # Pre-checks are advice: a few at a time at most, so they never crowd out scans.
        self._precheck_slots = asyncio.Semaphore(_PRECHECK_CONCURRENCY)
        self._base_url = settings.portal.public_url.rstrip("/")

    def attach_engine(self, engine: ScanEngine) -> None:
        """Serve scans with ``engine`` from now on."""
        self._engine = engine

    @property
    def tickets(self) -> LaunchTickets | None:
        """The launch tickets (None when the token key directory cannot be read)."""
        return self._tickets

    def serve_at(self, base_url: str) -> None:
        """The HTTP server's own URL, known once it is bound: the base of page URLs unless
        ``portal.public_url`` names another."""
        if not self._settings.portal.public_url:
            self._base_url = base_url.rstrip("/")

    def launch(self, scope: LaunchScope) -> tuple[LaunchTicket, str]:
        """A ticket for ``scope`` and the page URL carrying it (CreateLaunchTicket).

        Raises ``LaunchRefused`` (a bad field, or a return URL outside the tenant's
        allowlist) and ``NoSigningKeyError`` (no usable token key).
        """
        if self._tickets is None:
            raise NoSigningKeyError(
                f"the token key directory {self._settings.tokens.key_dir} cannot be read: "
                "run `facesvc keys generate` (tickets are signed with the token keys)"
            )
        ticket = self._tickets.issue(scope)
        return ticket, self.page_url(ticket)

    def page_url(self, ticket: LaunchTicket) -> str:
        """The Scan Wajah page URL for ``ticket``, which rides in the fragment."""
        return f"{self._base_url}{PAGE_PATH}#ticket={ticket.token}"

    def install(self, app: web.Application) -> None:
        """Add the routes and the security headers to ``app`` (before it starts)."""
        app.on_response_prepare.append(_add_security_headers)
        app.router.add_get("/scan", self._redirect_to_page)
        app.router.add_get(PAGE_PATH, self._page_handler)
        app.router.add_get(PAGE_PATH + "{name}", self._asset_handler)
        app.router.add_get("/.well-known/jwks.json", self._jwks_handler)
        app.router.add_get("/api/v1/session", self._api(self._session))
        app.router.add_post("/api/v1/challenge", self._api(self._challenge))
        app.router.add_post("/api/v1/verify", self._api(self._verify, checks_spent=True))
        app.router.add_post("/api/v1/precheck", self._api(self._precheck))

    # ------------------------------------------------------------------ static

    async def _redirect_to_page(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(PAGE_PATH)

    async def _page_handler(self, request: web.Request) -> web.StreamResponse:
        # Revalidated on every visit (cheap with the ETag) so a release reaches every browser.
        return self._static(request, self._page, "no-cache")

    async def _asset_handler(self, request: web.Request) -> web.StreamResponse:
        asset = self._assets.get(request.match_info["name"])
        if asset is None:
            raise web.HTTPNotFound(text="no such file")
        # The page names assets with ?v=<content hash>, so such a URL never changes content.
        versioned = request.query.get("v") == self._version
        cache = "public, max-age=31536000, immutable" if versioned else "no-cache"
        return self._static(request, asset, cache)

    def _static(self, request: web.Request, asset: Asset, cache: str) -> web.StreamResponse:
        headers = {"Cache-Control": cache, "ETag": asset.etag}
        if request.headers.get("If-None-Match") == asset.etag:
            return web.Response(status=304, headers=headers)
        response = web.Response(
            body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers
        )
        response.enable_compression()  # slow phone links: the assets shrink about 4x
        return response

    async def _jwks_handler(self, request: web.Request) -> web.StreamResponse:
        if self._keys is None:
            return _error(
                503, "NO_KEYS", "no token signing keys are configured: run `facesvc keys generate`"
            )
        body = self._keys.public_keys(self._now()).to_json()
        max_age = self._settings.tokens.jwks_max_age_s
        return web.Response(
            text=body,
            content_type="application/json",
            headers={
                "Cache-Control": f"public, max-age={max_age}",
                # LMS front-ends may fetch the keys from a browser, too.
                "Access-Control-Allow-Origin": "*",
            },
        )

    # ------------------------------------------------------------------ API plumbing

    def _api(
        self,
        handler: Callable[[web.Request, LaunchTicket], Awaitable[dict[str, Any]]],
        *,
        checks_spent: bool = False,
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Wrap ``handler``: open the ticket, map refusals to JSON errors, never cache.
        A ``handler`` that ``checks_spent`` calls ``check_unspent`` itself."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                ticket = self._open_ticket(request)
                if not checks_spent:
                    await self._launch_tickets().check_unspent(ticket)
                body = await handler(request, ticket)
                response = web.json_response(body)
            except ApiError as exc:
                response = _error(exc.status, exc.code, str(exc))
            except web.HTTPException:
                raise
            except Exception as exc:  # every refusal has its status; anything else is a bug
                status = status_of(exc)
                response = web.json_response(status.json_body(), status=status.http_status)
                if status.retry_after_s is not None:
                    response.headers["Retry-After"] = str(status.retry_after_s)
            response.headers["Cache-Control"] = "no-store"
            return response

        return wrapped

    def _launch_tickets(self) -> LaunchTickets:
        if self._tickets is None:
            raise ApiError(
                503, "NO_KEYS", "this service has no signing keys, so it cannot check scan links"
            )
        return self._tickets

    def _open_ticket(self, request: web.Request) -> LaunchTicket:
        """The request's ticket, checked but not yet against Redis (``check_unspent``)."""
        tickets = self._launch_tickets()
        credential = bearer_key(request.headers.get("Authorization", ""))
        if credential is None:
            raise ApiError(
                401,
                "TICKET_MISSING",
                "open the face scan from your training page: this request has no scan link",
            )
        return tickets.open(credential)

    def _engine_or_busy(self) -> ScanEngine:
        if self._engine is None:
            raise ApiError(503, "STARTING", "the service is starting; retry in a few seconds")
        return self._engine

    # ------------------------------------------------------------------ API routes

    async def _session(self, request: web.Request, ticket: LaunchTicket) -> dict[str, Any]:
        scope = ticket.scope
        engine = self._engine_or_busy()
        usage = await engine.attempts(
            scope.participant_id, scope.training_id, scope.training_type, caller=_caller(ticket)
        )
        return {
            "training_id": scope.training_id,
            "training_type": scope.training_type.value,
            "gate": scope.gate.value,
            "session_id": scope.session_id,
            "return_url": scope.return_url,
            "ticket_expires_at": _iso(ticket.expires_at),
            "attempts": _usage_json(usage),
            "liveness": engine.liveness_method(scope.training_type, _caller(ticket)).value,
            "capture": {
                "frame_width_px": self._settings.portal.frame_width_px,
                "frames_per_pose": _FRAMES_PER_POSE,
                "min_frames": _PASSIVE_MIN_FRAMES,
                "max_frames": self._settings.server.max_frames,
                "verify_timeout_ms": round(self._settings.portal.verify_timeout_s * 1000),
            },
        }

    async def _challenge(self, request: web.Request, ticket: LaunchTicket) -> dict[str, Any]:
        scope = ticket.scope
        challenge = await self._engine_or_busy().start_challenge(
            scope.participant_id,
            scope.training_id,
            scope.training_type,
            scope.gate,
            caller=_caller(ticket),
        )
        poses = 1 + len(challenge.steps)
        return {
            "challenge_id": challenge.challenge_id,
            "steps": [step.value for step in challenge.steps],
            "expires_at": _iso(datetime.fromtimestamp(challenge.expires_at, UTC)),
            "min_frames": min(poses * _FRAMES_PER_POSE, self._settings.server.max_frames),
        }

    async def _precheck(self, request: web.Request, ticket: LaunchTicket) -> dict[str, Any]:
        """One camera frame (the raw JPEG as the body) through the quality gates, for the
        camera screen's live feedback: costs no attempt. The page sends at most one at a
        time, every few seconds, while the participant positions their face."""
        engine = self._engine_or_busy()
        if request.content_type not in ("image/jpeg", "image/png", "image/webp"):
            raise ApiError(415, "BAD_UPLOAD", "send one frame as image/jpeg")
        limit = self._settings.server.max_image_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "TOO_LARGE", f"a frame may be at most {limit} bytes")
        frame = await _read_limited(request.content.readany, limit, "frame")
        if self._precheck_slots.locked():
            raise ApiError(503, "BUSY", "live guidance is busy; the scan itself still works")
        async with self._precheck_slots:
            report = await engine.inspect(frame)
        return {
            "status": report.status.value,
            "accepted": report.accepted,
            "reason": report.reason,
            "face_count": report.face_count,
            "failed_checks": list(report.failed_checks),
        }

    async def _verify(self, request: web.Request, ticket: LaunchTicket) -> dict[str, Any]:
        engine = self._engine_or_busy()
        fields, frames = await self._read_scan(request)
        idempotency_key = fields.get("idempotency_key") or None
        # One scan holds the ticket at a time; a spent ticket still lets through the scan
        # that spent it, re-sent because its answer never reached the browser (the engine
        # replays that answer).
        scan = idempotency_key or uuid.uuid4().hex
        tickets = self._launch_tickets()
        await tickets.hold(ticket, scan, self._settings.portal.verify_timeout_s + _HOLD_SLACK_S)
        try:
            return await self._decide(engine, ticket, scan, fields, frames)
        finally:
            # Never left held: a VERIFIED scan has spent it by now (release then does nothing).
            await tickets.release(ticket, scan)

    async def _decide(
        self,
        engine: ScanEngine,
        ticket: LaunchTicket,
        scan: str,
        fields: dict[str, str],
        frames: list[bytes],
    ) -> dict[str, Any]:
        scope = ticket.scope
        command = VerifyCommand(
            participant_id=scope.participant_id,
            training_id=scope.training_id,
            training_type=scope.training_type,
            gate=scope.gate,
            session_id=scope.session_id,
            frames=frames,
            caller=_caller(ticket),
            scheduled_start=scope.scheduled_start,
            challenge_id=fields.get("challenge_id") or None,
            idempotency_key=fields.get("idempotency_key") or None,
            # The page stops waiting then too, and offers to resend the same scan.
            deadline=time.monotonic() + self._settings.portal.verify_timeout_s,
        )
        outcome = await engine.verify(command)
        body: dict[str, Any] = {
            "decision": outcome.decision.value,
            "reason": outcome.reason,
            "verification_id": outcome.verification_id,
            "attempts": _usage_json(outcome.attempts),
            "liveness": outcome.liveness.value,
            "frames": [
                {"index": f.index, "accepted": f.accepted, "reason": f.reason}
                for f in outcome.frames
            ],
        }
        if outcome.decision is Decision.VERIFIED and outcome.token is not None:
            # Spent before the browser learns the token: one ticket, one token.
            await self._launch_tickets().spend(ticket, scan)
            body["redirect_url"] = return_url_with_token(scope.return_url, outcome.token.token)
            body["token_expires_at"] = _iso(outcome.token.expires_at)
        return body

    async def _read_scan(self, request: web.Request) -> tuple[dict[str, str], list[bytes]]:
        """Stream the multipart body: text fields and ``frame`` files, each within limits."""
        if not request.content_type.startswith("multipart/form-data"):
            raise ApiError(
                415, "BAD_UPLOAD", "send the frames as multipart/form-data `frame` files"
            )
        limits = self._settings.server
        fields: dict[str, str] = {}
        frames: list[bytes] = []
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "BAD_UPLOAD", "nested multipart bodies are not accepted")
            if part.name == "frame":
                if len(frames) >= limits.max_frames:
                    raise ApiError(
                        413, "TOO_MANY_FRAMES", f"send at most {limits.max_frames} frames"
                    )
                frames.append(
                    await _read_limited(_next_chunk_of(part), limits.max_image_bytes, "frame")
                )
            elif part.name in ("challenge_id", "idempotency_key"):
                raw = await _read_limited(_next_chunk_of(part), _MAX_FIELD_CHARS, part.name)
                if not raw.isascii() or not raw.decode().isprintable():
                    raise ApiError(400, "BAD_FIELD", f"{part.name} must be printable ASCII")
                fields[part.name] = raw.decode()
            else:
                raise ApiError(400, "BAD_FIELD", f"unexpected form field {part.name!r}")
        if not frames:
            raise ApiError(400, "NO_FRAMES", "send at least one `frame` file")
        return fields, frames


def _next_chunk_of(part: BodyPartReader) -> Callable[[], Awaitable[bytes]]:
    """Reads the next chunk of a multipart part (b"" at its end)."""
    return functools.partial(part.read_chunk, 64 * 1024)


async def _read_limited(next_chunk: Callable[[], Awaitable[bytes]], limit: int, what: str) -> bytes:
    """All the bytes up to the end of a body or part, refusing (413) as soon as they pass
    ``limit``. Read to the end: one read returns only what has arrived so far, and a
    frame cut short there is a truncated JPEG."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await next_chunk():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "TOO_LARGE", f"each {what} may be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
