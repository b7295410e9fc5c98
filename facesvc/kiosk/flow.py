"""One scan at the venue, as a state machine: pass -> frames -> Verify -> admitted or why not.

::

    WAITING_FOR_PASS --(QR read)--> pass checked --refused--> PASS_REFUSED
          |                            |
          |                       CAPTURING (CHALLENGE steps when liveness asks for them)
          |                            |
          |                       VERIFYING <--> RETRYING (same idempotency key)
          |                            |
          |           ADMITTED | NOT_ADMITTED | UNREACHABLE | SERVICE_REFUSED
          +--(no QR, file source)--> NO_PASS;  camera failure --> CAMERA_ERROR

The kiosk decides nothing the service does not: the redeem window, the daily caps and the
liveness policy are the service's, and their verdicts come back as decisions. The kiosk's
own checks are those of the pass (signature, expiry, venue), which the service never sees.

Retries: one idempotency key per scan, generated when the frames are taken and sent with
every try of that scan. A retry after a lost answer (timeout, dropped connection) gets the
first answer back (``replayed``) and spends nothing; a retry that meets the first try still
running (ABORTED) waits and asks again. Tries are spaced by exponential backoff with jitter.
The service keeps a key's answer ``limits.idempotency_ttl_s`` (600 s by default), far longer
than a scan's worst case here (``RetryPolicy.worst_case_s``, about 2 min by default), so a
retry can never land after the service forgot the key. When the tries run out the scan ends
UNREACHABLE: nothing was admitted, and staff can scan again when the network is back.
"""

from __future__ import annotations

import enum
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Protocol, TypeVar

import grpc

from facesvc.client import Challenge, FaceServiceError, VerifyResult
from facesvc.domain import Decision, Gate, TrainingType
from facesvc.kiosk.camera import Camera, CameraError, encode_frame
from facesvc.kiosk.qr import PassChecker, PassKeysUnavailable, read_qr
from facesvc.tokens.passes import PassProblem, PassRefused, VenuePass


class ScanState(enum.StrEnum):
    """Where a scan is; the last seven are where it ends ("PASS" is the QR pass, no secret)."""

    WAITING_FOR_PASS = "WAITING_FOR_PASS"  # noqa: S105
    CAPTURING = "CAPTURING"
    CHALLENGE = "CHALLENGE"
    VERIFYING = "VERIFYING"
    RETRYING = "RETRYING"
    ADMITTED = "ADMITTED"
    NOT_ADMITTED = "NOT_ADMITTED"
    PASS_REFUSED = "PASS_REFUSED"  # noqa: S105
    UNREACHABLE = "UNREACHABLE"
    SERVICE_REFUSED = "SERVICE_REFUSED"
    NO_PASS = "NO_PASS"  # noqa: S105
    CAMERA_ERROR = "CAMERA_ERROR"


FINAL_STATES = frozenset(
    {
        ScanState.ADMITTED,
        ScanState.NOT_ADMITTED,
        ScanState.PASS_REFUSED,
        ScanState.UNREACHABLE,
        ScanState.SERVICE_REFUSED,
        ScanState.NO_PASS,
        ScanState.CAMERA_ERROR,
    }
)

_T = TypeVar("_T")

# What is worth asking again with the same key: the service (or its Redis) not answering,
# our deadline passing, or the first try of this very scan still being decided.
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)


