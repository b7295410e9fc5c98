"""The venue pass: the signed admission a participant's QR code carries to an OFFLINE meeting.

A pass is a compact JWS (``facesvc.tokens.jws``: EdDSA, explicit ``typ``, ``kid``) signed by
the programme's key under its own type :data:`PASS_TYPE`, so a pass is never accepted as a
verification token or a launch ticket, nor the other way round.

Claims (JSON; times are Unix seconds)::

    sub              the participant
    training_id      the OFFLINE training
    session_id       the meeting this pass is for
    gate             "REDEEM" (first meeting) or "SESSION" (each later meeting)
    scheduled_start  the meeting's scheduled start
    venue            the venue (the kiosk's tenant) where the pass is valid
    iat, exp, jti    issued, expires, the pass's own id

Both ends check it: the kiosk before it scans (facesvc.kiosk), and the service, which
accepts a kiosk's Verify or challenge only with a pass for that kiosk's venue naming the same
participant, training, session and gate (the kiosk's key alone admits nobody).

- Everything the kiosk sends to Verify is inside the signature: an edited code fails the
  signature check, a code for another venue is refused.
- A copied code (a screenshot sent to a friend) still names its participant: the service
  compares the face with that participant's enrollment, and counts the attempts on them.
- Expired passes are refused (``exp``; a small leeway absorbs kiosk clock drift).
"""

from __future__ import annotations

import dataclasses
import enum
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from facesvc.clock import Clock, SystemClock, require_aware
from facesvc.domain import Gate
from facesvc.store.keys import validate_id
from facesvc.tokens.jws import PublicKeySet, sign_compact
from facesvc.tokens.keys import PublicKeySource, SigningKey
from facesvc.tokens.signed import (
    Problem,
    Refused,
    epoch,
    id_claim,
    open_signed,
    str_claim,
    time_claim,
)

PASS_TYPE = "facesvc-venue-pass+jwt"  # noqa: S105  (a media type, not a secret)
"""The ``typ`` of a venue pass's JWS header."""

LEEWAY = timedelta(seconds=60)
"""Tolerated drift between the issuer's clock and a kiosk's when judging ``exp``."""

PASS_GATES = frozenset({Gate.REDEEM, Gate.SESSION})
"""OFFLINE has no post-test gate (see facesvc.limits.windows)."""


class PassProblem(enum.Enum):
    """Why a pass was refused (the kiosk shows it to staff). The problems of any signed
    document (:class:`~facesvc.tokens.signed.Problem`) keep their names, except that a bad
    signature and an unknown key are both FORGED (see :func:`pass_problem`); the venue and
    the scan binding are a pass's own."""

    MALFORMED = "MALFORMED"
    """Not a venue pass, or damaged."""
    FORGED = "FORGED"
    """Edited, or not signed by the programme."""
    EXPIRED = "EXPIRED"
    WRONG_VENUE = "WRONG_VENUE"
    WRONG_SCAN = "WRONG_SCAN"
    """Valid for this venue, but for another participant, training, session or gate than
    the scan that presents it (the service's check)."""


_FROM_SIGNED = {
    Problem.MALFORMED: PassProblem.MALFORMED,
    Problem.BAD_SIGNATURE: PassProblem.FORGED,
    Problem.UNKNOWN_KEY: PassProblem.FORGED,
    Problem.WRONG_ISSUER: PassProblem.FORGED,
    Problem.EXPIRED: PassProblem.EXPIRED,
    # Passes carry no nbf; one that had one would not be a pass the programme issued.
    Problem.NOT_YET_VALID: PassProblem.MALFORMED,
}


def pass_problem(problem: Problem) -> PassProblem:
    """A pass's word for a problem of a signed document."""
    return _FROM_SIGNED[problem]


class PassRefused(Refused[PassProblem]):
    """A scanned pass cannot be used; ``problem`` says why, ``detail`` what was seen."""


@dataclass(frozen=True, slots=True)
class VenuePass:
    """One participant's admission to one meeting at one venue (times tz-aware, UTC)."""

    participant_id: str
    training_id: str
    session_id: str
    gate: Gate
    scheduled_start: datetime
    venue: str
    issued_at: datetime
    expires_at: datetime
    pass_id: str
    text: str = ""
    """The signed pass (the QR code's text) it was read from; empty for a pass not yet signed.
    A kiosk sends it with each scan, for the service to check again."""

    def claims(self) -> dict[str, Any]:
        """The JWS payload (see the module docstring)."""
        return {
            "sub": self.participant_id,
            "training_id": self.training_id,
            "session_id": self.session_id,
            "gate": self.gate.value,
            "scheduled_start": epoch(self.scheduled_start),
            "venue": self.venue,
            "iat": epoch(self.issued_at),
            "exp": epoch(self.expires_at),
            "jti": self.pass_id,
        }


