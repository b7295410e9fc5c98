"""Tenant isolation through the real server, engine and Redis: a participant belongs to the
LMS tenants their enrollment lists, a kiosk's key admits a scan only with a venue pass for
its venue, an idempotency key is its caller's own and bound to its request, and a spoof
strike needs the participant's likeness.

The probes are those of the hardening issue: LMS B read A's participant's attempts, spent
them with impostor scans, locked them out with spoof scans, and replayed A's idempotency key
to get A's token; a kiosk key scanned anyone anywhere.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
from PIL import Image

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.accuracy.flat_attacks import Hold, hand_shake, render
from facesvc.domain import Decision, Gate, TrainingType
from facesvc.engine import VerifyCommand, VerifyOutcome
from facesvc.limits.abuse import ParticipantLocked
from facesvc.models.pack import ModelPack
from facesvc.models.types import Box
from facesvc.tokens.keys import load_key_ring
from facesvc.tokens.passes import new_pass, sign_pass
from facesvc.transport.auth import Client, Role, new_api_key, write_keys_file
from tests.conftest import RunningServer, ServerStarter
from tests.engine_support import (
    ADMIN,
    LMS,
    TENANTS,
    astronaut,
    insightface_image,
    jpeg,
    running_engine,
)
from tests.test_audit import as_caller
from tests.test_service_verify import PID, TENANT, genuine, impostor, start

pytestmark = pytest.mark.calendar

VENUE = "venue-jkt-01"
ASTRONAUT_FACE = Box(170.0, 40.0, 270.0, 160.0)
"""The face in scikit-image's astronaut photo, in its pixels."""
ROLES = {
    "ops": (Role.ADMIN, "programme"),
    "lms-a": (Role.LMS, TENANT),
    "lms-b": (Role.LMS, "lms-b"),
    "kiosk": (Role.KIOSK, VENUE),
}


class Tenants:
    """The server and a stub per caller (``ops`` the admin, ``lms-a`` the participant's LMS,
    ``lms-b`` another LMS, ``kiosk`` the venue's kiosk)."""

    def __init__(self, server: RunningServer, keys: dict[str, str], tmp_path: Path) -> None:
        self.server = server
        self._keys = keys
        self._key_dir = tmp_path / "token-keys"

    def stub(self, who: str) -> Any:
        return as_caller(self.server, self._keys[who]).stub

    def venue_pass(self, **changes: Any) -> str:
        """A pass for ``PID`` at this venue, signed with the service's key."""
        fields: dict[str, Any] = {
            "participant_id": PID,
            "training_id": "course-9",
            "session_id": "meeting-1",
            "scheduled_start": datetime.now(UTC) - timedelta(minutes=10),
            "venue": VENUE,
            "gate": Gate.SESSION,
        }
        fields.update(changes)
        signing = load_key_ring(self._key_dir).signing_key(datetime.now(UTC))
        return sign_pass(new_pass(**fields), signing)

    def used(self, training_id: str = "course-1") -> int:
        request = pb.GetAttemptsRequest(
            participant_id=PID, training_id=training_id, training_type=pb.TRAINING_TYPE_SPL
        )
        return int(self.stub("ops").GetAttempts(request, timeout=10).used)


@pytest.fixture
def tenants(start_server: ServerStarter, redis_url: str, tmp_path: Path) -> Tenants:
    keys, clients = {}, []
    for name, (role, tenant) in ROLES.items():
        key, key_id, digest = new_api_key()
        types = frozenset({TrainingType.OFFLINE}) if role is Role.KIOSK else None
        clients.append(Client(name, role, tenant, key_id, digest, training_types=types))
        keys[name] = key
    write_keys_file(tmp_path / "api-keys.json", clients)
    server = start(
        start_server,
        redis_url,
        tmp_path,
        security__api_keys_file=tmp_path / "api-keys.json",
        liveness__kiosk="off",
    )
    enrolled = as_caller(server, keys["ops"]).stub.Enroll(
        pb.EnrollRequest(participant_id=PID, images=[jpeg(astronaut())], tenants=[TENANT]),
        timeout=120,
    )
    assert enrolled.enrolled and list(enrolled.enrollment.tenants) == [TENANT]
    return Tenants(server, keys, tmp_path)


