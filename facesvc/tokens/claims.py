"""Value types of a verification token: its claims, what a gate expects, and check outcomes.

A token is bound to one participant, one training, one gate and one session of one calling
LMS (the audience). Nothing in it is biometric: no score, no template, no image.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from facesvc.domain import Gate, LivenessMethod, TrainingType
from facesvc.tokens.signed import Problem


class CheckReason(enum.Enum):
    """Why a verification token was accepted or refused; the one vocabulary of the service and
    the SDK. It names every :class:`~facesvc.tokens.signed.Problem` the same way and adds a
    token's own: OK, the bindings to the redeeming gate, and the one-time use."""

    OK = "OK"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    """The signature does not verify, or the header names an algorithm other than EdDSA."""
    WRONG_ISSUER = "WRONG_ISSUER"
    """Signed by a known key but for another issuer (e.g. a staging service sharing keys)."""
    WRONG_AUDIENCE = "WRONG_AUDIENCE"
    WRONG_PARTICIPANT = "WRONG_PARTICIPANT"
    WRONG_TRAINING = "WRONG_TRAINING"
    WRONG_GATE = "WRONG_GATE"
    WRONG_SESSION = "WRONG_SESSION"
    ALREADY_USED = "ALREADY_USED"
    MALFORMED = "MALFORMED"
    """Not a compact JWS of our shape: bad encoding, JSON, ``typ``, extra header fields, claims."""
    UNKNOWN_KEY = "UNKNOWN_KEY"
    """The ``kid`` is not in the key set (never published, or retired)."""


@dataclass(frozen=True, slots=True)
class VerificationClaims:
    """The claims of one verification token (RFC 7519 registered claims plus ours).

    Times are NumericDate: whole Unix seconds. On the wire ``gate``, ``training_type`` and
    ``liveness`` are the enum values (``"SESSION"``, ``"WEBINAR"``, ``"challenge"``).
    ``session_id`` is empty for a gate that has no session (REDEEM).
    """

    iss: str
    sub: str
    """The participant id."""
    aud: str
    """The calling LMS (tenant) the token is meant for."""
    iat: int
    nbf: int
    exp: int
    jti: str
    """Random 128-bit id, base64url; the one-time-use key."""
    training_id: str
    training_type: TrainingType
    gate: Gate
    session_id: str
    liveness: LivenessMethod
    """The liveness method the scan passed."""
    model_pack: str
    verification_id: str
    """The audit id of the Verify that produced the token (links a redemption to its scan)."""

    def to_json(self) -> dict[str, Any]:
        """The JWT claims set."""
        values = {name: getattr(self, name) for name in _CLAIM_TYPES}
        for name in _ENUM_CLAIMS:
            values[name] = values[name].value
        return values

    @classmethod
    def from_json(cls, claims: Mapping[str, Any]) -> VerificationClaims:
        """Parse a claims set strictly: every claim present with its exact JSON type.

        Unknown claims are ignored (they are signed; a newer issuer may add some).
        Raises ``ValueError`` on a missing or mistyped claim or an unknown enum value.
        """
        values: dict[str, Any] = {}
        for name, kind in _CLAIM_TYPES.items():
            value = claims.get(name)
            # bool is a subclass of int: a "true" exp must not pass as 1.
            if type(value) is not kind:
                raise ValueError(f"claim {name!r} missing or not a JSON {kind.__name__}")
            values[name] = value
        for name, vocabulary in _ENUM_CLAIMS.items():
            values[name] = vocabulary(values[name])
        return cls(**values)


_CLAIM_TYPES: dict[str, type] = {
    "iss": str,
    "sub": str,
    "aud": str,
    "iat": int,
    "nbf": int,
    "exp": int,
    "jti": str,
    "training_id": str,
    "training_type": str,
    "gate": str,
    "session_id": str,
    "liveness": str,
    "model_pack": str,
    "verification_id": str,
}
_ENUM_CLAIMS: dict[str, type[TrainingType] | type[Gate] | type[LivenessMethod]] = {
    "training_type": TrainingType,
    "gate": Gate,
    "liveness": LivenessMethod,
}


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the redeeming gate knows and the token must match.

    ``audience``, ``gate`` and ``session_id`` are always compared (an empty ``session_id``
    matches only a token without a session): a gate cannot forget to bind them.
    ``training_id`` and ``participant_id`` are compared when given (RedeemToken leaves the
    training optional). A gate that logs participants in on its own should pass
    ``participant_id``, so that one participant's token cannot admit another.
    """

    audience: str
    gate: Gate
    session_id: str
    training_id: str | None = None
    participant_id: str | None = None


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of a check.

    ``claims`` (and ``kid``, the key that signed) are set whenever the signature verified, also
    when a time or binding rule then failed (so audit can name the participant of a refused
    token); act on them only when ``ok``.
    """

    reason: CheckReason
    claims: VerificationClaims | None = None
    kid: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is CheckReason.OK


def reason_of(problem: Problem) -> CheckReason:
    """The token's word for a problem of a signed document: the same name."""
    return CheckReason[problem.name]
