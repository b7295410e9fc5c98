"""What every signed format of the service shares: opening one, its problems, its claims.

The service signs three kinds of document with the token keys, each a compact JWS (see
:mod:`facesvc.tokens.jws`) under its own ``typ``: verification tokens
(:mod:`facesvc.tokens.check`), launch tickets (:mod:`facesvc.tokens.launch`) and venue
passes (:mod:`facesvc.tokens.passes`). They are opened and judged here, one way:

- :func:`open_signed` checks the header, the signature and the ``typ``, reads the claims
  with the format's own reader, and :meth:`Opened.problem` judges the issuer and the times
  (``exp``, and ``nbf`` where present) with a leeway, always in that order;
- :class:`Problem` is the one vocabulary of what can be wrong with any signed document and
  :class:`Refused` the one refusal; a format adds only the problems that are its own (a
  spent ticket, a pass for another venue) and the words its callers see;
- times are NumericDate, whole Unix seconds: :func:`epoch` and :func:`from_epoch` convert,
  and the ``*_claim`` readers read a required claim with its exact JSON type.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from cryptography.exceptions import InvalidSignature

from facesvc.clock import require_aware
from facesvc.store.keys import validate_id
from facesvc.tokens.jws import (
    ALGORITHM,
    ED25519_SIGNATURE_BYTES,
    HEADER_FIELDS,
    MAX_TOKEN_CHARS,
    TOKEN_TYPE,
    PublicKeySet,
    b64url_decode,
    strict_json_object,
)

__all__ = [
    "Opened",
    "Problem",
    "Refused",
    "VerifiedJws",
    "epoch",
    "from_epoch",
    "id_claim",
    "int_claim",
    "open_signed",
    "str_claim",
    "time_claim",
    "verify_compact",
]


class Problem(enum.Enum):
    """What can be wrong with any signed document, whatever its format.

    A format's own vocabulary (``CheckReason``, ``TicketProblem``, ``PassProblem``) names
    these the same way, or folds several into one word its callers know.
    """

    MALFORMED = "MALFORMED"
    """Not a compact JWS of the expected shape and ``typ``, or its claims are unreadable."""
    BAD_SIGNATURE = "BAD_SIGNATURE"
    """The signature does not verify, or the header names an algorithm other than EdDSA."""
    UNKNOWN_KEY = "UNKNOWN_KEY"
    """The ``kid`` is not in the key set (never published, or retired)."""
    WRONG_ISSUER = "WRONG_ISSUER"
    """Signed by a known key but for another issuer (e.g. a staging service sharing keys)."""
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"


P = TypeVar("P", bound=enum.Enum)
C = TypeVar("C")


class Refused(Exception, Generic[P]):
    """A signed document cannot be used: ``problem`` says why (in the format's vocabulary,
    :class:`Problem` where it has none of its own), ``detail`` says what was seen.

    The text is ``"<problem>: <detail>"`` unless a format gives its own ``message``.
    """

    def __init__(self, problem: P, detail: str, *, message: str | None = None) -> None:
        super().__init__(f"{problem.value}: {detail}" if message is None else message)
        self.problem: P = problem
        self.detail = detail


# --------------------------------------------------------------------------- times and claims


def epoch(moment: datetime) -> int:
    """``moment`` (timezone-aware) as NumericDate: whole Unix seconds."""
    return int(moment.timestamp())


def from_epoch(seconds: int) -> datetime:
    """NumericDate ``seconds`` as a UTC datetime."""
    return datetime.fromtimestamp(seconds, UTC)


def str_claim(claims: Mapping[str, Any], name: str) -> str:
    """Claim ``name`` of a signed payload; KeyError when absent, TypeError unless a string."""
    value = claims[name]
    if not isinstance(value, str):
        raise TypeError(f"claim {name} is not a string")
    return value


def int_claim(claims: Mapping[str, Any], name: str) -> int:
    """Claim ``name`` as an integer (NumericDate); KeyError when absent, TypeError unless an
    integer."""
    value = claims[name]
    # bool is an int subclass: a "true" exp must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"claim {name} is not an integer")
    return value


def time_claim(claims: Mapping[str, Any], name: str) -> datetime:
    """Claim ``name`` (integer Unix seconds) as a UTC datetime (see :func:`int_claim`)."""
    return from_epoch(int_claim(claims, name))


def id_claim(claims: Mapping[str, Any], name: str) -> str:
    """Claim ``name`` as an id the service accepts (``validate_id``; ValueError otherwise)."""
    return validate_id(str_claim(claims, name), name)


# --------------------------------------------------------------------------- opening


@dataclass(frozen=True, slots=True)
class VerifiedJws:
    """A JWS whose header was acceptable and whose signature verified."""

    kid: str
    payload: dict[str, Any]


def verify_compact(token: str, keys: PublicKeySet, *, typ: str = TOKEN_TYPE) -> VerifiedJws:
    """Check the header, find the key by ``kid``, verify the signature, parse the payload.

    The header's ``typ`` must equal ``typ`` (default: a verification token).

    The header is judged before any key is touched, so an ``alg: none`` or HS256 token never
    reaches a verifier. Raises :class:`Refused` (MALFORMED, BAD_SIGNATURE or UNKNOWN_KEY).
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise Refused(Problem.MALFORMED, "token too long")
    if not token.isascii():
        # Compact JWS is base64url and dots; anything else cannot even be a signing input.
        raise Refused(Problem.MALFORMED, "token has non-ASCII characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise Refused(Problem.MALFORMED, "not a compact JWS (three parts)")
    header_b64, payload_b64, signature_b64 = parts
    try:
        header = strict_json_object(b64url_decode(header_b64))
    except ValueError as exc:
        raise Refused(Problem.MALFORMED, f"header: {exc}") from exc
    if header.get("alg") != ALGORITHM:
        raise Refused(Problem.BAD_SIGNATURE, f"algorithm {header.get('alg')!r} refused")
    if header.get("typ") != typ:
        raise Refused(Problem.MALFORMED, "wrong token type")
    extra = set(header) - HEADER_FIELDS
    if extra:
        raise Refused(Problem.MALFORMED, f"header fields not allowed: {sorted(extra)}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Refused(Problem.MALFORMED, "header has no kid")
    public_key = keys.get(kid)
    if public_key is None:
        raise Refused(Problem.UNKNOWN_KEY, "kid not in the published key set")
    try:
        signature = b64url_decode(signature_b64)
    except ValueError as exc:
        raise Refused(Problem.MALFORMED, f"signature: {exc}") from exc
    if len(signature) != ED25519_SIGNATURE_BYTES:
        raise Refused(Problem.BAD_SIGNATURE, "signature has the wrong length")
    try:
        public_key.verify(signature, f"{header_b64}.{payload_b64}".encode("ascii"))
    except InvalidSignature as exc:
        raise Refused(Problem.BAD_SIGNATURE, "signature does not verify") from exc
    try:
        payload = strict_json_object(b64url_decode(payload_b64))
    except ValueError as exc:
        raise Refused(Problem.MALFORMED, f"payload: {exc}") from exc
    return VerifiedJws(kid=kid, payload=payload)


@dataclass(frozen=True, slots=True)
class Opened(Generic[C]):
    """A genuine document of the expected ``typ``: the key that signed it, its raw payload,
    its claims as the format reads them, and its validity window (NumericDate)."""

    kid: str
    payload: dict[str, Any]
    claims: C
    exp: int
    nbf: int | None

    def problem(
        self, now: datetime, *, leeway_s: float = 0.0, issuer: str | None = None
    ) -> Problem | None:
        """What is wrong with the document at ``now`` (timezone-aware), or None: the issuer
        (when ``issuer`` is given), then ``exp``, then ``nbf`` (when the document has one),
        each time allowing ``leeway_s`` seconds of clock skew. ``exp`` is exclusive
        (RFC 7519 4.1.4): a document is dead from ``exp`` on, plus the leeway."""
        if issuer is not None and self.payload.get("iss") != issuer:
            return Problem.WRONG_ISSUER
        at = require_aware(now, "now").timestamp()
        if at >= self.exp + leeway_s:
            return Problem.EXPIRED
        if self.nbf is not None and at + leeway_s < self.nbf:
            return Problem.NOT_YET_VALID
        return None

    def check(self, now: datetime, *, leeway_s: float = 0.0, issuer: str | None = None) -> C:
        """The claims, once :meth:`problem` finds nothing; else raises :class:`Refused`."""
        problem = self.problem(now, leeway_s=leeway_s, issuer=issuer)
        if problem is Problem.WRONG_ISSUER:
            raise Refused(problem, f"issued by {self.payload.get('iss')!r}, not {issuer!r}")
        if problem is Problem.EXPIRED:
            raise Refused(problem, f"expired at {from_epoch(self.exp):%Y-%m-%d %H:%M} UTC")
        if problem is not None:
            raise Refused(
                problem, f"not valid before {from_epoch(self.nbf or 0):%Y-%m-%d %H:%M} UTC"
            )
        return self.claims


def open_signed(
    token: str, keys: PublicKeySet, *, typ: str, read: Callable[[dict[str, Any]], C]
) -> Opened[C]:
    """Verify ``token`` as a compact JWS of type ``typ`` signed by one of ``keys`` and read
    its claims with ``read`` (which raises KeyError, TypeError or ValueError for claims it
    cannot accept). Every document must carry ``exp``; ``nbf`` is optional.

    Raises :class:`Refused` (MALFORMED, BAD_SIGNATURE or UNKNOWN_KEY); judge the times and
    the issuer next with :meth:`Opened.problem` or :meth:`Opened.check`.
    """
    verified = verify_compact(token, keys, typ=typ)
    payload = verified.payload
    try:
        claims = read(payload)
        exp = int_claim(payload, "exp")
        nbf = int_claim(payload, "nbf") if "nbf" in payload else None
    except (KeyError, TypeError, ValueError) as exc:
        # Signed by us yet unreadable: an issuer bug, not an attack; still refused.
        raise Refused(Problem.MALFORMED, f"claims: {exc}") from exc
    return Opened(verified.kid, payload, claims, exp, nbf)
