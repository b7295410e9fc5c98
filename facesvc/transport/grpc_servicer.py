"""The gRPC transport: authenticate, validate, call the engine, map errors.

Nothing here computes a face. Each RPC does the same three things:

1. ``caller = await self._admit(context, rpc)``: the auth hook (:class:`Authenticator`).
2. ``self._validate(context, check)``: :mod:`facesvc.transport.validation`; a malformed request
   ends as INVALID_ARGUMENT naming the field.
3. call the engine and map its result to the response message. Until a
   capability is wired in, the RPC answers UNIMPLEMENTED naming what is missing
   (a server started without an engine, or a capability this build lacks), never a fake
   success.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.engine import (
    Caller,
    Engine,
    VerifyCommand,
)
from facesvc.errors import ServiceError
from facesvc.tokens.claims import Expectation
from facesvc.tokens.launch import Launcher, LaunchScope
from facesvc.transport import validation
from facesvc.transport.grpc_messages import (
    challenge_response,
    enroll_response,
    enrollment_message,
    redeem_response,
    signing_keys_response,
    timestamp,
    verify_response,
)
from facesvc.transport.status import Status, status_of
from facesvc.wire import GATES, TRAINING_TYPES

T = TypeVar("T")


class Authenticator(Protocol):
    """Maps a call's credentials (metadata, TLS peer) to a :class:`Caller`.

    Implementations abort the call with UNAUTHENTICATED or PERMISSION_DENIED
    themselves, naming what is wrong.
    """

    async def authenticate(self, context: grpc.aio.ServicerContext, rpc: str) -> Caller: ...


DEV_TENANT = "dev"
"""The tenant of every caller without authentication: the audience of its tokens and of the
launch tickets it creates."""


class DevAuthenticator:
    """No authentication: every caller is an admin. Used only when
    ``security.api_keys_file`` is unset (local development; the start-up banner says so);
    with a keys file, :class:`facesvc.transport.auth.ApiKeyAuthenticator` takes its place."""

    async def authenticate(self, context: grpc.aio.ServicerContext, rpc: str) -> Caller:
        return Caller(name="anonymous", role="admin", tenant=DEV_TENANT)


class FaceVerificationServicer(pb_grpc.FaceVerificationServicer):
    """The ``facesvc.v1.FaceVerification`` service.

    ``engine`` is None while no engine is configured: every RPC then validates
    its request and answers UNIMPLEMENTED. With ``loading``, an engine is on its way
    (:meth:`attach_engine`) and calls answer UNAVAILABLE until it arrives.
    """

    def __init__(
        self,
        engine: Engine | None,
        *,
        limits: validation.RequestLimits,
        authenticator: Authenticator,
        loading: bool = False,
        launcher: Launcher | None = None,
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._auth = authenticator
        self._loading = loading
        self._launcher = launcher

    def attach_engine(self, engine: Engine) -> None:
        """Serve with ``engine`` from now on (called once the model pack has loaded)."""
        self._engine = engine
        self._loading = False

    # ------------------------------------------------------------ helpers

    async def _admit(self, context: grpc.aio.ServicerContext, rpc: str) -> Caller:
        return await self._auth.authenticate(context, rpc)

    async def _validate(
        self, context: grpc.aio.ServicerContext, request: Message, check: Callable[[], None]
    ) -> None:
        try:
            validation.check_message_size(request, self._limits)
            check()
        except validation.InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _ready(self, context: grpc.aio.ServicerContext) -> Engine:
        """The engine, or abort: UNAVAILABLE while the model pack loads, UNIMPLEMENTED when
        this server was started without one."""
        if self._engine is not None:
            return self._engine
        if self._loading:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the model pack is loading; retry in a few seconds"
            )
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "this server runs without a verification engine (started with engine=None)",
        )
        raise AssertionError("context.abort returned")  # abort always raises

    async def _call(self, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
        """Await the engine's ``work``; a refusal that is not a decision aborts the call with
        its status from the one table (``facesvc.transport.status``)."""
        try:
            return await work
        except Exception as exc:  # every error has its status; an unknown one is INTERNAL
            await _abort_with(context, status_of(exc))
        raise AssertionError("context.abort returned")

    # ------------------------------------------------------------ RPCs

    async def Enroll(
        self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnrollResponse:
        caller = await self._admit(context, "Enroll")
        await self._validate(
            context, request, lambda: validation.check_enroll(request, self._limits)
        )
        engine = await self._ready(context)
        outcome = await self._call(
            context,
            engine.enroll(
                request.participant_id,
                list(request.images),
                replace=request.replace,
                caller=caller,
                tenants=frozenset(request.tenants),
            ),
        )
        return enroll_response(outcome)

    async def GetEnrollment(
        self, request: pb.GetEnrollmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEnrollmentResponse:
        await self._admit(context, "GetEnrollment")
        await self._validate(context, request, lambda: validation.check_participant(request))
        engine = await self._ready(context)
        metadata = await self._call(context, engine.enrollment(request.participant_id))
        if metadata is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"participant {request.participant_id} is not enrolled: call Enroll first",
            )
            raise AssertionError("context.abort returned")
        return pb.GetEnrollmentResponse(enrollment=enrollment_message(metadata))

    async def DeleteEnrollment(
        self, request: pb.DeleteEnrollmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteEnrollmentResponse:
        caller = await self._admit(context, "DeleteEnrollment")
        await self._validate(context, request, lambda: validation.check_participant(request))
        engine = await self._ready(context)
        deleted = await self._call(
            context, engine.delete_enrollment(request.participant_id, caller=caller)
        )
        return pb.DeleteEnrollmentResponse(deleted=deleted)

    async def SetEnrollmentTenants(
        self, request: pb.SetEnrollmentTenantsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetEnrollmentTenantsResponse:
        caller = await self._admit(context, "SetEnrollmentTenants")
        await self._validate(context, request, lambda: validation.check_set_tenants(request))
        engine = await self._ready(context)
        metadata = await self._call(
            context,
            engine.set_tenants(request.participant_id, frozenset(request.tenants), caller=caller),
        )
        return pb.SetEnrollmentTenantsResponse(enrollment=enrollment_message(metadata))

    async def StartLivenessChallenge(
        self, request: pb.StartLivenessChallengeRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartLivenessChallengeResponse:
        caller = await self._admit(context, "StartLivenessChallenge")
        await self._validate(
            context, request, lambda: validation.check_start_liveness_challenge(request)
        )
        engine = await self._ready(context)
        challenge = await self._call(
            context,
            engine.start_challenge(
                request.participant_id,
                request.training_id,
                TRAINING_TYPES.from_wire(request.training_type),
                GATES.from_wire(request.gate),
                caller=caller,
                venue_pass=request.venue_pass or None,
            ),
        )
        return challenge_response(challenge)

    async def Verify(
        self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyResponse:
        caller = await self._admit(context, "Verify")
        await self._validate(
            context, request, lambda: validation.check_verify(request, self._limits)
        )
        engine = await self._ready(context)
        remaining = context.time_remaining()
        command = VerifyCommand(
            participant_id=request.participant_id,
            training_id=request.training_id,
            training_type=TRAINING_TYPES.from_wire(request.training_type),
            gate=GATES.from_wire(request.gate),
            session_id=request.session_id,
            frames=list(request.frames),
            caller=caller,
            scheduled_start=_scheduled_start(request),
            challenge_id=request.challenge_id or None,
            idempotency_key=request.idempotency_key or None,
            deadline=None if remaining is None else time.monotonic() + remaining,
            venue_pass=request.venue_pass or None,
        )
        outcome = await self._call(context, engine.verify(command))
        return verify_response(outcome)

    async def GetAttempts(
        self, request: pb.GetAttemptsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAttemptsResponse:
        caller = await self._admit(context, "GetAttempts")
        await self._validate(context, request, lambda: validation.check_get_attempts(request))
        engine = await self._ready(context)
        usage = await self._call(
            context,
            engine.attempts(
                request.participant_id,
                request.training_id,
                TRAINING_TYPES.from_wire(request.training_type),
                caller=caller,
            ),
        )
        return pb.GetAttemptsResponse(
            used=usage.used,
            remaining=usage.remaining,
            limit=usage.limit,
            resets_at=timestamp(usage.resets_at),
        )

    async def RedeemToken(
        self, request: pb.RedeemTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.RedeemTokenResponse:
        caller = await self._admit(context, "RedeemToken")
        await self._validate(context, request, lambda: validation.check_redeem_token(request))
        engine = await self._ready(context)
        expected = Expectation(
            audience=request.audience,
            gate=GATES.from_wire(request.expected_gate),
            session_id=request.expected_session_id,
            training_id=request.expected_training_id or None,
            participant_id=request.expected_participant_id,
        )
        result = await self._call(context, engine.redeem(request.token, expected, caller=caller))
        return redeem_response(result)

    async def GetSigningKeys(
        self, request: pb.GetSigningKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSigningKeysResponse:
        await self._admit(context, "GetSigningKeys")
        await self._validate(context, request, lambda: None)
        engine = await self._ready(context)
        return signing_keys_response(engine.signing_keys())

    async def CreateLaunchTicket(
        self, request: pb.CreateLaunchTicketRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateLaunchTicketResponse:
        caller = await self._admit(context, "CreateLaunchTicket")
        await self._validate(
            context, request, lambda: validation.check_create_launch_ticket(request)
        )
        if self._launcher is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "this server runs without the Scan Wajah portal"
            )
            raise AssertionError("context.abort returned")
        if not caller.programme_wide:
            # The page scans only the participant the ticket names: only for a tenant that
            # may act for them.
            engine = await self._ready(context)
            await self._call(context, engine.admit(caller, request.participant_id))
        scope = LaunchScope(
            participant_id=request.participant_id,
            training_id=request.training_id,
            training_type=TRAINING_TYPES.from_wire(request.training_type),
            gate=GATES.from_wire(request.gate),
            session_id=request.session_id,
            scheduled_start=_scheduled_start(request),
            return_url=request.return_url,
            # The token audience is the caller's own tenant, never a request field.
            tenant=caller.tenant,
        )
        try:
            ticket, page_url = self._launcher.launch(scope)
        except ServiceError as exc:  # a bad field, a URL off the allowlist, no signing key
            await _abort_with(context, status_of(exc))
            raise AssertionError("context.abort returned") from exc
        return pb.CreateLaunchTicketResponse(
            ticket=ticket.token, page_url=page_url, expires_at=timestamp(ticket.expires_at)
        )


def _scheduled_start(
    request: pb.VerifyRequest | pb.CreateLaunchTicketRequest,
) -> datetime | None:
    """The request's optional ``scheduled_start`` (tz-aware, UTC), or None when unset."""
    if not request.HasField("scheduled_start"):
        return None
    moment: datetime = request.scheduled_start.ToDatetime(tzinfo=UTC)
    return moment


# ---------------------------------------------------------------- metrics


async def _abort_with(context: grpc.aio.ServicerContext, status: Status) -> None:
    if status.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(status.retry_after_s)),))
    await context.abort(status.grpc_code, status.message)
