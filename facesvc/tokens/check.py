"""The one token check, shared by the service's redemption and the SDK's offline verifier.

Keeping it in one function means a rule added here (a new binding, a stricter time rule) holds
for every gate at once; neither side carries a copy that could drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from facesvc.tokens.claims import (
    CheckReason,
    CheckResult,
    Expectation,
    VerificationClaims,
    reason_of,
)
from facesvc.tokens.jws import TOKEN_TYPE, PublicKeySet
from facesvc.tokens.signed import Refused, open_signed

DEFAULT_LEEWAY_S = 10.0
"""Clock skew tolerated between the issuing service and a verifying gate, in seconds."""


@dataclass(frozen=True, slots=True)
class CheckPolicy:
    """Who the tokens must come from and how much clock skew is tolerated (seconds)."""

    issuer: str
    leeway_s: float = DEFAULT_LEEWAY_S


def check_token(
    token: str,
    keys: PublicKeySet,
    expected: Expectation,
    policy: CheckPolicy,
    now: datetime,
) -> CheckResult:
    """Check ``token`` offline: header, signature, claims, time and every binding.

    ``now`` is timezone-aware. Does not consult the one-time-use store: an OK here means the
    token is genuine and meant for this gate, not that it was never used (see redemption).
    The checks run in a fixed order, so a token wrong in two ways always names the same reason.
    """
    try:
        opened = open_signed(token, keys, typ=TOKEN_TYPE, read=VerificationClaims.from_json)
    except Refused as exc:
        return CheckResult(reason_of(exc.problem))
    problem = opened.problem(now, leeway_s=policy.leeway_s, issuer=policy.issuer)
    reason = reason_of(problem) if problem is not None else _bindings(opened.claims, expected)
    return CheckResult(reason, opened.claims, opened.kid)


def _bindings(claims: VerificationClaims, expected: Expectation) -> CheckReason:
    """The rules that bind a token to the redeeming gate (the issuer and the times are
    :meth:`facesvc.tokens.signed.Opened.problem`'s, judged first)."""
    if claims.aud != expected.audience:
        return CheckReason.WRONG_AUDIENCE
    if expected.participant_id is not None and claims.sub != expected.participant_id:
        return CheckReason.WRONG_PARTICIPANT
    if expected.training_id is not None and claims.training_id != expected.training_id:
        return CheckReason.WRONG_TRAINING
    if claims.gate != expected.gate:
        return CheckReason.WRONG_GATE
    if claims.session_id != expected.session_id:
        return CheckReason.WRONG_SESSION
    return CheckReason.OK