@dataclass(frozen=True, slots=True)
class ScanEvent:
    """What the screen (or the JSON line) shows now.

    ``detail`` is English text for staff (the service's reason, or why the kiosk stopped);
    ``tries`` counts Verify calls of this scan; ``retry_in_s`` is the wait before the next.
    """

    state: ScanState
    detail: str = ""
    venue_pass: VenuePass | None = None
    result: VerifyResult | None = None
    problem: PassProblem | None = None
    tries: int = 0
    retry_in_s: float = 0.0
    step: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object (headless output); absent facts are left out, and the
        verification token never appears (the kiosk admits; it hands tokens to nobody)."""
        data: dict[str, Any] = {"state": self.state.value}
        if self.detail:
            data["detail"] = self.detail
        if self.problem is not None:
            data["problem"] = self.problem.value
        if self.step is not None:
            data["step"] = self.step
        if self.tries:
            data["tries"] = self.tries
        if self.retry_in_s:
            data["retry_in_s"] = round(self.retry_in_s, 3)
        if self.venue_pass is not None:
            p = self.venue_pass
            data["pass"] = {
                "participant_id": p.participant_id,
                "training_id": p.training_id,
                "session_id": p.session_id,
                "gate": p.gate.value,
                "scheduled_start": _iso(p.scheduled_start),
                "pass_id": p.pass_id,
            }
        if self.result is not None:
            r = self.result
            data["decision"] = r.decision.value
            data["reason"] = r.reason
            data["attempts"] = {
                "used": r.attempts_used,
                "remaining": r.attempts_remaining,
                "limit": r.attempts_limit,
                "resets_at": _iso(r.attempts_reset_at),
            }
            data["verification_id"] = r.verification_id
            data["replayed"] = r.replayed
        return data


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


class ScanService(Protocol):
    """The calls a kiosk makes; :class:`facesvc.client.FaceVerificationClient` is one."""

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
    ) -> VerifyResult: ...

    def start_challenge(
        self,
        participant_id: str,
        training_id: str,
        training_type: TrainingType,
        gate: Gate,
        *,
        venue_pass: str = "",
        timeout_s: float | None = None,
    ) -> Challenge: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Deadlines and backoff of the kiosk's calls (seconds).

    Try ``n`` (from 1) that failed transiently is followed by a wait of
    ``min(max_delay_s, first_delay_s * 2 ** (n - 1))`` scaled by a random factor in
    [0.5, 1], so kiosks that lost the network together do not come back in lockstep.
    """

    call_timeout_s: float = 20.0
    """Deadline of one call; a first face scan on a busy service can take seconds."""
    max_tries: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.call_timeout_s <= 0 or self.max_tries < 1:
            raise ValueError("call_timeout_s must be positive and max_tries at least 1")
        if self.first_delay_s < 0 or self.max_delay_s < self.first_delay_s:
            raise ValueError("need 0 <= first_delay_s <= max_delay_s")

    def _longest_delay_s(self, failed_try: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2.0 ** (failed_try - 1))

    def delay_s(self, failed_try: int, rng: random.Random) -> float:
        """The wait after failed try ``failed_try`` (1-based)."""
        return self._longest_delay_s(failed_try) * rng.uniform(0.5, 1.0)

    @property
    def worst_case_s(self) -> float:
        """The longest one scan's calls can take, every try timing out after the most wait."""
        waits = sum(self._longest_delay_s(n) for n in range(1, self.max_tries))
        return self.max_tries * self.call_timeout_s + waits


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    """How many face frames a scan takes and how far apart (seconds; a live camera only
    needs the spacing, a file source has none to wait for)."""

    frames: int = 2
    interval_s: float = 0.3
    step_wait_s: float = 1.0
    """Time from a challenge step's instruction to its first frame: about what a person
    takes to read it and start moving."""
    step_frames: int = 3
    """Frames taken for each challenge step, ``step_interval_s`` apart: people turn at
    their own pace and few hold a pose, so frames across the step's window catch the turn
    whenever it comes (the service answers each step with the first frame that shows it)."""
    step_interval_s: float = 0.6
    live: bool = True
    """False for file sources: no waiting between frames."""


