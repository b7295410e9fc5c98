"""The venue kiosk end to end: QR passes made here, real faces, the real server, engine and
Redis, the kiosk's own API key; plus the pass rules and the staff screen on their own."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facesvc.client import Challenge, FaceVerificationClient, VerifyResult
from facesvc.commands import cli
from facesvc.config import LimitsSettings
from facesvc.domain import Decision, Gate, TrainingType
from facesvc.kiosk import __main__ as kiosk_main
from facesvc.kiosk.camera import StillFrames
from facesvc.kiosk.flow import CaptureSettings, RetryPolicy, ScanEvent, ScanFlow, ScanState
from facesvc.kiosk.qr import JwksFileKeys, PassChecker, PassKeys, ServiceKeys, qr_png, read_qr
from facesvc.kiosk.tui import describe, render
from facesvc.tokens.jws import PublicKeySet, b64url_decode, b64url_encode, sign_compact
from facesvc.tokens.keys import SigningKey, keys_generate, load_key_ring
from facesvc.tokens.launch import TICKET_TYPE
from facesvc.tokens.passes import (
    PASS_TYPE,
    PassProblem,
    PassRefused,
    new_pass,
    open_pass,
    sign_pass,
)
from facesvc.transport.auth import Client, Role, new_api_key, write_keys_file
from tests.clocks import wib_at
from tests.conftest import RunningServer, ServerStarter
from tests.engine_support import astronaut, insightface_image, jpeg
from tests.test_service_verify import start

pytestmark = pytest.mark.calendar

VENUE = "venue-jkt-01"
PID = "participant-k1"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff"}


def genuine_face() -> np.ndarray:
    return astronaut()[20:420, 40:440]


def impostor_face() -> np.ndarray:
    """Another real person: the man at the right edge of insightface's group photo t1.jpg
    (a near-frontal face; its neighbours are turned too far for the quality gates)."""
    return np.ascontiguousarray(insightface_image("t1.jpg")[160:505, 998:1280])


def qr_frame(text: str) -> np.ndarray:
    """What the camera sees: the pass's QR PNG, as RGB pixels."""
    return np.asarray(Image.open(io.BytesIO(qr_png(text))).convert("RGB"))


def edited(token: str, **changes: Any) -> str:
    """``token`` with its payload changed and its header and signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(b64url_decode(payload))
    claims.update(changes)
    body = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    return f"{header}.{body}.{signature}"


# --------------------------------------------------------------------------- the pass alone


@pytest.fixture
def signing(tmp_path: Path) -> SigningKey:
    keys_generate(tmp_path / "keys")
    return load_key_ring(tmp_path / "keys").signing_key(datetime.now(UTC))


class FixedKeys:
    """The programme's key set, handed over as it is (a provisioned kiosk)."""

    def __init__(self, key: SigningKey) -> None:
        self._keys = PublicKeySet({key.kid: key.private_key.public_key()})

    def keys(self, *, refresh: bool = False) -> PublicKeySet:
        return self._keys


def _checker(key: SigningKey) -> PassChecker:
    return PassChecker(FixedKeys(key), VENUE)


def _pass_text(key: SigningKey, **overrides: Any) -> str:
    fields: dict[str, Any] = {
        "participant_id": PID,
        "training_id": "t-1",
        "session_id": "m-1",
        "scheduled_start": datetime.now(UTC),
        "venue": VENUE,
    }
    fields.update(overrides)
    return sign_pass(new_pass(**fields), key)


def test_a_pass_survives_its_qr_code_and_says_what_it_was_issued_for(signing: SigningKey) -> None:
    start_at = wib_at(9)
    issued = new_pass(
        participant_id=PID,
        training_id="t-1",
        session_id="m-3",
        scheduled_start=start_at,
        venue=VENUE,
        gate=Gate.SESSION,
        now=start_at - timedelta(days=1),
    )
    [text] = read_qr(qr_frame(sign_pass(issued, signing)))
    later = start_at + timedelta(minutes=30)
    opened = open_pass(text, FixedKeys(signing).keys(), venue=VENUE, now=later)
    assert opened == dataclasses.replace(issued, text=text)
    assert opened.expires_at == start_at + timedelta(hours=2)


