"""Verification tokens: Ed25519-signed JWTs, their keys and JWKS, checking and redemption.

The engine issues (``TokenIssuer``) on VERIFIED; the transport redeems (``TokenRedeemer``) and
publishes keys (``KeyDirectory.public_keys(...).to_jwks()``); the SDK checks offline with the
same ``check_token``. Operators manage keys with ``keys_generate``/``keys_rotate``/``keys_list``.
"""

from facesvc.tokens.check import DEFAULT_LEEWAY_S, CheckPolicy, check_token
from facesvc.tokens.claims import CheckReason, CheckResult, Expectation, VerificationClaims
from facesvc.tokens.issuer import DEFAULT_TTL_S, IssuedToken, TokenIssuer
from facesvc.tokens.jws import ALGORITHM, TOKEN_TYPE, PublicKeySet
from facesvc.tokens.keys import (
    KeyDirectory,
    KeyDirectoryError,
    KeyRecord,
    KeyRing,
    KeyState,
    KeyStatus,
    NoSigningKeyError,
    PublicKeySource,
    PublishedKey,
    SigningKey,
    SigningKeySource,
    keys_generate,
    keys_list,
    keys_rotate,
    load_key_ring,
)
from facesvc.tokens.redemption import TokenRedeemer

__all__ = [
    "ALGORITHM",
    "DEFAULT_LEEWAY_S",
    "DEFAULT_TTL_S",
    "TOKEN_TYPE",
    "CheckPolicy",
    "CheckReason",
    "CheckResult",
    "Expectation",
    "IssuedToken",
    "KeyDirectory",
    "KeyDirectoryError",
    "KeyRecord",
    "KeyRing",
    "KeyState",
    "KeyStatus",
    "NoSigningKeyError",
    "PublicKeySet",
    "PublicKeySource",
    "PublishedKey",
    "SigningKey",
    "SigningKeySource",
    "TokenIssuer",
    "TokenRedeemer",
    "VerificationClaims",
    "check_token",
    "keys_generate",
    "keys_list",
    "keys_rotate",
    "load_key_ring",
]
