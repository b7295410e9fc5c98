"""Request validation for the gRPC contract: each check names the field and why.

Every ``check_*`` function raises :class:`InvalidArgument` for the first problem
it finds and returns ``None`` for a well-formed request. The transport maps
:class:`InvalidArgument` to gRPC INVALID_ARGUMENT (and the JSON gateway to HTTP
400); the engine can then assume well-formed input. Whether an image decodes,
or holds a face, is not checked here: that is a decision, not a malformed request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.config import ServerSettings
from facesvc.domain import ID_CHARS, ID_PATTERN
from facesvc.errors import InvalidRequest

MAX_ID_CHARS = 128
MAX_TOKEN_CHARS = 8192
# Identifiers come from the programme's systems and end up in Redis keys, logs
# and token claims: a conservative alphabet keeps all three safe.
_PRINTABLE_RE = re.compile(r"[\x21-\x7e]+")
# Timestamps outside 1970..9999 are client bugs, not schedules.
_MAX_TIMESTAMP_S = 253402300799

_SESSION_GATES = (pb.GATE_SESSION, pb.GATE_POST_TEST)
_ONLINE_TYPES = (pb.TRAINING_TYPE_SPL, pb.TRAINING_TYPE_WEBINAR)


class InvalidArgument(InvalidRequest):
    """A malformed request: ``field`` (e.g. ``frames[2]``) and ``why``."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Size bounds on requests (from :class:`~facesvc.config.ServerSettings`)."""

    max_frames: int
    max_images: int
    max_image_bytes: int
    max_message_bytes: int

    @classmethod
    def from_settings(cls, server: ServerSettings) -> RequestLimits:
        return cls(
            server.max_frames, server.max_images, server.max_image_bytes, server.max_message_bytes
        )


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _identifier(field: str, value: str, *, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidArgument(field, "is required and was empty")
        return
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(field, f"is {len(value)} characters; at most {MAX_ID_CHARS}")
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(field, f"may hold only {ID_CHARS}")


def _enum(field: str, value: int, name: str) -> None:
    """``value`` must be a non-zero number of proto enum ``name``: proto3 enums are
    open, so a client built from a newer contract can send numbers we do not know."""
    descriptor = pb.DESCRIPTOR.enum_types_by_name[name]
    if value == 0:
        raise InvalidArgument(field, f"is required; set a {name} value")
    if value not in descriptor.values_by_number:
        allowed = ", ".join(v.name for v in descriptor.values if v.number != 0)
        raise InvalidArgument(field, f"{value} is not a known {name}; use one of {allowed}")


def _session(field: str, value: str, gate: int) -> None:
    _identifier(field, value, required=gate in _SESSION_GATES)


def _blobs(field: str, blobs: list[bytes], most: int, max_bytes: int) -> None:
    if not blobs:
        raise InvalidArgument(field, "needs at least one encoded image")
    if len(blobs) > most:
        raise InvalidArgument(field, f"has {len(blobs)} images; at most {most} are accepted")
    for i, blob in enumerate(blobs):
        if not blob:
            raise InvalidArgument(f"{field}[{i}]", "is empty")
        if len(blob) > max_bytes:
            raise InvalidArgument(
                f"{field}[{i}]",
                f"is {_mib(len(blob))}; at most {_mib(max_bytes)} per image (send a smaller JPEG)",
            )


def _timestamp(field: str, ts: Timestamp) -> None:
    if not 0 <= ts.seconds <= _MAX_TIMESTAMP_S or not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument(field, "is not a valid time between 1970 and 9999")


def _printable(field: str, value: str) -> None:
    if value and (len(value) > MAX_ID_CHARS or not _PRINTABLE_RE.fullmatch(value)):
        raise InvalidArgument(
            field, f"must be 1..{MAX_ID_CHARS} printable ASCII characters without spaces"
        )


def _training(
    req: pb.VerifyRequest | pb.StartLivenessChallengeRequest | pb.CreateLaunchTicketRequest,
) -> None:
    _identifier("participant_id", req.participant_id)
    _identifier("training_id", req.training_id)
    _enum("training_type", req.training_type, "TrainingType")
    _enum("gate", req.gate, "Gate")
    if req.gate == pb.GATE_POST_TEST and req.training_type not in _ONLINE_TYPES:
        raise InvalidArgument("gate", "POST_TEST applies only to SPL and WEBINAR trainings")


def check_message_size(req: Message, limits: RequestLimits) -> None:
    """The whole request within ``max_message_bytes``. The gRPC transport limit is
    set above it (see :func:`transport_limit`) so that a request somewhat too large
    gets this clear INVALID_ARGUMENT instead of a bare RESOURCE_EXHAUSTED."""
    size = req.ByteSize()
    if size > limits.max_message_bytes:
        raise InvalidArgument(
            "request",
            f"is {_mib(size)}; at most {_mib(limits.max_message_bytes)} "
            "(send fewer or smaller images)",
        )


def transport_limit(max_message_bytes: int) -> int:
    """The gRPC receive limit for a service whose valid requests are at most
    ``max_message_bytes``: twice that, so memory stays bounded while oversize
    requests up to that point are answered by :func:`check_message_size`."""
    return 2 * max_message_bytes


MAX_TENANTS = 64
"""Most tenants one enrollment may list."""

MAX_VENUE_PASS_CHARS = 4096
"""Longest venue pass accepted (a pass is about 500 characters)."""


def check_enroll(req: pb.EnrollRequest, limits: RequestLimits) -> None:
    _identifier("participant_id", req.participant_id)
    _blobs("images", list(req.images), limits.max_images, limits.max_image_bytes)
    _tenants(list(req.tenants))


def check_set_tenants(req: pb.SetEnrollmentTenantsRequest) -> None:
    _identifier("participant_id", req.participant_id)
    _tenants(list(req.tenants))


def _tenants(tenants: list[str]) -> None:
    if len(tenants) > MAX_TENANTS:
        raise InvalidArgument("tenants", f"lists {len(tenants)}; at most {MAX_TENANTS}")
    for i, tenant in enumerate(tenants):
        _identifier(f"tenants[{i}]", tenant)


def _venue_pass(value: str) -> None:
    if value and (len(value) > MAX_VENUE_PASS_CHARS or not _PRINTABLE_RE.fullmatch(value)):
        raise InvalidArgument(
            "venue_pass",
            f"must be the QR code's text: 1..{MAX_VENUE_PASS_CHARS} printable ASCII characters",
        )


def check_participant(req: pb.GetEnrollmentRequest | pb.DeleteEnrollmentRequest) -> None:
    _identifier("participant_id", req.participant_id)


def check_start_liveness_challenge(req: pb.StartLivenessChallengeRequest) -> None:
    _training(req)
    _venue_pass(req.venue_pass)


def check_verify(req: pb.VerifyRequest, limits: RequestLimits) -> None:
    _training(req)
    _session("session_id", req.session_id, req.gate)
    if req.HasField("scheduled_start"):
        _timestamp("scheduled_start", req.scheduled_start)
    _printable("challenge_id", req.challenge_id)
    _blobs("frames", list(req.frames), limits.max_frames, limits.max_image_bytes)
    _printable("idempotency_key", req.idempotency_key)
    _venue_pass(req.venue_pass)


def check_create_launch_ticket(req: pb.CreateLaunchTicketRequest) -> None:
    _training(req)
    _session("session_id", req.session_id, req.gate)
    if req.HasField("scheduled_start"):
        _timestamp("scheduled_start", req.scheduled_start)
    if not req.return_url:
        raise InvalidArgument("return_url", "is required: the page sends the browser back there")


def check_get_attempts(req: pb.GetAttemptsRequest) -> None:
    _identifier("participant_id", req.participant_id)
    _identifier("training_id", req.training_id)
    _enum("training_type", req.training_type, "TrainingType")


def check_redeem_token(req: pb.RedeemTokenRequest) -> None:
    if not req.token:
        raise InvalidArgument("token", "is required and was empty")
    if len(req.token) > MAX_TOKEN_CHARS:
        raise InvalidArgument("token", f"is {len(req.token)} characters; at most {MAX_TOKEN_CHARS}")
    _enum("expected_gate", req.expected_gate, "Gate")
    _session("expected_session_id", req.expected_session_id, req.expected_gate)
    _identifier("expected_training_id", req.expected_training_id, required=False)
    _identifier("audience", req.audience)
    _identifier("expected_participant_id", req.expected_participant_id)