@pytest.mark.parametrize(
    ("mangle", "problem"),
    [
        (lambda t, k: edited(t, sub="someone-else"), PassProblem.FORGED),
        (lambda t, k: edited(t, exp=4102444800), PassProblem.FORGED),
        (lambda t, k: t[:-10] + ("B" if t[-10] == "A" else "A") + t[-9:], PassProblem.FORGED),
        (lambda t, k: _pass_text(k, venue="venue-sby-02"), PassProblem.WRONG_VENUE),
        (
            lambda t, k: _pass_text(
                k,
                now=datetime.now(UTC) - timedelta(days=2),
                expires_at=datetime.now(UTC) - timedelta(days=1),
            ),
            PassProblem.EXPIRED,
        ),
        # Another document signed by the same key (a launch ticket) is not a pass.
        (
            lambda t, k: sign_compact(json.loads(b64url_decode(t.split(".")[1])), k.private_key,
                                      k.kid, typ=TICKET_TYPE),
            PassProblem.MALFORMED,
        ),
        (lambda t, k: "https://example.org/not-a-pass", PassProblem.MALFORMED),
    ],
    ids=["participant-edited", "expiry-edited", "signature-edited", "other-venue", "expired",
         "launch-ticket", "not-a-pass"],
)  # fmt: skip
def test_edited_expired_foreign_and_other_codes_are_refused(
    signing: SigningKey, mangle: Any, problem: PassProblem
) -> None:
    text = mangle(_pass_text(signing), signing)
    with pytest.raises(PassRefused) as refused:
        _checker(signing).check(text)
    assert refused.value.problem is problem
    assert PASS_TYPE not in str(refused.value)  # a reason for staff, not an internal name


def test_service_keys_are_fetched_once_and_refreshed_for_a_new_kid_sparingly(
    signing: SigningKey,
) -> None:
    fetched: list[int] = []

    def fetch() -> Any:
        fetched.append(1)
        return FixedKeys(signing).keys()

    keys = ServiceKeys(fetch, min_refresh_s=3600)
    checker = PassChecker(keys, VENUE)
    good = _pass_text(signing)
    for _ in range(3):
        checker.check(good)
    forged = edited(good, sub="x")
    for _ in range(3):
        with pytest.raises(PassRefused):
            checker.check(forged)
    assert len(fetched) == 1  # junk codes cannot make the kiosk hammer the service


# --------------------------------------------------------------------------- end to end


@dataclass
class Venue:
    """The running service, its keys, and clients for the venue's kiosk and for an admin."""

    server: RunningServer
    kiosk_key: str
    signing: SigningKey
    kiosk: FaceVerificationClient
    admin: FaceVerificationClient
    jwks_file: Path
    key_dir: Path

    def pass_text(self, training_id: str, **overrides: Any) -> str:
        fields: dict[str, Any] = {
            "participant_id": PID,
            "training_id": training_id,
            "session_id": "meeting-1",
            # Mid-window: the REDEEM window runs from 1 h before to 2 h after the start.
            "scheduled_start": datetime.now(UTC) - timedelta(minutes=10),
            "venue": VENUE,
        }
        fields.update(overrides)
        return sign_pass(new_pass(**fields), self.signing)

    def used(self, training_id: str) -> int:
        return self.admin.attempts(PID, training_id, TrainingType.OFFLINE).used

    def close(self) -> None:
        self.kiosk.close()
        self.admin.close()


