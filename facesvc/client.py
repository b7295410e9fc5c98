"""The Python SDK for LMS gates and venue kiosks: gRPC clients and an offline token verifier.

Connecting::

    client = FaceVerificationClient(
        "facesvc.example.org:443", api_key=os.environ["FACESVC_API_KEY"]
    )
    result = client.verify(participant_id="p-1", training_id="t-1",
                           training_type=TrainingType.WEBINAR, gate=Gate.SESSION,
                           session_id="day-2", frames=[jpeg_bytes])
    if result.decision is Decision.VERIFIED: ...

Several replicas: point ``target`` at every one of them, e.g. a Kubernetes headless
Service (``dns:///facesvc-grpc.facesvc.svc.cluster.local:50051``); the client balances its
calls over them round-robin (``load_balancing``), since one HTTP/2 connection would otherwise
carry every call to one replica.

Credentials: the API key travels as gRPC metadata ``authorization: Bearer <key>`` on every call.
TLS is on by default (system roots, or ``root_certificates``); pass ``certificate_chain`` and
``private_key`` (PEM) for mTLS. ``insecure=True`` drops TLS for local development only: a key
sent in the clear is a key given away.

Every RPC has a deadline (``timeout_s``, default 10 s; per call too). A failed call raises a
:class:`FaceServiceError` subclass carrying the gRPC status code and the server's message.
Decisions (NOT_MATCHED, ATTEMPTS_EXHAUSTED...) are values in the result, never exceptions.

``AsyncFaceVerificationClient`` has the same methods as coroutines (``grpc.aio``).

Offline checks: :class:`TokenVerifier` (and :class:`AsyncTokenVerifier`) check a token against
a cached JWKS with exactly the rules the service's RedeemToken uses (``facesvc.tokens``); only
the one-time-use mark needs the service, so call ``redeem`` to admit a participant once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.clock import Clock, SystemClock
from facesvc.domain import Decision, Gate, LivenessMethod, TrainingType
from facesvc.tokens import (
    DEFAULT_LEEWAY_S,
    CheckPolicy,
    CheckReason,
    CheckResult,
    Expectation,
    PublicKeySet,
    VerificationClaims,
    check_token,
)
from facesvc.wire import (
    DECISIONS,
    GATES,
    LIVENESS_METHODS,
    REDEEM_REASONS,
    TRAINING_TYPES,
    bare_name,
)

__all__ = [
    "AlreadyExists",
    "AsyncFaceVerificationClient",
    "AsyncTokenVerifier",
    "Attempts",
    "Challenge",
    "CheckReason",
    "CheckResult",
    "Decision",
    "EnrollResult",
    "Enrollment",
    "Expectation",
    "FaceServiceError",
    "FaceVerificationClient",
    "Gate",
    "ImageQuality",
    "InvalidArgument",
    "KeySetUnavailable",
    "LivenessMethod",
    "NotFound",
    "PermissionDenied",
    "Redemption",
    "ServiceUnavailable",
    "TokenVerifier",
    "TrainingType",
    "Unauthenticated",
    "VerificationClaims",
    "VerifyResult",
    "check_jwks_url",
    "fetch_jwks_url",
]

DEFAULT_TIMEOUT_S = 10.0

# --------------------------------------------------------------------------- errors


class FaceServiceError(Exception):
    """A call failed; ``code`` is the gRPC status, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(FaceServiceError):
    """The request is malformed; the message names the field. Fix it; do not retry as is."""


class Unauthenticated(FaceServiceError):
    """No, or an unknown or revoked, API key / client certificate: pass the ``api_key`` (or
    certificate) the service's operator registered for this client."""


class PermissionDenied(FaceServiceError):
    """The credential's role may not make this call (or not for this audience or training
    type); the message names the role to use. Retrying with the same key will not help."""


class NotFound(FaceServiceError):
    """The participant has no enrollment: ``enroll`` them first."""


class AlreadyExists(FaceServiceError):
    """The participant is enrolled; pass ``replace=True`` to replace the template."""


class ServiceUnavailable(FaceServiceError):
    """The service (or its Redis) is not ready, or the deadline passed; retry with backoff."""


