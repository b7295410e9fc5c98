"""Launch tickets: how an LMS sends a participant to the Scan Wajah page.

The LMS (an authenticated gRPC caller, ``CreateLaunchTicket``) names who is to be verified,
for which training, gate and session, and where the browser goes back to. The service
answers with a ticket, a compact JWS signed with the token keys under its own ``typ``
(:data:`TICKET_TYPE`, so a ticket is never accepted as a verification token nor the other
way round), and the page URL carrying it::

    <portal.public_url>/scan/#ticket=<compact JWS>

The ticket rides in the URL fragment, which browsers never send to a server nor put in a
Referer, and the page hands it to the JSON gateway in an ``Authorization: Bearer`` header.

Claims (JSON; times are Unix seconds)::

    iss, sub (participant), tenant (the LMS, the token audience), training_id,
    training_type, gate, session_id, scheduled_start (or null), return_url, iat, exp, jti

Security properties:

- Who is verified is inside the signature: editing the URL breaks the ticket.
- The return URL must fall under one of the calling tenant's allowlisted prefixes
  (``portal.return_urls``), checked when the ticket is issued, so the page can never be
  used to send a token to a third party.
- Short-lived (``portal.ticket_ttl_s``) and one token at most: a scan holds the ticket
  atomically while it is decided (one Lua script: one scan at a time, others are told to
  wait), and a VERIFIED scan spends it (its ``jti`` marked in Redis until the ticket
  expires); the daily attempt cap bounds everything else it can do. The mark holds the
  idempotency key of the scan that spent it: that same scan, re-sent because its answer
  was lost on the way to the browser, still gets through, and the engine replays its
  decision and token (its idempotency record outlives the ticket while
  ``portal.ticket_ttl_s`` <= ``limits.idempotency_ttl_s``, as by default).
"""

from __future__ import annotations

import enum
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from facesvc.clock import Clock, SystemClock
from facesvc.domain import Gate, TrainingType
from facesvc.errors import (
    Conflict,
    InvalidRequest,
    PermissionRefused,
    ServiceError,
    Unauthenticated,
)
from facesvc.store.connection import AsyncRedis, reply_text
from facesvc.store.errors import store_errors
from facesvc.store.keys import KeySpace, validate_id
from facesvc.tokens.jws import PublicKeySet, sign_compact
from facesvc.tokens.keys import SigningKey
from facesvc.tokens.signed import (
    Problem,
    Refused,
    epoch,
    from_epoch,
    open_signed,
    str_claim,
    time_claim,
)

TICKET_TYPE = "facesvc-launch+jwt"
"""The ``typ`` of a launch ticket's JWS header (a verification token has another)."""

RETURN_TOKEN_PARAM = "token"  # noqa: S105  (a query parameter name, not a secret)
"""Query parameter of the return URL that carries the verification token (as the example
LMS gate in examples/lms_gate.py reads it)."""

MAX_RETURN_URL_CHARS = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}


class TicketProblem(enum.Enum):
    """Why a ticket was refused; each has a message telling the participant what to do, and
    the page keys its own on ``TICKET_<value>``. The problems of any signed document
    (:class:`~facesvc.tokens.signed.Problem`) keep their names, except those the participant
    cannot tell apart (see :func:`ticket_problem`); SPENT is a ticket's own."""

    MALFORMED = "MALFORMED"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    EXPIRED = "EXPIRED"
    SPENT = "SPENT"


_PROBLEM_MESSAGES = {
    TicketProblem.MALFORMED: "This scan link is damaged or incomplete. Go back to your training "
    "page and open the face scan again.",
    TicketProblem.BAD_SIGNATURE: "This scan link was altered or was not issued by this service. "
    "Go back to your training page and open the face scan again.",
    TicketProblem.EXPIRED: "This scan link has expired. Go back to your training page and open "
    "the face scan again.",
    TicketProblem.SPENT: "This scan link was already used for a successful scan. Go back to "
    "your training page.",
}


_FROM_SIGNED = {
    Problem.MALFORMED: TicketProblem.MALFORMED,
    Problem.BAD_SIGNATURE: TicketProblem.BAD_SIGNATURE,
    # A retired key or another issuer: to the participant, a link this service did not issue.
    Problem.UNKNOWN_KEY: TicketProblem.BAD_SIGNATURE,
    Problem.WRONG_ISSUER: TicketProblem.BAD_SIGNATURE,
    Problem.EXPIRED: TicketProblem.EXPIRED,
    # Tickets carry no nbf; one that had one would not be a ticket we issued.
    Problem.NOT_YET_VALID: TicketProblem.MALFORMED,
}