def open_venue(starter: ServerStarter, redis_url: str, tmp: Path, **overrides: Any) -> Venue:
    """Start the service with an admin and this venue's kiosk as its only clients, and enroll
    ``PID`` with the astronaut photo."""
    keys: dict[str, str] = {}
    clients = []
    for name, role, tenant, types in (
        ("ops", Role.ADMIN, "ops", None),
        ("kiosk-jkt-01", Role.KIOSK, VENUE, frozenset({TrainingType.OFFLINE})),
    ):
        key, key_id, digest = new_api_key()
        clients.append(Client(name, role, tenant, key_id, digest, training_types=types))
        keys[name] = key
    write_keys_file(tmp / "api-keys.json", clients)
    settings: dict[str, Any] = {"liveness__kiosk": "off", **overrides}
    server = start(
        starter, redis_url, tmp, security__api_keys_file=tmp / "api-keys.json", **settings
    )
    slow = 60.0  # a first inference on a shared machine may take a while
    admin = FaceVerificationClient(
        server.grpc_target, insecure=True, api_key=keys["ops"], timeout_s=slow
    )
    kiosk = FaceVerificationClient(
        server.grpc_target, insecure=True, api_key=keys["kiosk-jkt-01"], timeout_s=slow
    )
    enrolled = admin.enroll(PID, [jpeg(astronaut())], replace=True)
    assert enrolled.enrolled, enrolled.reason
    ring = load_key_ring(tmp / "token-keys")
    now = datetime.now(UTC)
    jwks_file = tmp / "programme-jwks.json"
    jwks_file.write_text(ring.public_keys(now).to_json())
    return Venue(
        server, keys["kiosk-jkt-01"], ring.signing_key(now), kiosk, admin, jwks_file,
        tmp / "token-keys",
    )  # fmt: skip


@pytest.fixture(scope="module")
def venue(
    start_module_server: ServerStarter, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Venue]:
    """One server for the module (loading the engine takes seconds); each test uses its own
    training id, so attempt counts never mix."""
    opened = open_venue(start_module_server, redis_url, tmp_path_factory.mktemp("kiosk-service"))
    yield opened
    opened.close()


@dataclass
class Scan:
    final: ScanEvent
    events: list[ScanEvent]
    sleeps: list[float]

    @property
    def states(self) -> list[ScanState]:
        return [e.state for e in self.events]

    @property
    def result(self) -> VerifyResult:
        assert self.final.result is not None, self.final
        return self.final.result


def scan(
    service: Any,
    pass_text: str,
    faces: Sequence[np.ndarray],
    *,
    keys: PassKeys,
    tries: int = 3,
    challenge: bool = False,
    wait: bool = False,
) -> Scan:
    """One kiosk scan of ``pass_text`` and ``faces``; backoff waits are recorded, and only
    waited out when ``wait`` (a reconnecting channel needs the time)."""
    events: list[ScanEvent] = []
    sleeps: list[float] = []

    def pause(seconds: float) -> None:
        sleeps.append(seconds)
        if wait:
            time.sleep(seconds)

    flow = ScanFlow(
        service,
        PassChecker(keys, VENUE),
        StillFrames([qr_frame(pass_text), *faces]),
        events.append,
        retry=RetryPolicy(call_timeout_s=60, max_tries=tries),
        capture=CaptureSettings(frames=len(faces), live=False),
        challenge=challenge,
        sleep=pause,
    )
    final = flow.scan()
    assert events[-1] is final and final.final
    return Scan(final, events, sleeps)


def service_keys(venue: Venue) -> PassKeys:
    """The programme's keys as the kiosk gets them by default: GetSigningKeys, as the venue."""
    return ServiceKeys(venue.kiosk.signing_keys)


@pytest.mark.slow
def test_a_genuine_face_with_a_valid_pass_is_admitted(venue: Venue) -> None:
    faces = [genuine_face(), genuine_face()[10:, 10:]]
    done = scan(venue.kiosk, venue.pass_text("t-admit"), faces, keys=service_keys(venue))
    assert done.final.state is ScanState.ADMITTED, done.final
    assert done.result.decision is Decision.VERIFIED and not done.result.replayed
    assert done.states == [
        ScanState.WAITING_FOR_PASS,
        ScanState.CAPTURING,
        ScanState.VERIFYING,
        ScanState.ADMITTED,
    ]
    assert venue.used("t-admit") == 1
    screen = render(done.final, color=False)
    assert "SILAKAN MASUK" in screen and "ADMITTED" in screen and PID in screen


