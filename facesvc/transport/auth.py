"""Who may call what: API keys and mTLS identities, roles, tenants and the role table.

Credentials
    An API key travels as gRPC metadata ``authorization: Bearer <key>`` (what
    :mod:`facesvc.client` sends) or, on HTTP, as the ``Authorization`` header. A key looks
    like ``fsk_<key id: 12 hex>_<secret>``; the key id is public and selects the entry, the
    whole key's SHA-256 is compared in constant time (:func:`hmac.compare_digest`). Keys are
    generated here with 256 bits of entropy, so a fast hash is safe: a slow password hash
    (scrypt, argon2) protects low-entropy secrets and would only hand an attacker a CPU lever
    on every request. Only the hash is stored. A client certificate (mTLS, ``security.tls_ca``)
    is mapped by its subject CN or any of its subjectAltNames to an entry's
    ``mtls_identity``. A key, when sent, must be valid: a bad key never falls back to the
    certificate.

Keys file (``security.api_keys_file``, JSON, written by ``facesvc apikeys add``)::

    {"version": 1, "clients": [
      {"name": "lms-a-gate", "role": "lms", "tenant": "lms-a",
       "key_id": "3f9c0a1b2c4d", "key_sha256": "<64 hex>"},
      {"name": "kiosk-jkt-01", "role": "kiosk", "tenant": "venue-jkt-01",
       "mtls_identity": "kiosk-jkt-01.venues.example.id", "training_types": ["OFFLINE"]}
    ]}

``tenant`` is the LMS (token audience) or the venue a credential belongs to; it is taken
from the credential, never from a request. ``training_types`` (optional) narrows the
training types the client may scan for. The file is re-read when it changes.

Roles (:data:`ROLE_TABLE` is the whole policy, as data):

- ``admin``: every RPC (enrollment, its tenants and deletion are admin only), for every
  participant.
- ``lms``: Verify, GetAttempts, RedeemToken (only tokens whose audience is its tenant),
  StartLivenessChallenge, GetSigningKeys, CreateLaunchTicket (for its own tenant); only for
  participants whose enrollment lists its tenant (others are NOT_FOUND).
- ``portal``: the web portal's calls: StartLivenessChallenge, Verify, GetAttempts,
  GetSigningKeys; like an LMS, only for participants enrolled for its tenant.
- ``kiosk``: StartLivenessChallenge and Verify for OFFLINE trainings only, each with the
  participant's venue pass for its own venue (its tenant), and GetSigningKeys.
- ``monitor``: no RPC; reads ``/metrics`` over HTTP (a Prometheus scraper should not
  hold a key that can enroll).

HTTP: ``/metrics`` needs an admin or monitor credential; ``/healthz`` stays open (an
orchestrator's probe, it tells only SERVING or not); the Scan Wajah gateway authenticates
its own requests by launch ticket. gRPC health and reflection stay open for the same
reasons (reflection describes the public contract only).
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from aiohttp import web
from google.protobuf.message import Message

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.domain import TrainingType
from facesvc.engine import Caller
from facesvc.store.errors import StoreUnavailable
from facesvc.transport.grpc_handlers import UnaryBehaviour, UnaryInterceptor, with_behaviour
from facesvc.wire import TRAINING_TYPES


class Role(enum.StrEnum):
    """What a credential is for."""

    LMS = "lms"
    PORTAL = "portal"
    KIOSK = "kiosk"
    ADMIN = "admin"
    MONITOR = "monitor"


_A, _L, _P, _K = Role.ADMIN, Role.LMS, Role.PORTAL, Role.KIOSK

ROLE_TABLE: Mapping[str, frozenset[Role]] = {
    "Enroll": frozenset({_A}),
    "GetEnrollment": frozenset({_A}),
    "DeleteEnrollment": frozenset({_A}),
    "SetEnrollmentTenants": frozenset({_A}),
    "StartLivenessChallenge": frozenset({_A, _L, _P, _K}),
    "Verify": frozenset({_A, _L, _P, _K}),
    "GetAttempts": frozenset({_A, _L, _P}),
    "RedeemToken": frozenset({_A, _L}),
    "GetSigningKeys": frozenset({_A, _L, _P, _K}),
    "CreateLaunchTicket": frozenset({_A, _L}),
}
"""RPC name -> roles admitted. An RPC missing here admits nobody (deny by default)."""

HTTP_ROLES: Mapping[str, frozenset[Role]] = {"/metrics": frozenset({_A, Role.MONITOR})}
"""HTTP path -> roles admitted; paths not listed are open or authenticate themselves."""

KIOSK_TRAINING_TYPES = frozenset({TrainingType.OFFLINE})
"""A kiosk stands in a venue: it scans for OFFLINE trainings only."""

KEY_PREFIX = "fsk_"
_KEY_RE = re.compile(r"fsk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
_NAME_RE = re.compile(r"[A-Za-z0-9._@+\-]{1,64}")
_KEYS_FILE_VERSION = 1

_HOW_TO_AUTHENTICATE = (
    "send `authorization: Bearer <api key>` (keys are issued by `facesvc apikeys add`)"
)


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Client:
    """One registered caller: a hashed API key and/or an mTLS identity."""

    name: str
    role: Role
    tenant: str
    key_id: str = ""
    key_sha256: str = ""
    mtls_identity: str = ""
    training_types: frozenset[TrainingType] | None = None
    """None: every training type the role allows."""

    @property
    def caller(self) -> Caller:
        """The transport's view of this client."""
        return Caller(name=self.name, role=self.role.value, tenant=self.tenant)

    def to_json(self) -> dict[str, Any]:
        """The keys-file entry (never a secret: only the key's hash)."""
        entry: dict[str, Any] = {"name": self.name, "role": self.role.value, "tenant": self.tenant}
        if self.key_id:
            entry.update(key_id=self.key_id, key_sha256=self.key_sha256)
        if self.mtls_identity:
            entry["mtls_identity"] = self.mtls_identity
        if self.training_types is not None:
            entry["training_types"] = sorted(t.value for t in self.training_types)
        return entry

    @classmethod
    def from_json(cls, entry: Any, where: str) -> Client:
        """Parse one keys-file entry; ``where`` names it in errors."""
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: an entry must be an object")
        unknown = set(entry) - {
            "name",
            "role",
            "tenant",
            "key_id",
            "key_sha256",
            "mtls_identity",
            "training_types",
        }
        if unknown:
            raise KeysFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            role = Role(str(entry.get("role")))
        except ValueError:
            roles = ", ".join(r.value for r in Role)
            raise KeysFileError(f"{where}: role must be one of {roles}") from None
        types = entry.get("training_types")
        try:
            training_types = None if types is None else frozenset(TrainingType(t) for t in types)
        except (TypeError, ValueError):
            raise KeysFileError(
                f"{where}: training_types must list SPL, WEBINAR, OFFLINE"
            ) from None
        client = cls(
            name=str(entry.get("name", "")),
            role=role,
            tenant=str(entry.get("tenant", "")),
            key_id=str(entry.get("key_id", "")),
            key_sha256=str(entry.get("key_sha256", "")),
            mtls_identity=str(entry.get("mtls_identity", "")),
            training_types=training_types,
        )
        client.check(where)
        return client

    def check(self, where: str) -> None:
        """Raise KeysFileError unless the entry is complete and consistent."""
        for label, value in (("name", self.name), ("tenant", self.tenant)):
            if not _NAME_RE.fullmatch(value):
                raise KeysFileError(
                    f"{where}: {label} must be 1-64 of A-Z a-z 0-9 . _ @ + - (got {value!r})"
                )
        if not self.key_id and not self.mtls_identity:
            raise KeysFileError(f"{where}: needs key_id/key_sha256 or mtls_identity")
        if self.key_id and not (
            re.fullmatch(r"[0-9a-f]{12}", self.key_id)
            and re.fullmatch(r"[0-9a-f]{64}", self.key_sha256)
        ):
            raise KeysFileError(f"{where}: key_id is 12 hex digits and key_sha256 64 hex digits")
        if self.role is Role.KIOSK and (
            self.training_types is None or not self.training_types <= KIOSK_TRAINING_TYPES
        ):
            # Stated in the file rather than implied, so the file says what a kiosk can do.
            raise KeysFileError(f'{where}: a kiosk entry needs training_types ["OFFLINE"]')