def ticket_problem(problem: Problem) -> TicketProblem:
    """A ticket's word for a problem of a signed document."""
    return _FROM_SIGNED[problem]


class TicketRefused(Unauthenticated, Refused[TicketProblem]):
    """A presented ticket cannot be used; ``problem`` says why, the message what to do, and
    ``code`` is ``TICKET_<problem>``."""

    def __init__(self, problem: TicketProblem, detail: str = "") -> None:
        message = _PROBLEM_MESSAGES[problem]
        super().__init__(problem, detail or message, message=message)
        self.code = f"TICKET_{problem.value}"


class TicketBusy(Conflict):
    """Another scan with the same ticket is being decided: answer it first (the page sends one
    scan at a time; a second one in flight is a replay or a race)."""


# A ticket's state key holds "scan:<scan>" while a scan holds it, "spent:<scan>" once that
# scan was VERIFIED. KEYS[1]: the state key; ARGV[1]: the scan; ARGV[2]: the hold in ms.
_SPENT = "spent:"
_CLAIM_LUA = """
local state = redis.call('GET', KEYS[1])
if not state then
  redis.call('SET', KEYS[1], 'scan:' .. ARGV[1], 'PX', ARGV[2])
  return 'go'
end
if state == 'scan:' .. ARGV[1] or state == 'spent:' .. ARGV[1] then
  return 'go'
end
if string.sub(state, 1, 6) == 'spent:' then
  return 'spent'
end
return 'busy'
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == 'scan:' .. ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LaunchRefused(ServiceError):
    """A CreateLaunchTicket request cannot be honoured; the message names the field and
    what to change. One of the two below."""


class LaunchFieldInvalid(LaunchRefused, InvalidRequest):
    """A field of the request is missing or malformed."""


class ReturnUrlNotAllowed(LaunchRefused, PermissionRefused):
    """The return URL is well formed but outside the calling tenant's allowlist."""


class TicketKeys(Protocol):
    """Signing and published keys (``facesvc.tokens.KeyDirectory`` or ``KeyRing``)."""

    def signing_key(self, now: datetime) -> SigningKey: ...

    def public_keys(self, now: datetime) -> PublicKeySet: ...


class Launcher(Protocol):
    """What CreateLaunchTicket calls (``facesvc.transport.portal.Portal``): issue a ticket for a
    scope and name the page URL that carries it."""

    def launch(self, scope: LaunchScope) -> tuple[LaunchTicket, str]: ...


@dataclass(frozen=True, slots=True)
class LaunchScope:
    """What a ticket binds: the scan to perform and where the browser returns.

    ``tenant`` is the LMS that asked (taken from its credential, never from the request) and
    becomes the verification token's audience. ``session_id`` may be empty only for REDEEM.
    """

    participant_id: str
    training_id: str
    training_type: TrainingType
    gate: Gate
    session_id: str
    scheduled_start: datetime | None
    return_url: str
    tenant: str


@dataclass(frozen=True, slots=True)
class LaunchTicket:
    """A signed ticket: its scope, id, expiry (UTC) and the compact JWS itself."""

    scope: LaunchScope
    ticket_id: str
    expires_at: datetime
    token: str


def _effective_port(scheme: str, port: int | None) -> int:
    return port if port is not None else _DEFAULT_PORTS[scheme]


