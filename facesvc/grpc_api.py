"""The gRPC transport: authenticate, validate, call the engine, map errors.

Nothing here computes a face. Each RPC does the same three things:

1. ``caller = await self._admit(context, rpc)``: the auth hook (:class:`Authenticator`).
2. ``self._validate(context, check)``: :mod:`facesvc.validation`; a malformed request
   ends as INVALID_ARGUMENT naming the field.
3. call the engine and map its result to the response message. Until a
   capability is wired in, the RPC answers UNIMPLEMENTED naming what is missing
   (:data:`MISSING`), never a fake success.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf.message import Message

from facesvc import validation
from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.metrics import Metrics

MISSING: dict[str, str] = {
    "Enroll": "Enroll needs enrollment and the template store (issue 4)",
    "GetEnrollment": "GetEnrollment needs the template store (issue 4)",
    "DeleteEnrollment": "DeleteEnrollment needs the template store (issue 4)",
    "StartLivenessChallenge": "StartLivenessChallenge needs liveness challenges (issue 6)",
    "Verify": "Verify needs the verification engine (issue 4)",
    "GetAttempts": "GetAttempts needs the daily attempt caps (issue 4)",
    "RedeemToken": "RedeemToken needs signed tokens (issue 5)",
    "GetSigningKeys": "GetSigningKeys needs signed tokens (issue 5)",
}
"""What each RPC still lacks; an entry goes when the RPC is wired to the engine."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: ``role`` is one of lms, portal, kiosk, admin; ``tenant`` is the
    LMS or venue the credential belongs to (the token audience for an LMS)."""

    name: str
    role: str
    tenant: str


class Authenticator(Protocol):
    """Maps a call's credentials (metadata, TLS peer) to a :class:`Caller`.

    Implementations abort the call with UNAUTHENTICATED or PERMISSION_DENIED
    themselves, naming what is wrong.
    """

    async def authenticate(self, context: grpc.aio.ServicerContext, rpc: str) -> Caller: ...


class DevAuthenticator:
    """No authentication: every caller is an admin. Used only when
    ``security.api_keys_file`` is unset (local development; issue 10 brings keys)."""

    async def authenticate(self, context: grpc.aio.ServicerContext, rpc: str) -> Caller:
        return Caller(name="anonymous", role="admin", tenant="dev")


class Engine(Protocol):
    """The verification engine (facesvc.engine) as the transport sees it.

    Empty until the engine lands: the servicer only needs to know whether one is
    there. The engine's own protocol replaces this when it is wired in.
    """


class FaceVerificationServicer(pb_grpc.FaceVerificationServicer):
    """The ``facesvc.v1.FaceVerification`` service.

    ``engine`` is None while no engine is configured: every RPC then validates
    its request and answers UNIMPLEMENTED with the :data:`MISSING` message.
    With ``loading``, an engine is on its way (:meth:`attach_engine`) and calls
    answer UNAVAILABLE until it arrives.
    """

    def __init__(
        self,
        engine: Engine | None,
        *,
        limits: validation.RequestLimits,
        authenticator: Authenticator,
        loading: bool = False,
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._auth = authenticator
        self._loading = loading

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

    async def _unimplemented(self, context: grpc.aio.ServicerContext, rpc: str) -> NoReturn:
        if self._loading:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the model pack is loading; retry in a few seconds"
            )
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, MISSING[rpc])
        raise AssertionError("context.abort returned")  # abort always raises

    # ------------------------------------------------------------ RPCs

    async def Enroll(
        self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnrollResponse:
        await self._admit(context, "Enroll")
        await self._validate(
            context, request, lambda: validation.check_enroll(request, self._limits)
        )
        await self._unimplemented(context, "Enroll")

    async def GetEnrollment(
        self, request: pb.GetEnrollmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEnrollmentResponse:
        await self._admit(context, "GetEnrollment")
        await self._validate(context, request, lambda: validation.check_participant(request))
        await self._unimplemented(context, "GetEnrollment")

    async def DeleteEnrollment(
        self, request: pb.DeleteEnrollmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteEnrollmentResponse:
        await self._admit(context, "DeleteEnrollment")
        await self._validate(context, request, lambda: validation.check_participant(request))
        await self._unimplemented(context, "DeleteEnrollment")

    async def StartLivenessChallenge(
        self, request: pb.StartLivenessChallengeRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartLivenessChallengeResponse:
        await self._admit(context, "StartLivenessChallenge")
        await self._validate(
            context, request, lambda: validation.check_start_liveness_challenge(request)
        )
        await self._unimplemented(context, "StartLivenessChallenge")

    async def Verify(
        self, request: pb.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyResponse:
        await self._admit(context, "Verify")
        await self._validate(
            context, request, lambda: validation.check_verify(request, self._limits)
        )
        await self._unimplemented(context, "Verify")

    async def GetAttempts(
        self, request: pb.GetAttemptsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAttemptsResponse:
        await self._admit(context, "GetAttempts")
        await self._validate(context, request, lambda: validation.check_get_attempts(request))
        await self._unimplemented(context, "GetAttempts")

    async def RedeemToken(
        self, request: pb.RedeemTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.RedeemTokenResponse:
        await self._admit(context, "RedeemToken")
        await self._validate(context, request, lambda: validation.check_redeem_token(request))
        await self._unimplemented(context, "RedeemToken")

    async def GetSigningKeys(
        self, request: pb.GetSigningKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSigningKeysResponse:
        await self._admit(context, "GetSigningKeys")
        await self._validate(context, request, lambda: None)
        await self._unimplemented(context, "GetSigningKeys")


# ---------------------------------------------------------------- metrics

_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _status_name(code: Any) -> str:
    """A gRPC status code as its name, whatever form the context reports it in."""
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int) and code in _CODE_BY_VALUE:
        return str(_CODE_BY_VALUE[code].name)
    return "OK" if code is None else "UNKNOWN"


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every unary call by method and status code, and times it."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not inspect.iscoroutinefunction(handler.unary_unary):
            return handler  # streaming (health Watch, reflection): not counted
        method = str(handler_call_details.method).lstrip("/")
        inner = handler.unary_unary
        m = self._metrics

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            m.grpc_in_flight.labels(method).inc()
            try:
                response = await inner(request, context)
                code = _status_name(context.code())
                return response
            except BaseException:
                # context.abort() records its code before raising; anything
                # else escaping a handler is a bug, reported to the client as UNKNOWN.
                code = _status_name(context.code())
                if code == "OK":
                    code = "UNKNOWN"
                raise
            finally:
                m.grpc_in_flight.labels(method).dec()
                m.grpc_calls.labels(method, code).inc()
                m.grpc_latency.labels(method).observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