def new_pass(
    *,
    participant_id: str,
    training_id: str,
    session_id: str,
    scheduled_start: datetime,
    venue: str,
    gate: Gate = Gate.REDEEM,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> VenuePass:
    """A pass with a fresh id, valid until ``expires_at`` (default: the end of the OFFLINE
    redeem window, 2 h after ``scheduled_start``). Raises ValueError for an id the service
    would refuse, a naive time, or a gate OFFLINE does not have."""
    for value, name in (
        (participant_id, "participant"),
        (training_id, "training"),
        (session_id, "session"),
        (venue, "venue"),
    ):
        validate_id(value, name)
    if gate not in PASS_GATES:
        raise ValueError(f"an OFFLINE pass is for REDEEM or SESSION, not {gate.value}")
    start = require_aware(scheduled_start, "scheduled_start").astimezone(UTC)
    issued = require_aware(now, "now") if now is not None else SystemClock().now()
    expires = (
        start + timedelta(hours=2) if expires_at is None else require_aware(expires_at, "expires")
    )
    if expires <= issued:
        raise ValueError("the pass would be expired when issued: give a later expiry")
    return VenuePass(
        participant_id=participant_id,
        training_id=training_id,
        session_id=session_id,
        gate=gate,
        scheduled_start=start,
        venue=venue,
        issued_at=issued.astimezone(UTC),
        expires_at=expires.astimezone(UTC),
        pass_id=secrets.token_urlsafe(12),
    )


def sign_pass(venue_pass: VenuePass, key: SigningKey) -> str:
    """The pass as a compact JWS signed by the programme's ``key``: the QR code's text."""
    return sign_compact(venue_pass.claims(), key.private_key, key.kid, typ=PASS_TYPE)


def open_pass(text: str, keys: PublicKeySet, *, venue: str, now: datetime) -> VenuePass:
    """Check a scanned pass (signature, type, claims, expiry, venue) and read it.

    Raises :class:`PassRefused`. A ``kid`` missing from ``keys`` is FORGED here; callers that
    can refresh their keys do so first (see :class:`PassChecker`).
    """
    try:
        opened = open_signed(text, keys, typ=PASS_TYPE, read=_from_claims)
        venue_pass = opened.check(now, leeway_s=LEEWAY.total_seconds())
    except Refused as exc:
        problem = pass_problem(exc.problem)
        # Where the pass's word stands for several (FORGED), the detail names the one seen.
        detail = exc.detail if problem.name == exc.problem.name else str(exc)
        raise PassRefused(problem, detail) from exc
    venue_pass = dataclasses.replace(venue_pass, text=text)
    if venue_pass.venue != venue:
        raise PassRefused(
            PassProblem.WRONG_VENUE, f"the pass is for venue {venue_pass.venue!r}, not {venue!r}"
        )
    return venue_pass


def _from_claims(claims: dict[str, Any]) -> VenuePass:
    gate = Gate(claims["gate"])
    if gate not in PASS_GATES:
        raise ValueError(f"gate {gate.value} is not an OFFLINE gate")
    jti = str_claim(claims, "jti")
    if not jti:
        raise ValueError("claim jti is empty")
    return VenuePass(
        participant_id=id_claim(claims, "sub"),
        training_id=id_claim(claims, "training_id"),
        session_id=id_claim(claims, "session_id"),
        gate=gate,
        scheduled_start=time_claim(claims, "scheduled_start"),
        venue=id_claim(claims, "venue"),
        issued_at=time_claim(claims, "iat"),
        expires_at=time_claim(claims, "exp"),
        pass_id=jti,
    )


class VenuePassCheck:
    """The service's check of the pass a kiosk presents with a scan: the pass must be genuine
    (the service's own published keys), unexpired, for the kiosk's venue, and name the scan's
    participant, training, gate and (for Verify) session."""

    def __init__(self, keys: PublicKeySource, clock: Clock) -> None:
        self._keys = keys
        self._clock = clock

    def admit(
        self,
        text: str,
        *,
        venue: str,
        participant_id: str,
        training_id: str,
        gate: Gate,
        session_id: str | None = None,
    ) -> VenuePass:
        """The pass, once it binds this scan to ``venue``; raises :class:`PassRefused`.
        ``session_id`` None: not compared (a challenge is issued per training and gate)."""
        now = self._clock.now()
        venue_pass = open_pass(text, self._keys.public_keys(now), venue=venue, now=now)
        scan = (participant_id, training_id, gate)
        if (venue_pass.participant_id, venue_pass.training_id, venue_pass.gate) != scan or (
            session_id is not None and venue_pass.session_id != session_id
        ):
            raise PassRefused(
                PassProblem.WRONG_SCAN,
                "the pass names another participant, training, session or gate than this scan",
            )
        return venue_pass