@pytest.mark.slow
def test_edited_and_expired_codes_are_refused_before_any_attempt(venue: Venue) -> None:
    faces = [genuine_face()]
    keys = service_keys(venue)
    forged = edited(venue.pass_text("t-other"), training_id="t-edited")
    done = scan(venue.kiosk, forged, faces, keys=keys)
    assert done.final.state is ScanState.PASS_REFUSED
    assert done.final.problem is PassProblem.FORGED
    old = datetime.now(UTC) - timedelta(days=1)
    expired = venue.pass_text("t-edited", scheduled_start=old, now=old - timedelta(hours=1))
    done = scan(venue.kiosk, expired, faces, keys=keys)
    assert done.final.problem is PassProblem.EXPIRED
    assert ScanState.VERIFYING not in done.states
    assert venue.used("t-edited") == 0
    assert "KODE QR DITOLAK" in render(done.final, color=False)


@pytest.mark.slow
def test_another_persons_face_is_not_admitted_and_attempts_left_are_shown(venue: Venue) -> None:
    done = scan(
        venue.kiosk, venue.pass_text("t-impostor"), [impostor_face()], keys=service_keys(venue)
    )
    assert done.final.state is ScanState.NOT_ADMITTED
    result = done.result
    assert result.decision is Decision.NOT_MATCHED
    assert result.attempts_used == 1 and result.attempts_remaining == result.attempts_limit - 1 > 0
    assert result.attempts_reset_at is not None and result.attempts_reset_at > datetime.now(UTC)
    screen = render(done.final, color=False)
    assert "TIDAK DAPAT MASUK" in screen and "NOT ADMITTED" in screen
    left = f"{result.attempts_remaining} / {result.attempts_limit}"
    assert f"Attempts left today: {left}" in screen and "Resets: " in screen


@pytest.mark.slow
def test_the_service_says_outside_window_when_the_meeting_is_hours_away(venue: Venue) -> None:
    later = datetime.now(UTC) + timedelta(hours=3)
    text = venue.pass_text("t-window", scheduled_start=later)
    done = scan(venue.kiosk, text, [genuine_face()], keys=service_keys(venue))
    assert done.final.state is ScanState.NOT_ADMITTED
    assert done.result.decision is Decision.OUTSIDE_WINDOW
    assert venue.used("t-window") == 0
    assert "Di luar waktu pemindaian" in render(done.final, color=False)