def check_return_url(url: str, prefixes: Sequence[str]) -> None:
    """Raise :class:`LaunchRefused` unless ``url`` falls under one of ``prefixes``.

    "Under" means: the same scheme, host and port exactly, and a path that equals the
    prefix's path or continues it after a ``/`` (``/gate`` admits ``/gate/x`` but not
    ``/gateway``). URLs that browsers and servers might read differently are refused
    outright: credentials, backslashes, control characters, fragments, dot segments and
    encoded dots or slashes, so what is checked here is what the browser will load.
    """
    if not url:
        raise LaunchFieldInvalid(
            "return_url is required: the page sends the participant back there"
        )
    if len(url) > MAX_RETURN_URL_CHARS:
        raise LaunchFieldInvalid(f"return_url is longer than {MAX_RETURN_URL_CHARS} characters")
    if any(c <= " " or c == "\x7f" or c == "\\" for c in url) or not url.isascii():
        raise LaunchFieldInvalid(
            "return_url has spaces, control characters, backslashes or non-ASCII characters: "
            "percent-encode them"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise LaunchFieldInvalid(f"return_url is not a valid URL: {exc}") from exc
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise LaunchFieldInvalid("return_url must be an absolute http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise LaunchFieldInvalid("return_url may not carry credentials")
    if parts.fragment or url.endswith("#"):
        raise LaunchFieldInvalid("return_url may not have a fragment (#...)")
    lowered = parts.path.lower()
    segments = parts.path.split("/")
    if "%2e" in lowered or "%2f" in lowered or "." in segments or ".." in segments:
        raise LaunchFieldInvalid(
            "return_url may not contain dot segments or encoded dots or slashes"
        )
    for prefix in prefixes:
        allowed = urlsplit(prefix)
        if (
            allowed.scheme != parts.scheme
            or (allowed.hostname or "") != parts.hostname
            or _effective_port(allowed.scheme, allowed.port) != _effective_port(parts.scheme, port)
        ):
            continue
        base = allowed.path or "/"
        path = parts.path or "/"
        if path == base or path.startswith(base if base.endswith("/") else base + "/"):
            return
    raise ReturnUrlNotAllowed(
        "return_url is not on this LMS's allowlist: ask the service operator to add its "
        "prefix to portal.return_urls"
    )


def return_url_with_token(return_url: str, token: str) -> str:
    """``return_url`` with the verification token added as the ``token`` query parameter
    (existing parameters kept; a previous ``token`` parameter replaced)."""
    parts = urlsplit(return_url)
    query = [
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != RETURN_TOKEN_PARAM
    ]
    query.append((RETURN_TOKEN_PARAM, token))
    return urlunsplit(parts._replace(query=urlencode(query)))


class LaunchTickets:
    """Issues, opens and spends launch tickets.

    ``keys`` is the token key directory (tickets are signed by the active token key);
    ``allowed_prefixes(tenant)`` gives a tenant's return-URL allowlist
    (``PortalSettings.return_prefixes``); ``ttl_s`` is a ticket's life in seconds.
    """

    def __init__(
        self,
        keys: TicketKeys,
        redis: AsyncRedis,
        *,
        issuer: str,
        allowed_prefixes: Callable[[str], Sequence[str]],
        ttl_s: int,
        key_prefix: str = "facesvc",
        clock: Clock | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._keys = keys
        self._redis = redis
        self._issuer = issuer
        self._allowed = allowed_prefixes
        self._ttl_s = ttl_s
        self._space = KeySpace(key_prefix)
        self._clock = clock or SystemClock()
        self._claim = redis.register_script(_CLAIM_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    # ------------------------------------------------------------------ issuing

    def issue(self, scope: LaunchScope) -> LaunchTicket:
        """Check ``scope`` and sign a ticket for it.

        Raises :class:`LaunchRefused` for a bad field or a return URL outside the tenant's
        allowlist, and ``NoSigningKeyError`` when the key directory has no active key.
        """
        _check_scope(scope)
        check_return_url(scope.return_url, self._allowed(scope.tenant))
        now = self._clock.now()
        expires_at = now + timedelta(seconds=self._ttl_s)
        ticket_id = secrets.token_urlsafe(16)
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": scope.participant_id,
            "tenant": scope.tenant,
            "training_id": scope.training_id,
            "training_type": scope.training_type.value,
            "gate": scope.gate.value,
            "session_id": scope.session_id,
            "scheduled_start": (
                None if scope.scheduled_start is None else epoch(scope.scheduled_start)
            ),
            "return_url": scope.return_url,
            "iat": epoch(now),
            "exp": epoch(expires_at),
            "jti": ticket_id,
        }
        key = self._keys.signing_key(now)
        token = sign_compact(claims, key.private_key, key.kid, typ=TICKET_TYPE)
        return LaunchTicket(scope, ticket_id, from_epoch(claims["exp"]), token)

    # ------------------------------------------------------------------ presenting

    def open(self, token: str) -> LaunchTicket:
        """Verify a presented ticket (signature, type, issuer, expiry) and read its scope.

        Raises :class:`TicketRefused`. Does not consult Redis: see :meth:`check_unspent`.
        """
        now = self._clock.now()
        try:
            opened = open_signed(
                token,
                self._keys.public_keys(now),
                typ=TICKET_TYPE,
                read=lambda claims: _ticket_from_claims(claims, token),
            )
            return opened.check(now, issuer=self._issuer)
        except Refused as exc:
            raise TicketRefused(ticket_problem(exc.problem), exc.detail) from exc

    def _state_key(self, ticket: LaunchTicket) -> str:
        return self._space.launch_spent(ticket.scope.participant_id, ticket.ticket_id)

    async def check_unspent(self, ticket: LaunchTicket) -> None:
        """Raise :class:`TicketRefused` (SPENT) when a VERIFIED scan already used ``ticket``;
        ``StoreUnavailable`` when Redis cannot say (fail closed)."""
        async with store_errors("check the launch ticket"):
            state = await self._redis.get(self._state_key(ticket))
        if state is not None and reply_text(state).startswith(_SPENT):
            raise TicketRefused(TicketProblem.SPENT)

    async def hold(self, ticket: LaunchTicket, scan: str, hold_s: float) -> None:
        """Let scan ``scan`` (its idempotency key) use ``ticket``, atomically: one scan holds
        a ticket at a time (for at most ``hold_s``), and a spent ticket admits only the scan
        that spent it, sent again because its answer was lost. So one ticket can never yield
        two tokens, however many scans race for it.

        Raises :class:`TicketRefused` (SPENT), :class:`TicketBusy` (another scan holds it),
        ``StoreUnavailable``.
        """
        async with store_errors("hold the launch ticket"):
            answer = await self._claim(
                keys=[self._state_key(ticket)], args=[scan, max(1, round(hold_s * 1000))]
            )
        if reply_text(answer) == "spent":
            raise TicketRefused(TicketProblem.SPENT)
        if reply_text(answer) == "busy":
            raise TicketBusy("another scan with this link is being decided; wait for its answer")

    async def release(self, ticket: LaunchTicket, scan: str) -> None:
        """End ``scan``'s hold without spending the ticket (its decision was not VERIFIED, or
        none came); a hold that is no longer this scan's is left alone."""
        async with store_errors("release the launch ticket"):
            await self._release(keys=[self._state_key(ticket)], args=[scan])

    async def spend(self, ticket: LaunchTicket, scan: str) -> None:
        """Mark ``ticket`` used by the VERIFIED scan ``scan`` (which holds it), until the ticket
        would have expired anyway."""
        remaining = (ticket.expires_at - self._clock.now()).total_seconds()
        ttl_s = max(1, math.ceil(remaining))
        async with store_errors("spend the launch ticket"):
            await self._redis.set(self._state_key(ticket), _SPENT + scan, ex=ttl_s)


def _check_scope(scope: LaunchScope) -> None:
    try:
        validate_id(scope.participant_id, "participant_id")
        validate_id(scope.training_id, "training_id")
        if scope.session_id:
            validate_id(scope.session_id, "session_id")
        validate_id(scope.tenant, "tenant")
    except ValueError as exc:
        raise LaunchFieldInvalid(str(exc)) from exc
    if not scope.session_id and scope.gate is not Gate.REDEEM:
        raise LaunchFieldInvalid(f"session_id is required for the {scope.gate.value} gate")
    if scope.scheduled_start is not None and scope.scheduled_start.tzinfo is None:
        raise LaunchFieldInvalid("scheduled_start must carry a time zone")


def _ticket_from_claims(claims: dict[str, Any], token: str) -> LaunchTicket:
    start = claims.get("scheduled_start")
    scope = LaunchScope(
        participant_id=str_claim(claims, "sub"),
        training_id=str_claim(claims, "training_id"),
        training_type=TrainingType(str_claim(claims, "training_type")),
        gate=Gate(str_claim(claims, "gate")),
        session_id=str_claim(claims, "session_id"),
        scheduled_start=None if start is None else time_claim(claims, "scheduled_start"),
        return_url=str_claim(claims, "return_url"),
        tenant=str_claim(claims, "tenant"),
    )
    _check_scope(scope)
    return LaunchTicket(
        scope=scope,
        ticket_id=str_claim(claims, "jti"),
        expires_at=time_claim(claims, "exp"),
        token=token,
    )
