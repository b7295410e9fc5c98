"""The one token check, shared by the service's redemption and the SDK's offline verifier.

Keeping it in one function means a rule added here (a new binding, a stricter time rule) holds
for every gate at once; neither side carries a copy that could drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from facesvc.clock import require_aware
from facesvc.tokens.claims import CheckReason, CheckResult, Expectation, VerificationClaims
from facesvc.tokens.jws import PublicKeySet, TokenRejected, verify_compact

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
        verified = verify_compact(token, keys)
        claims = VerificationClaims.from_json(verified.payload)
    except TokenRejected as exc:
        return CheckResult(exc.reason)
    except ValueError:
        return CheckResult(CheckReason.MALFORMED)
    at = require_aware(now, "now").timestamp()
    return CheckResult(_judge(claims, expected, policy, at), claims, verified.kid)


def _judge(
    claims: VerificationClaims, expected: Expectation, policy: CheckPolicy, now: float
) -> CheckReason:
    """The time and binding rules; ``now`` in Unix seconds like the NumericDate claims."""
    if claims.iss != policy.issuer:
        return CheckReason.WRONG_ISSUER
    # exp is exclusive (RFC 7519 4.1.4): a token is dead from exp on, plus the leeway.
    if now >= claims.exp + policy.leeway_s:
        return CheckReason.EXPIRED
    if now + policy.leeway_s < claims.nbf:
        return CheckReason.NOT_YET_VALID
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