def dead_target() -> str:
    """A local port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
def test_a_service_that_cannot_be_reached_is_a_state_not_a_crash(venue: Venue) -> None:
    text = venue.pass_text("t-down")
    with FaceVerificationClient(
        dead_target(), insecure=True, api_key=venue.kiosk_key, timeout_s=5
    ) as down:
        # Pass keys on file: the pass checks, then every Verify try fails.
        done = scan(down, text, [genuine_face()], keys=JwksFileKeys(venue.jwks_file), tries=3)
        assert done.final.state is ScanState.UNREACHABLE, done.final
        assert done.final.tries == 3 and len(done.sleeps) == 2
        assert done.states.count(ScanState.RETRYING) == 2
        # Pass keys from the service: already the pass cannot be checked.
        done = scan(down, text, [genuine_face()], keys=ServiceKeys(down.signing_keys))
        assert done.final.state is ScanState.UNREACHABLE
        assert ScanState.VERIFYING not in done.states
    assert "LAYANAN TIDAK TERJANGKAU" in render(done.final, color=False)
    assert venue.used("t-down") == 0


_HTTP2_FRAME_HEADER = 9
_HTTP2_HEADERS = 0x1


class AnswerDroppingProxy:
    """A TCP proxy in front of the service that cuts the connection the moment the service
    starts its first RPC answer (its first HTTP/2 HEADERS frame): the service has decided and
    recorded the scan, the kiosk never hears of it and sees the connection reset. Later
    connections pass through untouched."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self.dropped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                kiosk, _ = self._listener.accept()
            except OSError:
                return  # closed
            service = socket.create_connection(self._upstream)
            threading.Thread(target=self._requests, args=(kiosk, service), daemon=True).start()
            threading.Thread(target=self._answers, args=(service, kiosk), daemon=True).start()

    @staticmethod
    def _cut(*ends: socket.socket) -> None:
        for end in ends:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def _requests(self, kiosk: socket.socket, service: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := kiosk.recv(65536):
                service.sendall(data)
        self._cut(kiosk, service)

    def _answers(self, service: socket.socket, kiosk: socket.socket) -> None:
        pending = b""
        with contextlib.suppress(OSError):
            while data := service.recv(65536):
                pending += data
                ready = b""
                # Forward whole frames only, so the first answer is recognised before any of
                # it reaches the kiosk.
                while len(pending) >= _HTTP2_FRAME_HEADER:
                    size = _HTTP2_FRAME_HEADER + int.from_bytes(pending[:3], "big")
                    if len(pending) < size:
                        break
                    frame, pending = pending[:size], pending[size:]
                    if frame[3] == _HTTP2_HEADERS:
                        with self._lock:
                            drop, self.dropped = not self.dropped, True
                        if drop:
                            kiosk.sendall(ready)
                            break
                    ready += frame
                else:
                    kiosk.sendall(ready)
                    continue
                break
        self._cut(service, kiosk)


@pytest.mark.slow
def test_a_lost_answer_is_retried_without_spending_a_second_attempt(venue: Venue) -> None:
    proxy = AnswerDroppingProxy(venue.server.grpc_target)
    try:
        with FaceVerificationClient(
            proxy.target, insecure=True, api_key=venue.kiosk_key, timeout_s=60
        ) as lossy:
            text = venue.pass_text("t-retry")
            done = scan(
                lossy, text, [genuine_face()], keys=JwksFileKeys(venue.jwks_file), wait=True
            )
    finally:
        proxy.close()
    assert proxy.dropped
    assert done.final.state is ScanState.ADMITTED, done.final
    # The retry carried the first try's key: the service replayed its first answer.
    assert done.result.replayed and done.final.tries >= 2
    assert ScanState.RETRYING in done.states
    assert venue.used("t-retry") == 1 and done.result.attempts_used == 1


def image_files(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}


@pytest.mark.slow
def test_programme_cli_mints_a_pass_and_headless_kiosk_admits_writing_no_images(
    venue: Venue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    start_at = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    code = cli.main(
        ["passes", "issue", "--participant", PID, "--training", "t-cli", "--session", "m-1",
         "--start", start_at, "--venue", VENUE, "--out", str(inputs / "pass.png"),
         "--key-dir", str(venue.key_dir)]
    )  # fmt: skip
    assert code == 0
    issued = json.loads(capsys.readouterr().out)
    assert cli.main(["passes", "jwks", "--key-dir", str(venue.key_dir)]) == 0
    (inputs / "programme-jwks.json").write_text(capsys.readouterr().out)
    (inputs / "face.jpg").write_bytes(jpeg(genuine_face()))

    # Where a careless kiosk would leave pictures: its working folder, home and temp.
    run = tmp_path / "run"
    for folder in ("cwd", "home", "tmp"):
        (run / folder).mkdir(parents=True)
    monkeypatch.chdir(run / "cwd")
    monkeypatch.setenv("HOME", str(run / "home"))
    monkeypatch.setenv("TMPDIR", str(run / "tmp"))
    monkeypatch.setenv(kiosk_main.API_KEY_ENV, venue.kiosk_key)
    before = image_files(tmp_path)
    code = kiosk_main.main(
        ["--target", venue.server.grpc_target, "--venue", VENUE, "--insecure", "--headless",
         "--pass-keys", str(inputs / "programme-jwks.json"),
         "--timeout-s", "60", "--frames", "1",
         "--images", str(inputs / "pass.png"), str(inputs / "face.jpg")]
    )  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == kiosk_main.EXIT_ADMITTED, lines
    assert [line["state"] for line in lines][-1] == "ADMITTED"
    assert lines[-1]["pass"]["pass_id"] == issued["pass_id"]
    assert lines[-1]["attempts"]["used"] == 1 and "token" not in lines[-1]
    assert all("ts" in line for line in lines)
    assert image_files(tmp_path) == before
    assert not any(os.scandir(run / "tmp")) and not any(os.scandir(run / "home"))


class RecordsChallenges:
    """The kiosk's connection, noting each challenge issued and each one Verify was sent."""

    def __init__(self, client: FaceVerificationClient) -> None:
        self._client = client
        self.issued: list[Challenge] = []
        self.sent: list[str] = []
        self.frames: list[int] = []

    def verify(self, *args: Any, **kwargs: Any) -> VerifyResult:
        self.sent.append(kwargs["challenge_id"])
        self.frames.append(len(args[4]))
        return self._client.verify(*args, **kwargs)

    def start_challenge(self, *args: Any, **kwargs: Any) -> Challenge:
        challenge = self._client.start_challenge(*args, **kwargs)
        self.issued.append(challenge)
        return challenge


@pytest.mark.slow
def test_a_kiosk_walks_the_participant_through_the_challenge_the_service_requires(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    challenged = open_venue(start_server, redis_url, tmp_path, liveness__kiosk="challenge")
    try:
        text = challenged.pass_text("t-challenge")
        keys = service_keys(challenged)
        # A kiosk set up without --challenge is told what is missing; nothing is spent.
        done = scan(challenged.kiosk, text, [genuine_face()], keys=keys)
        assert done.final.state is ScanState.SERVICE_REFUSED
        assert "StartLivenessChallenge" in done.final.detail
        assert challenged.used("t-challenge") == 0

        recorder = RecordsChallenges(challenged.kiosk)
        faces = [genuine_face()] * 8  # still photos: they cannot turn their head
        done = scan(recorder, text, faces, keys=keys, challenge=True)
        [issued] = recorder.issued
        shown = [e for e in done.events if e.state is ScanState.CHALLENGE]
        assert [e.step for e in shown] == issued.steps
        # Each step is shown with how far to move, and three frames are taken across the
        # step's time (people turn at their own pace), after the frontal one.
        for event in shown:
            assert any("hold" in english for _, english in describe(event)), describe(event)
        assert recorder.frames and set(recorder.frames) == {
            1 + CaptureSettings().step_frames * len(issued.steps)
        }
        assert recorder.sent and set(recorder.sent) == {issued.challenge_id}
        # However the service judges still photos (a failed challenge, or no challenge checker
        # in this build), they are never let in.
        assert done.final.state is not ScanState.ADMITTED
    finally:
        challenged.close()


def test_a_scan_gives_up_long_before_the_service_forgets_its_idempotency_key() -> None:
    assert RetryPolicy().worst_case_s < LimitsSettings().idempotency_ttl_s


def test_every_state_decision_and_pass_problem_has_its_own_screen() -> None:
    venue_pass = new_pass(
        participant_id=PID,
        training_id="t-1",
        session_id="m-1",
        scheduled_start=datetime.now(UTC),
        venue=VENUE,
    )
    events = [ScanEvent(state) for state in ScanState]
    events += [ScanEvent(ScanState.PASS_REFUSED, problem=p) for p in PassProblem]
    for decision in Decision:
        result = VerifyResult(
            decision, "reason", 1, 9, 10, datetime.now(UTC), None, None, "v", [], None, False
        )
        events.append(ScanEvent(ScanState.NOT_ADMITTED, venue_pass=venue_pass, result=result))
    screens = [render(event, color=False) for event in events]
    assert len(set(screens)) == len(screens)  # no two situations look alike to staff