_ERRORS: dict[grpc.StatusCode, type[FaceServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServiceUnavailable,
}


def _service_error(exc: grpc.RpcError) -> FaceServiceError:
    # A failed call's RpcError is also a grpc.Call, which has code() and details().
    code: grpc.StatusCode = exc.code()
    message: str = exc.details() or ""
    return _ERRORS.get(code, FaceServiceError)(code, message)


class KeySetUnavailable(Exception):
    """The token verifier could not get a fresh key set; check online (``redeem``) instead."""


# --------------------------------------------------------------------------- wire values


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    moment: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return moment


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ImageQuality:
    """What the service saw in one submitted image or frame (measurements only)."""

    index: int
    accepted: bool
    issue: str | None
    """Why not accepted (``BLURRY``, ``NO_FACE``...); None when accepted."""
    reason: str
    width_px: int
    height_px: int
    face_count: int
    face_height_px: int
    detection_score: float
    sharpness: float
    brightness: float
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    live_score: float | None


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A participant's enrollment metadata (never the template)."""

    participant_id: str
    enrolled_at: datetime | None
    updated_at: datetime | None
    image_count: int
    model_pack: str
    tenants: list[str]
    """The LMS tenants that may act for the participant."""


@dataclass(frozen=True, slots=True)
class EnrollResult:
    enrolled: bool
    reason: str
    enrollment: Enrollment | None
    images: list[ImageQuality]


@dataclass(frozen=True, slots=True)
class Challenge:
    """A liveness challenge: perform ``steps`` in order, send at least ``min_frames``."""

    challenge_id: str
    steps: list[str]
    """``TURN_LEFT``, ``TURN_RIGHT``, ``LOOK_UP``, ``LOOK_DOWN``, ``COME_CLOSER``..."""
    expires_at: datetime | None
    min_frames: int


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The decision on one scan; ``token`` is set only when the decision is VERIFIED."""

    decision: Decision
    reason: str
    attempts_used: int
    attempts_remaining: int
    attempts_limit: int
    attempts_reset_at: datetime | None
    token: str | None
    token_expires_at: datetime | None
    verification_id: str
    frames: list[ImageQuality]
    liveness_method: LivenessMethod | None
    replayed: bool


@dataclass(frozen=True, slots=True)
class Attempts:
    """Today's (WIB day) attempt count for one participant and training."""

    used: int
    remaining: int
    limit: int
    resets_at: datetime | None


@dataclass(frozen=True, slots=True)
class Redemption:
    """The answer of RedeemToken: ``valid`` only when ``reason`` is OK (the token is now used).

    ``claims`` and ``kid`` are set when the signature verified, also for a refusal.
    """

    valid: bool
    reason: CheckReason
    message: str
    claims: VerificationClaims | None
    kid: str | None


def _quality(q: pb.ImageQuality) -> ImageQuality:
    return ImageQuality(
        index=q.index,
        accepted=q.accepted,
        issue=None if q.issue == 0 else bare_name(pb.QualityIssue, "QUALITY_ISSUE", q.issue),
        reason=q.reason,
        width_px=q.width_px,
        height_px=q.height_px,
        face_count=q.face_count,
        face_height_px=q.face_height_px,
        detection_score=q.detection_score,
        sharpness=q.sharpness,
        brightness=q.brightness,
        yaw_deg=q.yaw_deg,
        pitch_deg=q.pitch_deg,
        roll_deg=q.roll_deg,
        live_score=q.live_score if q.HasField("live_score") else None,
    )


def _enrollment(e: pb.Enrollment) -> Enrollment:
    return Enrollment(
        participant_id=e.participant_id,
        enrolled_at=_time(e, "enrolled_at"),
        updated_at=_time(e, "updated_at"),
        image_count=e.image_count,
        model_pack=e.model_pack,
        tenants=list(e.tenants),
    )


def _enroll_result(r: pb.EnrollResponse) -> EnrollResult:
    return EnrollResult(
        enrolled=r.enrolled,
        reason=r.reason,
        enrollment=_enrollment(r.enrollment) if r.HasField("enrollment") else None,
        images=[_quality(q) for q in r.images],
    )


def _challenge(r: pb.StartLivenessChallengeResponse) -> Challenge:
    return Challenge(
        challenge_id=r.challenge_id,
        steps=[bare_name(pb.ChallengeStep, "CHALLENGE_STEP", s) for s in r.steps],
        expires_at=_time(r, "expires_at"),
        min_frames=r.min_frames,
    )


def _verify_result(r: pb.VerifyResponse) -> VerifyResult:
    liveness = r.liveness_method
    return VerifyResult(
        decision=DECISIONS.from_wire(r.decision),
        reason=r.reason,
        attempts_used=r.attempts_used,
        attempts_remaining=r.attempts_remaining,
        attempts_limit=r.attempts_limit,
        attempts_reset_at=_time(r, "attempts_reset_at"),
        token=r.token or None,
        token_expires_at=_time(r, "token_expires_at"),
        verification_id=r.verification_id,
        frames=[_quality(q) for q in r.frames],
        liveness_method=None if liveness == 0 else LIVENESS_METHODS.from_wire(liveness),
        replayed=r.replayed,
    )


def _attempts(r: pb.GetAttemptsResponse) -> Attempts:
    return Attempts(
        used=r.used, remaining=r.remaining, limit=r.limit, resets_at=_time(r, "resets_at")
    )


def _seconds(message: Any, field: str) -> int:
    moment = _time(message, field)
    return 0 if moment is None else int(moment.timestamp())


def _redemption(r: pb.RedeemTokenResponse) -> Redemption:
    claims = kid = None
    if r.HasField("claims"):
        c = r.claims
        claims = VerificationClaims(
            iss=c.issuer,
            sub=c.participant_id,
            aud=c.audience,
            iat=_seconds(c, "issued_at"),
            nbf=_seconds(c, "not_before"),
            exp=_seconds(c, "expires_at"),
            jti=c.token_id,
            training_id=c.training_id,
            training_type=TRAINING_TYPES.from_wire(c.training_type),
            gate=GATES.from_wire(c.gate),
            session_id=c.session_id,
            liveness=LIVENESS_METHODS.from_wire(c.liveness_method),
            model_pack=c.model_pack,
            verification_id=c.verification_id,
        )
        kid = c.key_id or None
    return Redemption(
        valid=r.valid,
        reason=REDEEM_REASONS.from_wire(r.reason),
        message=r.message,
        claims=claims,
        kid=kid,
    )


def _key_set(r: pb.GetSigningKeysResponse) -> PublicKeySet:
    return PublicKeySet.from_json(r.jwks_json)


_Out = TypeVar("_Out")

# --------------------------------------------------------------------------- requests
#
# Each RPC is built once, as a _Call (the stub's method name, the request, the parser of its
# response); the blocking and the asyncio client only differ in how they send it.


@dataclass(frozen=True, slots=True)
class _Call(Generic[_Out]):
    method: str
    request: Any
    parse: Callable[[Any], _Out]


def _enroll_call(
    participant_id: str, images: Sequence[bytes], replace: bool, tenants: Sequence[str]
) -> _Call[EnrollResult]:
    request = pb.EnrollRequest(
        participant_id=participant_id, images=list(images), replace=replace, tenants=list(tenants)
    )
    return _Call("Enroll", request, _enroll_result)


def _set_tenants_call(participant_id: str, tenants: Sequence[str]) -> _Call[Enrollment]:
    request = pb.SetEnrollmentTenantsRequest(participant_id=participant_id, tenants=list(tenants))
    return _Call("SetEnrollmentTenants", request, lambda r: _enrollment(r.enrollment))


def _challenge_call(
    participant_id: str, training_id: str, training_type: TrainingType, gate: Gate, venue_pass: str
) -> _Call[Challenge]:
    request = pb.StartLivenessChallengeRequest(
        participant_id=participant_id,
        training_id=training_id,
        training_type=TRAINING_TYPES.to_wire(training_type),
        gate=GATES.to_wire(gate),
        venue_pass=venue_pass,
    )
    return _Call("StartLivenessChallenge", request, _challenge)


def _attempts_call(
    participant_id: str, training_id: str, training_type: TrainingType
) -> _Call[Attempts]:
    request = pb.GetAttemptsRequest(
        participant_id=participant_id,
        training_id=training_id,
        training_type=TRAINING_TYPES.to_wire(training_type),
    )
    return _Call("GetAttempts", request, _attempts)


def _verify_call(
    participant_id: str,
    training_id: str,
    training_type: TrainingType,
    gate: Gate,
    frames: Sequence[bytes],
    session_id: str,
    scheduled_start: datetime | None,
    challenge_id: str,
    idempotency_key: str,
    venue_pass: str,
) -> _Call[VerifyResult]:
    request = pb.VerifyRequest(
        participant_id=participant_id,
        training_id=training_id,
        training_type=TRAINING_TYPES.to_wire(training_type),
        gate=GATES.to_wire(gate),
        session_id=session_id,
        challenge_id=challenge_id,
        frames=list(frames),
        idempotency_key=idempotency_key,
        venue_pass=venue_pass,
    )
    if scheduled_start is not None:
        request.scheduled_start.CopyFrom(_timestamp(scheduled_start))
    return _Call("Verify", request, _verify_result)


def _redeem_call(
    token: str, participant_id: str, audience: str, gate: Gate, session_id: str, training_id: str
) -> _Call[Redemption]:
    request = pb.RedeemTokenRequest(
        token=token,
        expected_participant_id=participant_id,
        audience=audience,
        expected_gate=GATES.to_wire(gate),
        expected_session_id=session_id,
        expected_training_id=training_id,
    )
    return _Call("RedeemToken", request, _redemption)


def _signing_keys_call() -> _Call[PublicKeySet]:
    return _Call("GetSigningKeys", pb.GetSigningKeysRequest(), _key_set)


def _channel_credentials(
    root_certificates: bytes | None, certificate_chain: bytes | None, private_key: bytes | None
) -> grpc.ChannelCredentials:
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key (mTLS) go together")
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


#: The client-side load-balancing policies a channel may name (gRPC's built-in ones).
LOAD_BALANCING_POLICIES = ("round_robin", "pick_first")


def _channel_options(
    options: Sequence[tuple[str, Any]], load_balancing: str
) -> list[tuple[str, Any]]:
    """``options`` plus a service config that selects ``load_balancing``.

    gRPC multiplexes every call over one HTTP/2 connection, so with its default
    ``pick_first`` a client of several replicas sends all its calls to whichever one it
    connected to first. ``round_robin`` opens a connection to every address the target
    resolves to and spreads calls over the ready ones: with a Kubernetes headless Service
    (``dns:///facesvc-grpc.<namespace>.svc.cluster.local:50051``, one A record per ready pod)
    that spreads calls over pods, and a pod that stops being ready drops out. A target with
    one address behaves as before. A ``grpc.service_config`` or ``grpc.lb_policy_name`` the
    caller passes in ``options`` wins.
    """
    if load_balancing not in LOAD_BALANCING_POLICIES:
        raise ValueError(
            f"load_balancing must be one of {', '.join(LOAD_BALANCING_POLICIES)} "
            f"(got {load_balancing!r})"
        )
    merged = list(options)
    if not any(name in ("grpc.service_config", "grpc.lb_policy_name") for name, _ in merged):
        config: dict[str, object] = {"loadBalancingConfig": [{load_balancing: {}}]}
        merged.append(("grpc.service_config", json.dumps(config)))
    return merged


class _Connection:
    """What both clients share: the call metadata (the API key) and the default deadline."""

    def __init__(self, api_key: str | None, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        # The API key is a secret: show only whether there is one.
        return (
            f"_Connection(api_key={'<set>' if self.metadata else None}, timeout_s={self.timeout_s})"
        )


# --------------------------------------------------------------------------- sync client


class FaceVerificationClient:
    """Blocking client of ``facesvc.v1.FaceVerification``; thread-safe; close() when done.

    ``target`` is ``host:port``, or any gRPC target such as ``dns:///name:port`` (every
    address the name resolves to) or ``ipv4:10.0.0.1:50051,10.0.0.2:50051``. ``timeout_s``
    is the default deadline of every call in seconds; each method also takes ``timeout_s``.
    ``load_balancing`` is ``round_robin`` (default: calls spread over every address of the
    target, e.g. the pods behind a headless Service) or ``pick_first`` (gRPC's own default:
    one connection, to the first address that answers).
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        insecure: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
        load_balancing: str = "round_robin",
    ) -> None:
        self._conn = _Connection(api_key, timeout_s)
        channel_options = _channel_options(options, load_balancing)
        if insecure:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            creds = _channel_credentials(root_certificates, certificate_chain, private_key)
            self._channel = grpc.secure_channel(target, creds, options=channel_options)
        self._stub = pb_grpc.FaceVerificationStub(self._channel)  # type: ignore[no-untyped-call]
        self._target = target

    def __repr__(self) -> str:
        return f"FaceVerificationClient({self._target!r})"

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FaceVerificationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: _Call[_Out], timeout_s: float | None) -> _Out:
        method = getattr(self._stub, call.method)
        try:
            response = method(
                call.request,
                timeout=timeout_s or self._conn.timeout_s,
                metadata=self._conn.metadata,
            )
        except grpc.RpcError as exc:
            raise _service_error(exc) from None
        return call.parse(response)

    def enroll(
        self,
        participant_id: str,
        images: Sequence[bytes],
        *,
        tenants: Sequence[str] = (),
        replace: bool = False,
        timeout_s: float | None = None,
    ) -> EnrollResult:
        """Build and store the participant's template from ``images`` (encoded photos), for
        ``tenants``: the LMS tenants that may act for them (empty on a replace: keep them)."""
        return self._send(_enroll_call(participant_id, images, replace, tenants), timeout_s)

    def set_enrollment_tenants(
        self, participant_id: str, tenants: Sequence[str], *, timeout_s: float | None = None
    ) -> Enrollment:
        """Replace the LMS tenants that may act for an enrolled participant (admin)."""
        return self._send(_set_tenants_call(participant_id, tenants), timeout_s)

    def start_challenge(
        self,
        participant_id: str,
        training_id: str,
        training_type: TrainingType,
        gate: Gate,
        *,
        venue_pass: str = "",
        timeout_s: float | None = None,
    ) -> Challenge:
        """Get a single-use liveness challenge for the next ``verify`` of this scan (a kiosk
        sends the participant's ``venue_pass``)."""
        call = _challenge_call(participant_id, training_id, training_type, gate, venue_pass)
        return self._send(call, timeout_s)

    def verify(
        self,
        participant_id: str,
        training_id: str,
        training_type: TrainingType,
        gate: Gate,
        frames: Sequence[bytes],
        *,
        session_id: str = "",
        scheduled_start: datetime | None = None,
        challenge_id: str = "",
        idempotency_key: str = "",
        venue_pass: str = "",
        timeout_s: float | None = None,
    ) -> VerifyResult:
        """Verify one scan (encoded ``frames`` in capture order) at one gate (a kiosk sends
        the participant's ``venue_pass``)."""
        call = _verify_call(
            participant_id, training_id, training_type, gate, frames,
            session_id, scheduled_start, challenge_id, idempotency_key, venue_pass,
        )  # fmt: skip
        return self._send(call, timeout_s)

    def attempts(
        self,
        participant_id: str,
        training_id: str,
        training_type: TrainingType,
        *,
        timeout_s: float | None = None,
    ) -> Attempts:
        """Today's attempt count; spends nothing."""
        return self._send(_attempts_call(participant_id, training_id, training_type), timeout_s)

    def redeem(
        self,
        token: str,
        *,
        participant_id: str,
        audience: str,
        gate: Gate,
        session_id: str = "",
        training_id: str = "",
        timeout_s: float | None = None,
    ) -> Redemption:
        """Check ``token`` online and mark it used: admit ``participant_id`` (the one at the
        gate) only if ``valid``."""
        call = _redeem_call(token, participant_id, audience, gate, session_id, training_id)
        return self._send(call, timeout_s)

    def signing_keys(self, *, timeout_s: float | None = None) -> PublicKeySet:
        """The published token-verification keys (for :class:`TokenVerifier`)."""
        return self._send(_signing_keys_call(), timeout_s)


# --------------------------------------------------------------------------- async client


class AsyncFaceVerificationClient:
    """The asyncio twin of :class:`FaceVerificationClient` (same arguments and results).

    Create it inside the event loop that uses it; ``await close()`` when done.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        insecure: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
        load_balancing: str = "round_robin",
    ) -> None:
        self._conn = _Connection(api_key, timeout_s)
        channel_options = _channel_options(options, load_balancing)
        if insecure:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options)
        else:
            creds = _channel_credentials(root_certificates, certificate_chain, private_key)
            self._channel = grpc.aio.secure_channel(target, creds, options=channel_options)
        self._stub = pb_grpc.FaceVerificationStub(self._channel)  # type: ignore[no-untyped-call]
        self._target = target

    def __repr__(self) -> str:
        return f"AsyncFaceVerificationClient({self._target!r})"

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncFaceVerificationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, call: _Call[_Out], timeout_s: float | None) -> _Out:
        method = getattr(self._stub, call.method)
        try:
            response = await method(
                call.request,
                timeout=timeout_s or self._conn.timeout_s,
                metadata=self._conn.metadata,
            )
        except grpc.RpcError as exc:
            raise _service_error(exc) from None
        return call.parse(response)

    async def enroll(
        self,
        participant_id: str,
        images: Sequence[bytes],
        *,
        tenants: Sequence[str] = (),
        replace: bool = False,
        timeout_s: float | None = None,
    ) -> EnrollResult:
        """See :meth:`FaceVerificationClient.enroll`."""
        return await self._send(_enroll_call(participant_id, images, replace, tenants), timeout_s)

    async def set_enrollment_tenants(
        self, participant_id: str, tenants: Sequence[str], *, timeout_s: float | None = None
    ) -> Enrollment:
        """See :meth:`FaceVerificationClient.set_enrollment_tenants`."""
        return await self._send(_set_tenants_call(participant_id, tenants), timeout_s)

    async def start_challenge(
        self,
        participant_id: str,
        training_id: str,
        training_type: TrainingType,
        gate: Gate,
        *,
        venue_pass: str = "",
        timeout_s: float | None = None,
    ) -> Challenge:
        """See :meth:`FaceVerificationClient.start_challenge`."""
        call = _challenge_call(participant_id, training_id, training_type, gate, venue_pass)
        return await self._send(call, timeout_s)

    async def verify(
        self,
        participant_id: str,
        training_id: str,
        training_type: TrainingType,
        gate: Gate,
        frames: Sequence[bytes],
        *,
        session_id: str = "",
        scheduled_start: datetime | None = None,
        challenge_id: str = "",
        idempotency_key: str = "",
        venue_pass: str = "",
        timeout_s: float | None = None,
    ) -> VerifyResult:
        """See :meth:`FaceVerificationClient.verify`."""
        call = _verify_call(
            participant_id, training_id, training_type, gate, frames,
            session_id, scheduled_start, challenge_id, idempotency_key, venue_pass,
        )  # fmt: skip
        return await self._send(call, timeout_s)

    async def attempts(
        self,
        participant_id: str,
        training_id: str,
        training_type: TrainingType,
        *,
        timeout_s: float | None = None,
    ) -> Attempts:
        """See :meth:`FaceVerificationClient.attempts`."""
        call = _attempts_call(participant_id, training_id, training_type)
        return await self._send(call, timeout_s)

    async def redeem(
        self,
        token: str,
        *,
        participant_id: str,
        audience: str,
        gate: Gate,
        session_id: str = "",
        training_id: str = "",
        timeout_s: float | None = None,
    ) -> Redemption:
        """See :meth:`FaceVerificationClient.redeem`."""
        call = _redeem_call(token, participant_id, audience, gate, session_id, training_id)
        return await self._send(call, timeout_s)

    async def signing_keys(self, *, timeout_s: float | None = None) -> PublicKeySet:
        """See :meth:`FaceVerificationClient.signing_keys`."""
        return await self._send(_signing_keys_call(), timeout_s)


# --------------------------------------------------------------------------- offline verification

MAX_JWKS_BYTES = 64 * 1024
"""A JWKS of a few keys is under 1 KiB; refuse a runaway body."""


def check_jwks_url(url: str) -> str:
    """``url`` if keys may be fetched from it, else ValueError saying what to use.

    The key set decides which tokens a gate accepts: fetched over plain HTTP, anyone on the
    path could hand the gate keys of their own and then sign any token. So only ``https://``
    is accepted, and ``http://`` only to this machine (``localhost``, 127.0.0.0/8, ``::1``:
    a service on the same host, or a test), where no network is crossed.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return url
    raise ValueError(
        f"JWKS URL {url!r} refused: keys are fetched over https:// only (http:// only from "
        "this machine), or an attacker on the network could substitute their own; use "
        "https://<service>/.well-known/jwks.json, or GetSigningKeys over the gRPC channel"
    )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL :func:`check_jwks_url` accepts: an https:// key set
    that redirects to http:// elsewhere would reopen the hole."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        check_jwks_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_JWKS_OPENER = urllib.request.build_opener(_CheckedRedirects)


def fetch_jwks_url(url: str, *, timeout_s: float = 5.0) -> PublicKeySet:
    """GET a JWKS document (the service's ``/.well-known/jwks.json``) and parse it strictly.
    Raises ValueError for a URL :func:`check_jwks_url` refuses (and for a redirect to one)."""
    check_jwks_url(url)
    with _JWKS_OPENER.open(url, timeout=timeout_s) as response:
        body: bytes = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"JWKS at {url} is larger than {MAX_JWKS_BYTES} bytes")
    return PublicKeySet.from_json(body)


class _OfflineCheck:
    """What both verifiers do, apart from how they fetch keys: the check policy and the
    caching rules (times from the injected clock).

    * The key set is used for at most ``max_age`` after it was fetched, then fetched again:
      a key the service stopped publishing stops verifying here too.
    * A token with an unknown ``kid`` triggers one refresh, at most once per ``min_refresh``:
      a rotated-in key is picked up at once, while junk kids cannot hammer the service.

    :meth:`steps` is the check as a generator that yields when it needs a fresh key set and
    is sent the keys fetched; :func:`_run` and :func:`_run_async` drive it.
    """

    def __init__(
        self, issuer: str, leeway_s: float, max_age_s: float, min_refresh_s: float, clock: Clock
    ) -> None:
        if min_refresh_s < 0 or max_age_s <= min_refresh_s:
            # A cache that ages out faster than it may refresh would refuse every other call.
            raise ValueError("need 0 <= min_refresh_s < max_age_s")
        self.policy = CheckPolicy(issuer=issuer, leeway_s=leeway_s)
        self.clock = clock
        self.max_age = timedelta(seconds=max_age_s)
        self.min_refresh = timedelta(seconds=min_refresh_s)
        self.keys: PublicKeySet | None = None
        self.fetched_at: datetime | None = None
        self.attempted_at: datetime | None = None

    def _usable(self, now: datetime) -> PublicKeySet | None:
        """The cached keys unless absent or aged out."""
        if self.keys is None or self.fetched_at is None or now - self.fetched_at >= self.max_age:
            return None
        return self.keys

    def _may_refresh(self, now: datetime) -> bool:
        return self.attempted_at is None or now - self.attempted_at >= self.min_refresh

    def _refreshed(self, now: datetime) -> Generator[None, PublicKeySet, PublicKeySet]:
        self.attempted_at = now
        self.keys = yield
        self.fetched_at = now
        return self.keys

    def steps(
        self, token: str, expected: Expectation
    ) -> Generator[None, PublicKeySet, CheckResult]:
        """Check ``token`` against ``expected``, yielding for each key set it needs."""
        now = self.clock.now()
        keys = self._usable(now)
        if keys is None:
            if not self._may_refresh(now):
                raise KeySetUnavailable(
                    "the last fetch of the token signing keys failed less than "
                    f"{self.min_refresh.total_seconds():g} s ago; check the token online with "
                    "redeem()"
                )
            keys = yield from self._refreshed(now)
        result = check_token(token, keys, expected, self.policy, now)
        if result.reason is CheckReason.UNKNOWN_KEY and self._may_refresh(now):
            keys = yield from self._refreshed(now)
            result = check_token(token, keys, expected, self.policy, now)
        return result


def _fetch_failed(exc: Exception) -> KeySetUnavailable:
    return KeySetUnavailable(
        f"could not fetch the token signing keys ({exc}); check the token online with redeem()"
    )


def _run(
    steps: Generator[None, PublicKeySet, CheckResult], fetch: Callable[[], PublicKeySet]
) -> CheckResult:
    """Drive :meth:`_OfflineCheck.steps`, fetching keys with ``fetch`` whenever it asks."""
    try:
        next(steps)
        while True:
            try:
                keys = fetch()
            except Exception as exc:  # any transport failure means the same: no fresh keys
                raise _fetch_failed(exc) from exc
            steps.send(keys)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def _run_async(
    steps: Generator[None, PublicKeySet, CheckResult],
    fetch: Callable[[], Awaitable[PublicKeySet]],
) -> CheckResult:
    """:func:`_run` with a coroutine ``fetch``."""
    try:
        next(steps)
        while True:
            try:
                keys = await fetch()
            except Exception as exc:  # any transport failure means the same: no fresh keys
                raise _fetch_failed(exc) from exc
            steps.send(keys)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


class TokenVerifier:
    """Checks tokens offline against a cached JWKS, with the service's own rules.

    ``fetch`` returns the current key set: ``client.signing_keys`` or
    ``lambda: fetch_jwks_url(url)`` (see :meth:`from_client`, :meth:`from_url`). ``issuer``
    is the service's ``tokens.issuer``. An OK here proves the token genuine and meant for
    this gate, not unused: admit once only after ``redeem`` (or your own jti store) agrees.
    Thread-safe.
    """

    def __init__(
        self,
        fetch: Callable[[], PublicKeySet],
        *,
        issuer: str,
        leeway_s: float = DEFAULT_LEEWAY_S,
        max_age_s: float = 300.0,
        min_refresh_s: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        self._fetch = fetch
        self._check = _OfflineCheck(
            issuer, leeway_s, max_age_s, min_refresh_s, clock or SystemClock()
        )
        self._lock = threading.Lock()

    @classmethod
    def from_client(cls, client: FaceVerificationClient, **kwargs: Any) -> TokenVerifier:
        """Keys via the GetSigningKeys RPC."""
        return cls(client.signing_keys, **kwargs)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 5.0, **kwargs: Any) -> TokenVerifier:
        """Keys via HTTP GET of ``url`` (``https://<service>/.well-known/jwks.json``); raises
        ValueError at once for a URL :func:`check_jwks_url` refuses."""
        check_jwks_url(url)
        return cls(lambda: fetch_jwks_url(url, timeout_s=timeout_s), **kwargs)

    def verify(self, token: str, expected: Expectation) -> CheckResult:
        """Check ``token`` against ``expected``.

        Raises :class:`KeySetUnavailable` when the key set is needed (the cache is empty or
        aged out, or the token names an unseen kid) and cannot be fetched: the caller should
        then check online with ``redeem``, which it must call anyway to admit once.
        """
        with self._lock:
            return _run(self._check.steps(token, expected), self._fetch)


class AsyncTokenVerifier:
    """The asyncio twin of :class:`TokenVerifier`; ``fetch`` is a coroutine function."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[PublicKeySet]],
        *,
        issuer: str,
        leeway_s: float = DEFAULT_LEEWAY_S,
        max_age_s: float = 300.0,
        min_refresh_s: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        self._fetch = fetch
        self._check = _OfflineCheck(
            issuer, leeway_s, max_age_s, min_refresh_s, clock or SystemClock()
        )
        self._lock = asyncio.Lock()

    @classmethod
    def from_client(cls, client: AsyncFaceVerificationClient, **kwargs: Any) -> AsyncTokenVerifier:
        """Keys via the GetSigningKeys RPC."""
        return cls(client.signing_keys, **kwargs)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 5.0, **kwargs: Any) -> AsyncTokenVerifier:
        """Keys via HTTP GET of ``url``, in a worker thread so the loop never blocks; raises
        ValueError at once for a URL :func:`check_jwks_url` refuses."""
        check_jwks_url(url)

        async def fetch() -> PublicKeySet:
            return await asyncio.to_thread(fetch_jwks_url, url, timeout_s=timeout_s)

        return cls(fetch, **kwargs)

    async def verify(self, token: str, expected: Expectation) -> CheckResult:
        """See :meth:`TokenVerifier.verify`."""
        async with self._lock:
            return await _run_async(self._check.steps(token, expected), self._fetch)