def new_api_key() -> tuple[str, str, str]:
    """A fresh key: (the key to hand out once, its key id, its SHA-256 hex)."""
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return key, key_id, _sha256(key)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ClientRegistry:
    """The registered clients, looked up by API key or by mTLS identity.

    Built from a keys file (:meth:`from_file`, re-read when its size or mtime changes,
    checked at most every ``reload_interval_s``) or from a list (tests).
    """

    def __init__(
        self,
        clients: Iterable[Client],
        *,
        path: Path | None = None,
        reload_interval_s: float = 2.0,
    ) -> None:
        self._path = path
        self._reload_interval_s = reload_interval_s
        self._checked_at = time.monotonic()
        self._stamp = _stamp(path) if path is not None else None
        self._index(list(clients))

    @classmethod
    def from_file(cls, path: Path, *, reload_interval_s: float = 2.0) -> ClientRegistry:
        """Load ``path``; raises KeysFileError when it is missing or malformed."""
        return cls(read_keys_file(path), path=path, reload_interval_s=reload_interval_s)

    def _index(self, clients: list[Client]) -> None:
        by_key: dict[str, Client] = {}
        by_identity: dict[str, Client] = {}
        for client in clients:
            if client.key_id:
                by_key[client.key_id] = client
            if client.mtls_identity:
                by_identity[client.mtls_identity] = client
        self._by_key = by_key
        self._by_identity = by_identity

    def _maybe_reload(self) -> None:
        if self._path is None:
            return
        now = time.monotonic()
        if now - self._checked_at < self._reload_interval_s:
            return
        self._checked_at = now
        stamp = _stamp(self._path)
        if stamp != self._stamp:
            # A half-written or broken file keeps the clients we have: revoking everybody
            # because an operator's editor saved a partial file would be an outage.
            try:
                clients = read_keys_file(self._path)
            except KeysFileError:
                return
            self._stamp = stamp
            self._index(clients)

    def by_key(self, key: str) -> Client | None:
        """The client whose key this is, or None. Constant time in the secret part."""
        self._maybe_reload()
        match = _KEY_RE.fullmatch(key)
        if match is None:
            return None
        client = self._by_key.get(match.group(1))
        # Compare even when the id is unknown, so the answer takes the same time.
        expected = client.key_sha256 if client is not None else "0" * 64
        ok = hmac.compare_digest(_sha256(key), expected)
        return client if ok and client is not None else None

    def by_identity(self, identities: Iterable[str]) -> Client | None:
        """The client registered for the first of ``identities`` (certificate CN and SANs)."""
        self._maybe_reload()
        for identity in identities:
            client = self._by_identity.get(identity)
            if client is not None:
                return client
        return None


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def read_keys_file(path: Path) -> list[Client]:
    """Every entry of the keys file at ``path``; raises KeysFileError naming the problem."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeysFileError(
            f"keys file {path} does not exist; create it with `facesvc apikeys add`"
        ) from None
    except (OSError, ValueError) as exc:
        raise KeysFileError(f"keys file {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != _KEYS_FILE_VERSION:
        raise KeysFileError(f'keys file {path}: expected {{"version": 1, "clients": [...]}}')
    entries = data.get("clients")
    if not isinstance(entries, list):
        raise KeysFileError(f'keys file {path}: "clients" must be a list')
    clients = [Client.from_json(e, f"keys file {path}, entry {i}") for i, e in enumerate(entries)]
    for attr in ("name", "key_id", "mtls_identity"):
        values = [getattr(c, attr) for c in clients if getattr(c, attr)]
        if len(values) != len(set(values)):
            raise KeysFileError(f"keys file {path}: two entries share a {attr}")
    return clients


def write_keys_file(path: Path, clients: Sequence[Client]) -> None:
    """Replace the keys file atomically, readable by its owner only (it names every client)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(
        {"version": _KEYS_FILE_VERSION, "clients": [c.to_json() for c in clients]}, indent=2
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(body + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- policy


def permission_problem(client: Client, rpc: str) -> str | None:
    """Why ``client``'s role may not call ``rpc`` (a sentence saying what to use), or None."""
    allowed = ROLE_TABLE.get(rpc, frozenset())
    if client.role in allowed:
        return None
    if not allowed:
        return f"{rpc} is not open to any API client"
    roles = " or ".join(sorted(r.value for r in allowed))
    article = "an" if roles[0] in "aeiou" else "a"
    return f"role {client.role.value} may not call {rpc}; use {article} {roles} key"


def _training_type(request: Message) -> TrainingType | None:
    if isinstance(
        request,
        pb.VerifyRequest
        | pb.StartLivenessChallengeRequest
        | pb.GetAttemptsRequest
        | pb.CreateLaunchTicketRequest,
    ):
        return TRAINING_TYPES.from_wire(request.training_type) if request.training_type else None
    return None


def scope_problem(client: Client, rpc: str, request: Message) -> str | None:
    """Why this request is outside ``client``'s scope (tenant, venue, training types), or None.

    Runs after :func:`permission_problem` admitted the role; admins have no scope.
    Unknown enum numbers pass here and are refused by validation as INVALID_ARGUMENT.
    """
    if client.role is Role.ADMIN:
        return None
    if isinstance(request, pb.RedeemTokenRequest) and request.audience != client.tenant:
        return (
            f"{client.name} redeems tokens for audience {client.tenant!r} only; "
            f"this request names audience {request.audience!r}"
        )
    try:
        training_type = _training_type(request)
    except ValueError:
        return None
    if training_type is None:
        return None
    allowed = client.training_types
    if client.role is Role.KIOSK:
        allowed = KIOSK_TRAINING_TYPES if allowed is None else allowed & KIOSK_TRAINING_TYPES
    if allowed is not None and training_type not in allowed:
        names = ", ".join(sorted(t.value for t in allowed))
        return (
            f"{client.name} ({client.role.value}) may call {rpc} for {names} trainings only, "
            f"not {training_type.value}"
        )
    return None


# ---------------------------------------------------------------- gRPC


def bearer_key(value: str) -> str | None:
    """The key in an ``Authorization`` value ``Bearer <key>`` (scheme case-insensitive)."""
    scheme, _, key = value.strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def peer_identities(auth_context: Mapping[str, Sequence[bytes]]) -> list[str]:
    """A TLS peer's subject CN and subjectAltNames, from ``context.auth_context()``.

    Empty unless the peer presented a certificate that the server verified against
    ``security.tls_ca``.
    """
    names: list[str] = []
    for prop in ("x509_common_name", "x509_subject_alternative_name"):
        names.extend(v.decode(errors="replace") for v in auth_context.get(prop, ()))
    return names


class RequestLimiter(Protocol):
    """Per-client request rate (:class:`facesvc.limits.abuse.RpcRateLimiter`), which may
    count some RPCs as several requests."""

    async def admit(self, client_id: str, rpc: str) -> float | None:
        """None to admit, else seconds to wait. Raises StoreUnavailable."""
        ...


_ADMITTED: contextvars.ContextVar[Client | None] = contextvars.ContextVar(
    "facesvc_admitted_client", default=None
)
"""The client :class:`AuthInterceptor` admitted for the call running in this task."""


class ApiKeyAuthenticator:
    """Authenticates gRPC calls against a :class:`ClientRegistry`.

    :meth:`admit` (run by :class:`AuthInterceptor`, which sees the request) identifies the
    caller and checks its role, its scope and the per-client rate limit, once per call;
    :meth:`authenticate` (the servicer's
    :class:`~facesvc.transport.grpc_servicer.Authenticator` hook) hands the servicer the client
    admitted for this call. Both abort the call themselves with a status and a sentence.
    """

    def __init__(self, registry: ClientRegistry, limiter: RequestLimiter | None = None) -> None:
        self.registry = registry
        self._limiter = limiter

    async def identify(self, context: grpc.aio.ServicerContext) -> Client:
        """The registered client behind the call's key or certificate; aborts UNAUTHENTICATED."""
        presented = [
            str(value)
            for key, value in (context.invocation_metadata() or ())
            if key == "authorization"
        ]
        if presented:
            key = bearer_key(presented[0])
            client = self.registry.by_key(key) if key is not None else None
            if client is None:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "the API key is not valid (malformed, unknown or revoked); "
                    + _HOW_TO_AUTHENTICATE,
                )
            assert client is not None  # abort raised otherwise
            return client
        identities = peer_identities(context.auth_context())
        client = self.registry.by_identity(identities)
        if client is not None:
            return client
        if identities:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the client certificate ({', '.join(identities)}) is not registered; "
                "register it with `facesvc apikeys add --mtls-identity`, or "
                + _HOW_TO_AUTHENTICATE,
            )
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "no credentials: " + _HOW_TO_AUTHENTICATE
        )
        raise AssertionError("context.abort returned")

    async def authenticate(self, context: grpc.aio.ServicerContext, rpc: str) -> Caller:
        """The caller :meth:`admit` let through for this call. A call that reached the
        servicer without :class:`AuthInterceptor` is a wiring error: aborted INTERNAL."""
        client = _ADMITTED.get()
        if client is None:
            await context.abort(
                grpc.StatusCode.INTERNAL, f"{rpc} was not authenticated: AuthInterceptor missing"
            )
        assert client is not None  # abort raised otherwise
        return client.caller

    async def admit(self, context: grpc.aio.ServicerContext, rpc: str, request: Message) -> Client:
        """Identity, role, scope and rate for one call: the admitted client; aborts the call
        on any refusal."""
        client = await self.identify(context)
        problem = permission_problem(client, rpc) or scope_problem(client, rpc, request)
        if problem is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
        if self._limiter is None:
            return client
        try:
            wait_s = await self._limiter.admit(client.name, rpc)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if wait_s is not None:
            retry = max(1, math.ceil(wait_s))
            context.set_trailing_metadata((("retry-after", str(retry)),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{client.name} is over its request rate; retry after {retry} s",
            )
        return client


class AuthInterceptor(UnaryInterceptor):
    """Runs :meth:`ApiKeyAuthenticator.admit` before every call of ``service``.

    An interceptor because only it sees the decoded request before the servicer does,
    which the scope rules need (the audience of a RedeemToken, a kiosk's training type).
    Other services (health, reflection) pass untouched: see the module doc.
    """

    def __init__(self, authenticator: ApiKeyAuthenticator, service: str) -> None:
        self._auth = authenticator
        self._prefix = f"/{service}/"

    def around(
        self, method: str, handler: grpc.RpcMethodHandler, inner: UnaryBehaviour
    ) -> grpc.RpcMethodHandler:
        if not method.startswith(self._prefix):
            return handler
        rpc = method.removeprefix(self._prefix)
        auth = self._auth

        async def guarded(request: Message, context: grpc.aio.ServicerContext) -> Any:
            # The servicer runs in this task: it finds the client here instead of
            # identifying the caller a second time.
            token = _ADMITTED.set(await auth.admit(context, rpc, request))
            try:
                return await inner(request, context)
            finally:
                _ADMITTED.reset(token)

        return with_behaviour(handler, guarded)


# ---------------------------------------------------------------- HTTP


def http_auth_middleware(
    registry: ClientRegistry, protected: Mapping[str, frozenset[Role]] = HTTP_ROLES
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """aiohttp middleware guarding the ``protected`` paths (exact match) by role.

    API keys only: the HTTP server requests no client certificates (see :mod:`facesvc.serve.tls`).
    """

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        allowed = protected.get(request.path)
        if allowed is None:
            return await handler(request)
        key = bearer_key(request.headers.get("Authorization", ""))
        client = registry.by_key(key) if key is not None else None
        if client is None:
            raise web.HTTPUnauthorized(
                text=f"{request.path} needs a credential: send `Authorization: Bearer <api key>`",
                headers={"WWW-Authenticate": 'Bearer realm="facesvc"'},
            )
        if client.role not in allowed:
            roles = " or ".join(sorted(r.value for r in allowed))
            raise web.HTTPForbidden(
                text=f"role {client.role.value} may not read {request.path}; use a {roles} key"
            )
        return await handler(request)

    return middleware