class ScanFlow:
    """Runs scans: :meth:`scan` performs one from pass to result, reporting every state to
    ``show``; it never raises for a network, pass or camera problem (those are states)."""

    def __init__(
        self,
        service: ScanService,
        checker: PassChecker,
        camera: Camera,
        show: Callable[[ScanEvent], None],
        *,
        retry: RetryPolicy | None = None,
        capture: CaptureSettings | None = None,
        challenge: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        new_key: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        """``challenge``: ask the service for a head-turn challenge before each capture (set
        it when the service's ``liveness.kiosk`` is ``challenge``; otherwise Verify answers
        SERVICE_REFUSED saying a challenge is needed)."""
        self._service = service
        self._checker = checker
        self._camera = camera
        self._show = show
        self._retry = retry or RetryPolicy()
        self._capture = capture or CaptureSettings()
        self._challenge = challenge
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._new_key = new_key
        self._last_text: str | None = None

    def scan(self, *, ignore_pass: str | None = None) -> ScanEvent:
        """One scan; returns its final event. ``ignore_pass``: a QR text to skip until a
        frame without it is seen (the code of the scan just finished, still held up)."""
        try:
            found = self._wait_for_pass(ignore_pass)
            if isinstance(found, ScanEvent):
                return self._end(found)
            text = found
            try:
                venue_pass = self._checker.check(text)
            except PassRefused as exc:
                return self._end(ScanEvent(ScanState.PASS_REFUSED, exc.detail, problem=exc.problem))
            except PassKeysUnavailable as exc:
                return self._end(ScanEvent(ScanState.UNREACHABLE, str(exc)))
            return self._end(self._scan_face(venue_pass))
        except CameraError as exc:
            return self._end(ScanEvent(ScanState.CAMERA_ERROR, str(exc)))

    @property
    def last_pass_text(self) -> str | None:
        """The QR text of the latest scan (for ``scan(ignore_pass=...)``)."""
        return self._last_text

    def _end(self, event: ScanEvent) -> ScanEvent:
        self._show(event)
        return event

    def _wait_for_pass(self, ignore: str | None) -> str | ScanEvent:
        self._show(ScanEvent(ScanState.WAITING_FOR_PASS))
        while (frame := self._camera.grab()) is not None:
            texts = read_qr(frame)
            if ignore is not None and ignore in texts:
                continue
            if ignore is not None and not texts:
                ignore = None  # the old code left the picture: it may be shown again now
            if texts:
                self._last_text = texts[0]
                return texts[0]
        return ScanEvent(ScanState.NO_PASS, "no QR code was found in the pictures")

    def _take_frame(self, wait_s: float) -> bytes:
        if self._capture.live and wait_s > 0:
            self._sleep(wait_s)
        frame = self._camera.grab()
        if frame is None:
            raise CameraError("the pictures ran out before the face frames were taken")
        return encode_frame(frame)

    def _scan_face(self, venue_pass: VenuePass) -> ScanEvent:
        challenge_id = ""
        frames: list[bytes] = []
        if self._challenge:
            answered = self._call(venue_pass, partial(self._start_challenge, venue_pass))
            if isinstance(answered, ScanEvent):
                return answered
            started = answered[0]
            challenge_id = started.challenge_id
            self._show(ScanEvent(ScanState.CAPTURING, venue_pass=venue_pass))
            frames.append(self._take_frame(self._capture.interval_s))
            for step in started.steps:
                self._show(ScanEvent(ScanState.CHALLENGE, venue_pass=venue_pass, step=step))
                frames.append(self._take_frame(self._capture.step_wait_s))
                for _ in range(self._capture.step_frames - 1):
                    frames.append(self._take_frame(self._capture.step_interval_s))
            while len(frames) < started.min_frames:
                frames.append(self._take_frame(self._capture.interval_s))
        else:
            self._show(ScanEvent(ScanState.CAPTURING, venue_pass=venue_pass))
            for i in range(self._capture.frames):
                frames.append(self._take_frame(self._capture.interval_s if i else 0.0))
        key = self._new_key()  # one scan, one key: every try below reuses it

        def verify(timeout_s: float) -> VerifyResult:
            return self._service.verify(
                venue_pass.participant_id,
                venue_pass.training_id,
                TrainingType.OFFLINE,
                venue_pass.gate,
                frames,
                session_id=venue_pass.session_id,
                scheduled_start=venue_pass.scheduled_start,
                challenge_id=challenge_id,
                idempotency_key=key,
                venue_pass=venue_pass.text,
                timeout_s=timeout_s,
            )

        verified = self._call(venue_pass, verify, verifying=True)
        if isinstance(verified, ScanEvent):
            return verified
        result, tries = verified
        admitted = result.decision is Decision.VERIFIED
        return ScanEvent(
            ScanState.ADMITTED if admitted else ScanState.NOT_ADMITTED,
            result.reason,
            venue_pass=venue_pass,
            result=result,
            tries=tries,
        )

    def _start_challenge(self, venue_pass: VenuePass, timeout_s: float) -> Challenge:
        return self._service.start_challenge(
            venue_pass.participant_id,
            venue_pass.training_id,
            TrainingType.OFFLINE,
            venue_pass.gate,
            venue_pass=venue_pass.text,
            timeout_s=timeout_s,
        )

    def _call(
        self, venue_pass: VenuePass, call: Callable[[float], _T], *, verifying: bool = False
    ) -> tuple[_T, int] | ScanEvent:
        """``call(timeout_s)`` with the retry policy: its answer and the tries it took, or a
        final event when it cannot succeed."""
        last = ""
        for attempt in range(1, self._retry.max_tries + 1):
            if verifying:
                self._show(ScanEvent(ScanState.VERIFYING, venue_pass=venue_pass, tries=attempt))
            try:
                return call(self._retry.call_timeout_s), attempt
            except FaceServiceError as exc:
                if exc.code not in _TRANSIENT:
                    return ScanEvent(
                        ScanState.SERVICE_REFUSED, exc.message, venue_pass=venue_pass, tries=attempt
                    )
                last = exc.message or exc.code.name
            if attempt < self._retry.max_tries:
                wait = self._retry.delay_s(attempt, self._rng)
                self._show(
                    ScanEvent(
                        ScanState.RETRYING,
                        last,
                        venue_pass=venue_pass,
                        tries=attempt,
                        retry_in_s=wait,
                    )
                )
                self._sleep(wait)
        return ScanEvent(
            ScanState.UNREACHABLE,
            f"no answer after {self._retry.max_tries} tries ({last}); nothing was admitted: "
            "scan again when the network is back",
            venue_pass=venue_pass,
            tries=self._retry.max_tries,
        )


__all__ = [
    "FINAL_STATES",
    "CaptureSettings",
    "RetryPolicy",
    "ScanEvent",
    "ScanFlow",
    "ScanService",
    "ScanState",
]
