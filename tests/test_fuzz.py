"""Property-based fuzzing with a bounded budget: image decoding, and every field of every RPC
through the real in-process server with the real engine.

Properties:

- :func:`decode_image` either returns an (H, W, 3) uint8 picture within the pixel limit or
  raises ImageRejected; nothing else escapes, for random bytes and for real JPEG/PNG/WebP
  files with flipped bytes, truncations, splices and rewritten header dimensions.
- Memory stays bounded: the Python/numpy allocations of one decode (tracemalloc peak) stay
  within a few bytes per allowed pixel. Pillow's own C buffers are invisible to
  tracemalloc; what bounds them is the pixel count read from the header before decoding,
  which the rewritten-dimension cases exercise (a header claiming 2^31 pixels is refused).
- The server never fails uncleanly: every call ends OK or with a status a client can act on
  (INVALID_ARGUMENT for a malformed request, NOT_FOUND, ALREADY_EXISTS,
  FAILED_PRECONDITION), never UNKNOWN/INTERNAL, and a request that breaks the contract's
  field rules is always INVALID_ARGUMENT naming a field.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.domain import ID_PATTERN
from facesvc.imaging import DecodeLimits, ImageRejected, decode_image
from tests.conftest import RunningServer, ServerStarter
from tests.engine_support import astronaut, jpeg
from tests.test_service_verify import PID, enroll, start

LIMITS = DecodeLimits(max_bytes=256 * 1024, max_pixels=1_000_000)
BUDGET = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
SERVER_BUDGET = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    picture = Image.fromarray(astronaut()[::8, ::8]).convert(mode)  # 64x64
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = {
    "jpeg": _encoded("JPEG"),
    "png": _encoded("PNG"),
    "png-palette": _encoded("PNG", "P"),
    "png-grey-alpha": _encoded("PNG", "LA"),
    "webp": _encoded("WEBP"),
}


def _with_png_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (a PNG) with IHDR's width and height replaced and its CRC fixed, so the
    header is believable and only the claimed size is hostile."""
    ihdr = data.index(b"IHDR")
    body = struct.pack(">II", width, height) + data[ihdr + 12 : ihdr + 17]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return data[: ihdr + 4] + body + crc + data[ihdr + 21 :]


def _with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (a baseline JPEG) with the SOF0 frame's dimensions replaced."""
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


