"""Issuing verification tokens: the engine calls this once per VERIFIED decision."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from facesvc.clock import Clock, SystemClock
from facesvc.domain import Gate, LivenessMethod, TrainingType
from facesvc.store.keys import validate_id
from facesvc.tokens.claims import VerificationClaims
from facesvc.tokens.jws import b64url_encode, sign_compact
from facesvc.tokens.keys import SigningKey, SigningKeySource
from facesvc.tokens.signed import epoch, from_epoch

DEFAULT_TTL_S = 120
"""Token life in seconds: long enough for a browser redirect back to the LMS, short enough to
make a stolen token nearly worthless."""


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A signed token with the two facts the caller reports, its id and its expiry (UTC), and
    the claims it signs."""

    token: str
    jti: str
    expires_at: datetime
    claims: VerificationClaims


class TokenIssuer:
    """Signs verification tokens with the directory's current key.

    ``issuer`` is the ``iss`` claim (the service's public URL or name); ``ttl_s`` whole seconds.
    """

    def __init__(
        self,
        keys: SigningKeySource,
        *,
        issuer: str,
        ttl_s: int = DEFAULT_TTL_S,
        clock: Clock | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if not issuer:
            raise ValueError("issuer must not be empty")
        self._keys = keys
        self._issuer = issuer
        self._ttl_s = ttl_s
        self._clock = clock or SystemClock()

    def issue(
        self,
        *,
        participant_id: str,
        audience: str,
        training_id: str,
        training_type: TrainingType,
        gate: Gate,
        session_id: str,
        liveness: LivenessMethod,
        model_pack: str,
        verification_id: str,
    ) -> IssuedToken:
        """Sign a token for one verified scan.

        ``audience`` is the calling LMS/tenant that will redeem it; ``session_id`` is empty
        for a gate without a session; ``verification_id`` is the Verify's audit id. Raises
        ``ValueError`` for an empty audience or an id that cannot be a Redis key part (the jti
        is stored under the participant), and ``NoSigningKeyError`` when the key directory
        has no active key.
        """
        validate_id(participant_id, "participant_id")
        validate_id(training_id, "training_id")
        if not audience:
            raise ValueError("audience must not be empty: a token binds to its caller")
        now = self._clock.now()
        key = self._keys.signing_key(now)
        issued_at = epoch(now)
        claims = VerificationClaims(
            iss=self._issuer,
            sub=participant_id,
            aud=audience,
            iat=issued_at,
            nbf=issued_at,
            exp=issued_at + self._ttl_s,
            jti=b64url_encode(secrets.token_bytes(16)),
            training_id=training_id,
            training_type=training_type,
            gate=gate,
            session_id=session_id,
            liveness=liveness,
            model_pack=model_pack,
            verification_id=verification_id,
        )
        return self._sign(claims, key)

    def reissue(self, claims: VerificationClaims) -> IssuedToken:
        """The token for ``claims`` issued earlier, signed again with the current key, so that
        a stored answer keeps the claims (not a credential) and a replay still hands back the
        token: Ed25519 signatures are deterministic, so under the same key it is the very same
        token, and after a rotation an equally valid one with the same ``jti`` and expiry."""
        return self._sign(claims, self._keys.signing_key(self._clock.now()))

    @staticmethod
    def _sign(claims: VerificationClaims, key: SigningKey) -> IssuedToken:
        token = sign_compact(claims.to_json(), key.private_key, key.kid)
        return IssuedToken(token, claims.jti, from_epoch(claims.exp), claims)