def _scan(frame: bytes, **fields: Any) -> pb.VerifyRequest:
    values: dict[str, Any] = {
        "participant_id": PID,
        "training_id": "course-1",
        "training_type": pb.TRAINING_TYPE_SPL,
        "gate": pb.GATE_SESSION,
        "session_id": "s1",
        "frames": [frame],
    }
    values.update(fields)
    return pb.VerifyRequest(**values)


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _png_without_a_face() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((1, 1, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_another_lms_can_neither_read_spend_challenge_nor_launch_for_the_participant(
    tenants: Tenants,
) -> None:
    b = tenants.stub("lms-b")
    attempts = pb.GetAttemptsRequest(
        participant_id=PID, training_id="course-1", training_type=pb.TRAINING_TYPE_SPL
    )
    challenge = pb.StartLivenessChallengeRequest(
        participant_id=PID,
        training_id="course-1",
        training_type=pb.TRAINING_TYPE_SPL,
        gate=pb.GATE_SESSION,
    )
    launch = pb.CreateLaunchTicketRequest(
        participant_id=PID,
        training_id="course-1",
        training_type=pb.TRAINING_TYPE_SPL,
        gate=pb.GATE_SESSION,
        session_id="s1",
        return_url="https://lms-b.example/back/",
    )
    for call in (
        lambda: b.GetAttempts(attempts, timeout=10),
        lambda: b.Verify(_scan(impostor()), timeout=60),
        lambda: b.StartLivenessChallenge(challenge, timeout=10),
        lambda: b.CreateLaunchTicket(launch, timeout=10),
    ):
        error = _refused(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
        assert "lms-b" in (error.details() or "")
    assert tenants.used() == 0  # B spent nothing

    # The participant's own LMS may; then the programme grants B as well.
    a = tenants.stub("lms-a")
    assert a.GetAttempts(attempts, timeout=10).used == 0
    granted = tenants.stub("ops").SetEnrollmentTenants(
        pb.SetEnrollmentTenantsRequest(participant_id=PID, tenants=[TENANT, "lms-b"]), timeout=10
    )
    assert sorted(granted.enrollment.tenants) == [TENANT, "lms-b"]
    assert b.GetAttempts(attempts, timeout=10).limit == 5


@pytest.mark.slow
def test_a_kiosk_scans_only_with_a_pass_for_its_venue_and_this_scan(tenants: Tenants) -> None:
    kiosk = tenants.stub("kiosk")
    offline = {
        "training_id": "course-9",
        "training_type": pb.TRAINING_TYPE_OFFLINE,
        "session_id": "meeting-1",
    }
    refusals = {
        "no pass": _scan(genuine(), **offline),
        "another venue": _scan(
            genuine(), **offline, venue_pass=tenants.venue_pass(venue="venue-sby-02")
        ),
        "another participant": _scan(
            genuine(), **offline, venue_pass=tenants.venue_pass(participant_id="someone-else")
        ),
        "another meeting": _scan(
            genuine(), **offline, venue_pass=tenants.venue_pass(session_id="meeting-2")
        ),
    }
    for case, request in refusals.items():
        error = _refused(lambda request=request: kiosk.Verify(request, timeout=60))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (case, error.details())
    admitted = kiosk.Verify(
        _scan(genuine(), **offline, venue_pass=tenants.venue_pass()), timeout=120
    )
    assert admitted.decision == pb.DECISION_VERIFIED, admitted.reason


@pytest.mark.slow
def test_an_idempotency_key_is_its_callers_own_and_bound_to_its_request(
    tenants: Tenants, redis_url: str
) -> None:
    tenants.stub("ops").SetEnrollmentTenants(
        pb.SetEnrollmentTenantsRequest(participant_id=PID, tenants=[TENANT, "lms-b"]), timeout=10
    )
    a, b = tenants.stub("lms-a"), tenants.stub("lms-b")
    first = a.Verify(_scan(genuine(), idempotency_key="scan-42"), timeout=120)
    assert first.decision == pb.DECISION_VERIFIED and first.token
    # A's retry of the very same request gets the same answer and token back ...
    again = a.Verify(_scan(genuine(), idempotency_key="scan-42"), timeout=120)
    assert again.replayed and again.token == first.token
    # ... while the same key with another request is refused, never answered with A's token.
    changed = _refused(
        lambda: a.Verify(_scan(genuine(), idempotency_key="scan-42", session_id="s2"), timeout=60)
    )
    assert changed.code() == grpc.StatusCode.INVALID_ARGUMENT
    # B's use of A's key is B's own scan: a 1x1 picture without a face, decided as such.
    stolen = b.Verify(
        _scan(_png_without_a_face(), idempotency_key="scan-42", session_id="s2"), timeout=60
    )
    assert stolen.decision == pb.DECISION_NO_FACE and not stolen.replayed and not stolen.token
    assert tenants.used() == 1
    # Redis keeps no live token: the stored answer holds the claims, not the credential.
    with redis.Redis.from_url(redis_url) as client:
        prefix = tenants.server.app.settings.redis.key_prefix
        stored = b"".join(
            value
            for key in client.scan_iter(match=f"{prefix}*idem*")
            if client.type(key) == b"hash"
            for value in client.hgetall(key).values()
        )
    assert stored and first.token.encode() not in stored
    assert first.token.rsplit(".", 1)[1].encode() not in stored  # not even its signature


async def test_a_spoof_strike_needs_the_participants_likeness(
    tmp_path: Path, redis_url: str, redis_prefix: str, model_pack: ModelPack
) -> None:
    """A printed photo tilted 50 degrees about a diagonal answers TURN_RIGHT with no head's
    depth: SPOOF_SUSPECTED, a strike. Of someone who does not look like the participant it is
    NOT_MATCHED (an attempt, no strike), so nobody can lock a participant out with a picture
    of someone else; the participant's own likeness is what a strike needs."""
    async with running_engine(
        tmp_path,
        redis_url,
        redis_prefix,
        model_pack,
        liveness__spl="challenge",
        liveness__challenge_steps=("TURN_RIGHT",),
        liveness__challenge_length=1,
        abuse__spoof_lockout_threshold=2,
    ) as kit:
        await kit.engine.enroll(
            PID, [jpeg(astronaut())], replace=False, caller=ADMIN, tenants=TENANTS
        )

        async def flat_scan(photo: np.ndarray, face: Box) -> VerifyOutcome:
            tilted = Hold(tilt_deg=-50.0, axis_deg=135.0)
            frames = [
                jpeg(render(photo, face, hand_shake(hold, k)))
                for hold in (Hold(), tilted)
                for k in (0, 1)
            ]
            challenge = await kit.engine.start_challenge(
                PID, "course-1", TrainingType.SPL, Gate.SESSION, caller=LMS
            )
            return await kit.engine.verify(
                VerifyCommand(
                    participant_id=PID,
                    training_id="course-1",
                    training_type=TrainingType.SPL,
                    gate=Gate.SESSION,
                    session_id="s1",
                    frames=frames,
                    caller=LMS,
                    challenge_id=challenge.challenge_id,
                )
            )

        stranger = insightface_image("Tom_Hanks_54745.png")
        stranger_face = max(model_pack.detector.detect(stranger, 80), key=lambda d: d.box.area)
        for _ in range(3):
            outcome = await flat_scan(stranger, stranger_face.box)
            assert outcome.decision is Decision.NOT_MATCHED, outcome.reason
        for _ in range(2):  # not locked by the stranger: the participant's own photo strikes
            outcome = await flat_scan(astronaut(), ASTRONAUT_FACE)
            assert outcome.decision is Decision.SPOOF_SUSPECTED, outcome.reason
        with pytest.raises(ParticipantLocked):
            await kit.engine.start_challenge(
                PID, "course-1", TrainingType.SPL, Gate.SESSION, caller=LMS
            )