@st.composite
def hostile_images(draw: st.DrawFn) -> bytes:
    """Random bytes, or a real file mutated in one of several ways."""
    kind = draw(st.sampled_from(["random", "flip", "truncate", "splice", "dims"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    seed_name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[seed_name])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "splice":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    else:
        width = draw(st.integers(0, 65535))
        height = draw(st.integers(0, 65535))
        if seed_name.startswith("png"):
            big = draw(st.booleans())
            w, h = (width * 32768, height * 32768) if big else (width, height)
            return _with_png_size(bytes(data), min(w, 2**31 - 1), min(h, 2**31 - 1))
        if seed_name == "jpeg":
            return _with_jpeg_size(bytes(data), width, height)
    return bytes(data)


@BUDGET
@given(data=hostile_images())
def test_decode_returns_a_bounded_picture_or_refuses(data: bytes) -> None:
    tracemalloc.start()
    try:
        picture = decode_image(data, LIMITS)
    except ImageRejected as refused:
        assert str(refused)  # a sentence for the caller, never an empty error
        return
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert 0 < picture.shape[0] * picture.shape[1] <= LIMITS.max_pixels
    # Output (3 B/px) plus at most a few same-sized intermediates (RGBA compositing, the
    # 16-bit grey path's int64 plane): 32 B per allowed pixel, whatever the input claimed.
    assert peak <= 32 * LIMITS.max_pixels + 4 * len(data)


def test_a_header_claiming_a_huge_picture_is_refused_before_decoding() -> None:
    claimed = _with_png_size(SEEDS["png"], 2**31 - 1, 2**31 - 1)
    tracemalloc.start()
    try:
        with pytest.raises(ImageRejected, match="smaller photo"):
            decode_image(claimed, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # nothing near the claimed size was allocated


# ---------------------------------------------------------------- every RPC, every field

MAX_IMAGES = 3
MAX_IMAGE_BYTES = 256 * 1024  # the enrollment photo fits
CLEAN_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,  # CreateLaunchTicket: a return URL off the allowlist
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
VALID_ID = ID_PATTERN  # the contract's id rule, shared by validation and the stores

SAFE_ID = r"[A-Za-z0-9_.@-]{1,24}"
RETURN = "https://lms.example/scan-return/"


@st.composite
def timestamps(draw: st.DrawFn, *, low: int, high: int) -> dict[str, int]:
    return {"seconds": draw(st.integers(low, high)), "nanos": draw(st.integers(0, 999_999_999))}


def field(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> tuple[Any, Any]:
    """A field's well-formed values and its hostile ones."""
    return valid, hostile


hostile_ids = st.one_of(st.text(max_size=140), st.text(alphabet="{}*?[]\\:+ \x00\n", max_size=8))
hostile_enums = st.integers(-(2**31), 2**31 - 1)
good_frames = st.lists(
    st.one_of(hostile_images().map(lambda b: b or b"\0"), st.just(SEEDS["jpeg"])),
    min_size=1,
    max_size=MAX_IMAGES,
)
bad_frames = st.lists(
    st.one_of(
        hostile_images(),
        st.just(b""),
        st.just(SEEDS["jpeg"] + b"\0" * MAX_IMAGE_BYTES),  # over the byte limit
    ),
    min_size=0,
    max_size=MAX_IMAGES + 1,
)
FIELDS: dict[str, tuple[Any, Any]] = {
    # Mostly the enrolled participant, so Verify gets past NOT_ENROLLED to the decoder.
    "participant_id": field(
        st.sampled_from([PID, PID, PID]) | st.from_regex(SAFE_ID, fullmatch=True), hostile_ids
    ),
    "training_id": field(st.from_regex(SAFE_ID, fullmatch=True), hostile_ids),
    "session_id": field(st.from_regex(SAFE_ID, fullmatch=True), hostile_ids),
    "audience": field(st.just("dev") | st.from_regex(SAFE_ID, fullmatch=True), hostile_ids),
    "training_type": field(st.sampled_from([1, 2, 3]), hostile_enums),
    "gate": field(st.sampled_from([1, 2]), hostile_enums),
    "frames": field(good_frames, bad_frames),
    "scheduled_start": field(
        st.none() | timestamps(low=1_700_000_000, high=1_900_000_000),
        timestamps(low=-(2**63), high=2**63 - 1),
    ),
    "text": field(
        st.just("") | st.from_regex(r"[!-~]{1,40}", fullmatch=True), st.text(max_size=140)
    ),
    "return_url": field(
        st.sampled_from([RETURN, RETURN + "done?course=7", "https://elsewhere.example/"]),
        st.text(max_size=300) | st.just("javascript:alert(1)"),
    ),
    "token": field(
        st.text(min_size=1, max_size=300),
        st.just("") | st.integers(8193, 8300).map(lambda n: "t" * n),
    ),
}


class Draw:
    """Draws a request's fields: well-formed, except for the (at most two) fields chosen to
    be hostile, so the fuzz reaches the engine as well as the validators."""

    def __init__(self, draw: st.DrawFn, names: list[str]) -> None:
        self._draw = draw
        count = min(draw(st.sampled_from([0, 0, 1, 1, 2])), len(names))
        self._hostile = draw(st.sets(st.sampled_from(names), min_size=count, max_size=count))

    def __call__(self, name: str, kind: str | None = None) -> Any:
        valid, hostile = FIELDS[kind or name]
        return self._draw(hostile if name in self._hostile else valid)


def _verify(d: st.DrawFn) -> Message:
    f = Draw(
        d,
        [
            "participant_id",
            "training_id",
            "training_type",
            "gate",
            "session_id",
            "scheduled_start",
            "challenge_id",
            "frames",
            "idempotency_key",
        ],
    )
    return pb.VerifyRequest(
        participant_id=f("participant_id"),
        training_id=f("training_id"),
        training_type=f("training_type"),
        gate=f("gate"),
        session_id=f("session_id"),
        scheduled_start=f("scheduled_start"),
        challenge_id=f("challenge_id", "text"),
        frames=f("frames"),
        idempotency_key=f("idempotency_key", "text"),
    )


def _challenge(d: st.DrawFn) -> Message:
    f = Draw(d, ["participant_id", "training_id", "training_type", "gate"])
    return pb.StartLivenessChallengeRequest(
        participant_id=f("participant_id"),
        training_id=f("training_id"),
        training_type=f("training_type"),
        gate=f("gate"),
    )


def _redeem(d: st.DrawFn) -> Message:
    f = Draw(d, ["token", "expected_gate", "expected_session_id", "audience"])
    return pb.RedeemTokenRequest(
        token=f("token"),
        expected_gate=f("expected_gate", "gate"),
        expected_session_id=f("expected_session_id", "session_id"),
        audience=f("audience"),
    )


def _enroll(d: st.DrawFn) -> Message:
    f = Draw(d, ["participant_id", "images"])
    pid = f("participant_id")
    # Replacing the enrolled participant's template would change what Verify compares with.
    return pb.EnrollRequest(
        participant_id=pid, images=f("images", "frames"), replace=pid != PID and d(st.booleans())
    )


def _attempts(d: st.DrawFn) -> Message:
    f = Draw(d, ["participant_id", "training_id", "training_type"])
    return pb.GetAttemptsRequest(
        participant_id=f("participant_id"),
        training_id=f("training_id"),
        training_type=f("training_type"),
    )


def _launch(d: st.DrawFn) -> Message:
    names = ["participant_id", "training_id", "training_type", "gate", "session_id"]
    f = Draw(d, [*names, "scheduled_start", "return_url"])
    return pb.CreateLaunchTicketRequest(
        **{name: f(name) for name in names},
        scheduled_start=f("scheduled_start"),
        return_url=f("return_url"),
    )


def _participant_only(message: type[Message]) -> Callable[[st.DrawFn], Message]:
    def build(d: st.DrawFn) -> Message:
        f = Draw(d, ["participant_id"])
        pid = f("participant_id")
        # Deleting the enrolled participant would stop the Verify fuzz reaching the decoder.
        if message is pb.DeleteEnrollmentRequest and pid == PID:
            pid = PID + "-other"
        return message(participant_id=pid)

    return build


REQUESTS: dict[str, Callable[[st.DrawFn], Message]] = {
    "Enroll": _enroll,
    "GetEnrollment": _participant_only(pb.GetEnrollmentRequest),
    "DeleteEnrollment": _participant_only(pb.DeleteEnrollmentRequest),
    "StartLivenessChallenge": _challenge,
    "Verify": _verify,
    "GetAttempts": _attempts,
    "RedeemToken": _redeem,
    "GetSigningKeys": lambda d: pb.GetSigningKeysRequest(),
    "CreateLaunchTicket": _launch,
}


def _id_broken(value: str, *, required: bool = True) -> bool:
    """True when ``value`` breaks the contract's identifier rule (proto comments)."""
    return (required or value != "") and VALID_ID.fullmatch(value) is None


def _blobs_broken(blobs: list[bytes]) -> bool:
    """No image, too many, an empty one or one over the byte limit (the server fixture's)."""
    return not 1 <= len(blobs) <= MAX_IMAGES or any(
        not 0 < len(b) <= MAX_IMAGE_BYTES for b in blobs
    )


def _enum_broken(value: int, enum: Any) -> bool:
    return value == 0 or value not in enum.values()


def contract_broken(request: Message) -> bool:
    """An independent reading of the field rules: True when INVALID_ARGUMENT is owed."""
    if isinstance(request, pb.EnrollRequest):
        return _id_broken(request.participant_id) or _blobs_broken(list(request.images))
    if isinstance(request, pb.GetEnrollmentRequest | pb.DeleteEnrollmentRequest):
        return _id_broken(request.participant_id)
    if isinstance(request, pb.GetAttemptsRequest):
        return (
            _id_broken(request.participant_id)
            or _id_broken(request.training_id)
            or _enum_broken(request.training_type, pb.TrainingType)
        )
    if isinstance(request, pb.StartLivenessChallengeRequest | pb.VerifyRequest):
        broken = (
            _id_broken(request.participant_id)
            or _id_broken(request.training_id)
            or _enum_broken(request.training_type, pb.TrainingType)
            or _enum_broken(request.gate, pb.Gate)
        )
        if isinstance(request, pb.VerifyRequest):
            broken = broken or _blobs_broken(list(request.frames))
        return broken
    if isinstance(request, pb.CreateLaunchTicketRequest):
        return (
            _id_broken(request.participant_id)
            or _id_broken(request.training_id)
            or _enum_broken(request.training_type, pb.TrainingType)
            or _enum_broken(request.gate, pb.Gate)
            or not request.return_url
        )
    if isinstance(request, pb.RedeemTokenRequest):
        return (
            not request.token
            or len(request.token) > 8192
            or _enum_broken(request.expected_gate, pb.Gate)
            or _id_broken(request.audience)
        )
    return False


@pytest.fixture(scope="module")
def server(
    start_module_server: ServerStarter, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> RunningServer:
    """The real engine (liveness off: the fuzz is about input handling), one participant
    enrolled so Verify reaches decoding and the caps."""
    running = start(
        start_module_server,
        redis_url,
        tmp_path_factory.mktemp("fuzz"),
        liveness__offline="off",
        server__max_frames=MAX_IMAGES,
        server__max_images=MAX_IMAGES,
        server__max_image_bytes=MAX_IMAGE_BYTES,
        portal__return_urls=f"dev={RETURN}",
    )
    assert enroll(running).enrolled
    return running


def _fuzz(server: RunningServer, rpc: str, request: Message) -> None:
    try:
        reply = getattr(server.stub, rpc)(request, timeout=60)
        # Shown by --hypothesis-show-statistics: how far the fuzz got into the service.
        decision = getattr(reply, "decision", None)
        event("OK" if decision is None else f"OK {pb.Decision.Name(decision)}")
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        event(f"{code.name} {details.split(':')[0]}")
        assert code in CLEAN_CODES, f"{rpc} -> {code}: {details}"
        assert details and "Traceback" not in details
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return
    assert not contract_broken(request), f"{rpc} accepted a request that breaks the contract"


@pytest.mark.parametrize("rpc", sorted(REQUESTS))
@SERVER_BUDGET
@given(data=st.data())
def test_every_field_of_every_rpc(server: RunningServer, rpc: str, data: st.DataObject) -> None:
    _fuzz(server, rpc, REQUESTS[rpc](data.draw))


def test_fuzz_left_the_enrollment_and_counters_consistent(server: RunningServer) -> None:
    """After the fuzz, the service still verifies the enrolled participant normally."""
    reply = server.stub.Verify(
        pb.VerifyRequest(
            participant_id=PID,
            training_id="after-fuzz",
            training_type=pb.TRAINING_TYPE_SPL,
            gate=pb.GATE_SESSION,
            session_id="s1",
            frames=[jpeg(astronaut()[20:420, 40:440], quality=80)],
        ),
        timeout=60,
    )
    assert reply.decision == pb.DECISION_VERIFIED, reply.reason
    assert reply.attempts_used == 1


def test_seed_files_decode() -> None:
    """The mutations start from files that do decode (else the fuzz would test nothing)."""
    for name, data in SEEDS.items():
        assert decode_image(data, LIMITS).shape == (64, 64, 3), name
