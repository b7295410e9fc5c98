"""Compact JWS (RFC 7515) with exactly one algorithm, EdDSA over Ed25519 (RFC 8037), and JWKS.

Written on ``cryptography`` directly rather than a general JWT library so that nothing here can
be talked into another algorithm (RFC 8725 section 3.1): the header must say ``alg: EdDSA``, our
explicit ``typ``, a ``kid``, and nothing else (no ``crit``, no ``jku``/``jwk`` key injection).
Decoding is strict: base64url without padding in its canonical form, UTF-8 JSON objects without
duplicate names or non-finite numbers. Opening and judging a signed document (header,
signature, claims, times) is :mod:`facesvc.tokens.signed`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ALGORITHM = "EdDSA"
TOKEN_TYPE = "facesvc-verification+jwt"  # noqa: S105  (a media type, not a secret)
"""The explicit ``typ`` (RFC 8725 section 3.11): no other JWT can be passed off as ours."""

MAX_TOKEN_CHARS = 4096
"""Our tokens are about 600 characters; refuse anything far larger before decoding it."""

HEADER_FIELDS = frozenset({"alg", "typ", "kid"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
ED25519_SIGNATURE_BYTES = 64
_ED25519_KEY_BYTES = 32


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url without padding; raise ``ValueError`` unless ``text`` is canonical.

    Canonical means the only encoding of its bytes: no padding, no foreign characters, zero
    trailing bits. Accepting variants would make a token malleable (same bytes, new string),
    which would let one token be redeemed under several spellings if anything keyed on it.
    """
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError("not unpadded base64url") from exc
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # Two parsers may pick different duplicates; refuse rather than guess (RFC 7515 4).
            raise ValueError(f"duplicate JSON member {key!r}")
        result[key] = value
    return result


def strict_json_object(data: bytes) -> dict[str, Any]:
    """Parse UTF-8 JSON that must be one object; ``ValueError`` on anything else."""
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_unique_object,
            parse_constant=_reject_constant,
        )
    except RecursionError as exc:
        # A few KiB of "[[[[" exhaust the parser's stack; that is a malformed token, not a crash.
        raise ValueError("JSON nested too deeply") from exc
    if not isinstance(value, dict):
        raise ValueError("JSON is not an object")
    return value


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign_compact(
    claims: Mapping[str, Any], key: Ed25519PrivateKey, kid: str, *, typ: str = TOKEN_TYPE
) -> str:
    """Serialize ``claims`` as a compact JWS signed with ``key`` under ``kid``.

    ``typ`` names the kind of document (default: a verification token); another kind signed
    with the same keys (the portal's launch tickets) passes its own so neither can stand in
    for the other.
    """
    header = {"alg": ALGORITHM, "typ": typ, "kid": kid}
    body = b64url_encode(_compact_json(claims))
    signing_input = b64url_encode(_compact_json(header)) + "." + body
    signature = key.sign(signing_input.encode("ascii"))
    return signing_input + "." + b64url_encode(signature)


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_thumbprint(key: Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): a kid anyone can recompute from the key."""
    x = b64url_encode(_raw_public(key))
    canonical = _compact_json({"crv": "Ed25519", "kty": "OKP", "x": x})
    return b64url_encode(hashlib.sha256(canonical).digest())


def public_jwk(kid: str, key: Ed25519PublicKey) -> dict[str, str]:
    """One key as an RFC 8037 JWK: ``{kty: OKP, crv: Ed25519, x, kid, use: sig, alg: EdDSA}``."""
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url_encode(_raw_public(key)),
        "kid": kid,
        "use": "sig",
        "alg": ALGORITHM,
    }


class PublicKeySet(Mapping[str, Ed25519PublicKey]):
    """Published verification keys by ``kid``; converts to and from a JWKS (RFC 7517, 8037)."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = dict(keys or {})

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._keys[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"PublicKeySet(kids={list(self._keys)})"

    def to_jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWKS document: ``{"keys": [{kty, crv, x, kid, use, alg}, ...]}``."""
        return {"keys": [public_jwk(kid, key) for kid, key in self._keys.items()]}

    def to_json(self) -> str:
        """The JWKS document as compact JSON text (the body of /.well-known/jwks.json)."""
        return _compact_json(self.to_jwks()).decode()

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> PublicKeySet:
        """Read a JWKS; keep the Ed25519 signing keys, skip others (RFC 7517 section 5).

        Raises ``ValueError`` when the document is not a JWKS or an Ed25519 entry is broken.
        """
        entries = jwks.get("keys")
        if not isinstance(entries, list):
            raise ValueError("JWKS has no 'keys' list")
        keys: dict[str, Ed25519PublicKey] = {}
        for entry in entries:
            if not isinstance(entry, dict):
                raise ValueError("JWKS entry is not an object")
            if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
                continue
            if entry.get("use", "sig") != "sig" or entry.get("alg", ALGORITHM) != ALGORITHM:
                continue
            kid, x = entry.get("kid"), entry.get("x")
            if not isinstance(kid, str) or not kid or not isinstance(x, str):
                raise ValueError("Ed25519 JWK without kid or x")
            raw = b64url_decode(x)
            if len(raw) != _ED25519_KEY_BYTES:
                raise ValueError(f"Ed25519 JWK {kid!r} has a {len(raw)}-byte key")
            if kid in keys:
                raise ValueError(f"JWKS lists kid {kid!r} twice")
            keys[kid] = Ed25519PublicKey.from_public_bytes(raw)
        return cls(keys)

    @classmethod
    def from_json(cls, text: str | bytes) -> PublicKeySet:
        """Parse JWKS JSON text strictly (see ``from_jwks``)."""
        return cls.from_jwks(strict_json_object(text if isinstance(text, bytes) else text.encode()))
