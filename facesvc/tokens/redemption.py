"""One-time redemption: check a token, then spend its jti in Redis so it never admits twice.

Key (under the participant's Cluster hash tag, see ``facesvc.store.keys``)::

    <prefix>:{p:<participant_id>}:jti:<jti>    STRING "1", EX = seconds until exp + leeway

``SET NX`` is atomic, so of two racing redemptions exactly one sets the key and wins. The key
lives only as long as the token could still pass the time check; after that the check itself
refuses the token, so the store need not remember it.
"""

from __future__ import annotations

import math

from facesvc.clock import Clock, SystemClock
from facesvc.errors import InvalidRequest
from facesvc.store.connection import AsyncRedis
from facesvc.store.errors import store_errors
from facesvc.store.keys import KeySpace
from facesvc.tokens.check import CheckPolicy, check_token
from facesvc.tokens.claims import CheckReason, CheckResult, Expectation, VerificationClaims
from facesvc.tokens.keys import PublicKeySource


class TokenRedeemer:
    """Redeems tokens for the RedeemToken RPC: offline check plus the one-time-use mark."""

    def __init__(
        self,
        redis: AsyncRedis,
        keys: PublicKeySource,
        policy: CheckPolicy,
        *,
        key_prefix: str = "facesvc",
        clock: Clock | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._policy = policy
        self._space = KeySpace(key_prefix)
        self._clock = clock or SystemClock()

    def used_key(self, participant_id: str, jti: str) -> str:
        """The Redis key that marks ``jti`` of ``participant_id`` as used."""
        return self._space.token_use(participant_id, jti)

    async def unspend(self, claims: VerificationClaims) -> None:
        """Take back the used mark that :meth:`redeem` just set for ``claims`` (the caller
        could not complete the redemption, e.g. its audit entry). Raises StoreUnavailable."""
        async with store_errors("take back the token's used mark"):
            await self._redis.delete(self.used_key(claims.sub, claims.jti))

    async def redeem(self, token: str, expected: Expectation) -> CheckResult:
        """Check ``token`` against ``expected`` and, when it passes, spend it.

        A token that fails the check is not spent (a gate that asked with the wrong session
        does not burn the participant's token). Returns ALREADY_USED, with the claims, when
        the jti was spent before. Raises ``StoreUnavailable`` when Redis cannot answer: the
        caller must refuse entry (fail closed), never admit unmarked.
        """
        now = self._clock.now()
        result = check_token(token, self._keys.public_keys(now), expected, self._policy, now)
        if not result.ok or result.claims is None:
            return result
        claims = result.claims
        try:
            key = self.used_key(claims.sub, claims.jti)
        except InvalidRequest:
            # Our issuer validates participant ids, so only a token from elsewhere gets here.
            return CheckResult(CheckReason.MALFORMED)
        ttl_s = max(1, math.ceil(claims.exp + self._policy.leeway_s - now.timestamp()))
        async with store_errors("mark the token used"):
            first = await self._redis.set(key, "1", nx=True, ex=ttl_s)
        return result if first else CheckResult(CheckReason.ALREADY_USED, claims, result.kid)
