"""Signing keys in a key directory, their rotation timeline, and the published key set.

Layout of the directory (a plain folder or a read-only secret mount), one pair per key::

    <kid>.pem    the Ed25519 private key, PKCS#8 PEM, mode 0600
    <kid>.json   {"kid", "created_at", "state", "activate_after", "retire_after"}

``kid`` is the key's RFC 7638 thumbprint, so a file pair that does not belong together is
detected on load. Times are ISO 8601 UTC.

Timeline of one rotation at time T (publication delay D, leeway E, and L the life of the
longest-lived thing a key signs: gate tokens and the scan page's launch tickets, see
``facesvc.commands.keys.longest_signed_life_s``)::

    T          new key written as "next": published in the JWKS, not signing
    T + D      new key signs (D >= the JWKS cache max-age, so every verifier has it by then)
    T + D + L + E   old key leaves the JWKS: the last token or ticket it signed has expired

The service derives each key's live state from these timestamps; ``state`` in the file is the
state as of the last write by ``keys_*``, and only ``retired`` there is binding. So no service
process ever writes to the directory, and a secret mount works unchanged.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from facesvc.clock import Clock, SystemClock, require_aware
from facesvc.errors import PreconditionFailed
from facesvc.tokens.jws import PublicKeySet, key_thumbprint, public_jwk, strict_json_object

log = logging.getLogger(__name__)


class KeyState(enum.Enum):
    """``next``: published, not yet signing; ``active``: may sign; ``retired``: gone."""

    NEXT = "next"
    ACTIVE = "active"
    RETIRED = "retired"


class NoSigningKeyError(PreconditionFailed):
    """The key directory holds no key that may sign now."""


class KeyDirectoryError(RuntimeError):
    """The key directory cannot be read or is inconsistent; the message names the file."""


class SigningKey:
    """A private key with its kid. Its repr and str show the kid only, never the key."""

    __slots__ = ("_private", "kid")

    def __init__(self, kid: str, private: Ed25519PrivateKey) -> None:
        self.kid = kid
        self._private = private

    @property
    def private_key(self) -> Ed25519PrivateKey:
        return self._private

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, private=<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        # Refuse pickling: a pickled key would leave the process in the clear (cache, queue, log).
        raise TypeError("SigningKey cannot be pickled")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """The metadata of one key (the ``<kid>.json`` file)."""

    kid: str
    created_at: datetime
    state: KeyState
    activate_after: datetime
    retire_after: datetime | None

    def live_state(self, now: datetime) -> KeyState:
        """The state at ``now``, derived from the timestamps (see the module docstring)."""
        if self.state is KeyState.RETIRED or (
            self.retire_after is not None and now >= self.retire_after
        ):
            return KeyState.RETIRED
        if now < self.activate_after:
            return KeyState.NEXT
        return KeyState.ACTIVE

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "created_at": _iso(self.created_at),
            "state": self.state.value,
            "activate_after": _iso(self.activate_after),
            "retire_after": None if self.retire_after is None else _iso(self.retire_after),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRecord:
        retire = data.get("retire_after")
        return cls(
            kid=str(data["kid"]),
            created_at=_parse_iso(data["created_at"]),
            state=KeyState(data["state"]),
            activate_after=_parse_iso(data["activate_after"]),
            retire_after=None if retire is None else _parse_iso(retire),
        )


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """One row of ``keys list``: a key's record and what it does at the given time."""

    record: KeyRecord
    state: KeyState
    """Live state at the time asked."""
    published: bool
    signing: bool


@dataclass(frozen=True, slots=True)
class PublishedKey:
    """One published key with its signing period, for GetSigningKeys' structured list."""

    kid: str
    public_key: Ed25519PublicKey
    signs_from: datetime
    signs_until: datetime | None
    """When its successor takes over; None while no successor is planned."""
    active: bool
    """True for the key that signs new tokens now."""

    @property
    def jwk(self) -> dict[str, str]:
        """The key as a JWK (its ``x`` is what GetSigningKeys' structured list carries)."""
        return public_jwk(self.kid, self.public_key)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_iso(text: Any) -> datetime:
    if not isinstance(text, str):
        raise ValueError("timestamp is not a string")
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    return moment.astimezone(UTC)


class KeyRing:
    """An immutable snapshot of a key directory: which key signs and which are published."""

    __slots__ = ("_private", "_records")

    def __init__(self, records: list[KeyRecord], private: dict[str, Ed25519PrivateKey]) -> None:
        # In the order keys take over, so the last live one signs and the JWKS reads in order.
        # On an activation tie (a rotation with no publication delay in the same second), a key
        # that a rotation superseded (it has a retire_after) comes before its successor.
        self._records = sorted(
            records, key=lambda r: (r.activate_after, r.retire_after is None, r.created_at, r.kid)
        )
        self._private = private

    def __repr__(self) -> str:
        return f"KeyRing(kids={[r.kid for r in self._records]})"

    @property
    def records(self) -> list[KeyRecord]:
        return list(self._records)

    def _signer_kid(self, now: datetime) -> str | None:
        active = [r for r in self._records if r.live_state(now) is KeyState.ACTIVE]
        return active[-1].kid if active else None

    def signing_key(self, now: datetime) -> SigningKey:
        """The key to sign with at ``now``: the most recently activated live key."""
        kid = self._signer_kid(now)
        if kid is None:
            raise NoSigningKeyError(
                "no active signing key in the key directory: run `facesvc keys generate`"
                " (or `keys rotate` if every key is retired)"
            )
        return SigningKey(kid, self._private[kid])

    def published(self, now: datetime) -> list[PublishedKey]:
        """Every key published at ``now`` (next, signing and draining), in takeover order."""
        signer = self._signer_kid(now)
        rows = []
        for i, record in enumerate(self._records):
            if record.live_state(now) is KeyState.RETIRED:
                continue
            successor = self._records[i + 1] if i + 1 < len(self._records) else None
            rows.append(
                PublishedKey(
                    kid=record.kid,
                    public_key=self._private[record.kid].public_key(),
                    signs_from=record.activate_after,
                    signs_until=None if successor is None else successor.activate_after,
                    active=record.kid == signer,
                )
            )
        return rows

    def public_keys(self, now: datetime) -> PublicKeySet:
        """The published keys at ``now`` as a key set (``.to_jwks()`` is the JWKS)."""
        return PublicKeySet({key.kid: key.public_key for key in self.published(now)})

    def status(self, now: datetime) -> list[KeyStatus]:
        """Each key's live state at ``now``, oldest activation first."""
        signer = self._signer_kid(now)
        rows = []
        for record in self._records:
            state = record.live_state(now)
            rows.append(
                KeyStatus(record, state, state is not KeyState.RETIRED, record.kid == signer)
            )
        return rows


def load_key_ring(directory: Path) -> KeyRing:
    """Read every ``<kid>.json`` (and the ``<kid>.pem`` of each key not retired) in ``directory``.

    Raises ``KeyDirectoryError`` naming the offending file; never includes key material.
    """
    if not directory.is_dir():
        raise KeyDirectoryError(
            f"key directory {directory} does not exist: create it with `facesvc keys generate`"
        )
    records: list[KeyRecord] = []
    private: dict[str, Ed25519PrivateKey] = {}
    try:
        meta_files = sorted(directory.glob("*.json"))
    except OSError as exc:
        raise KeyDirectoryError(f"cannot list key directory {directory}: {exc}") from exc
    for meta in meta_files:
        try:
            record = KeyRecord.from_json(strict_json_object(meta.read_bytes()))
        except (OSError, ValueError, KeyError) as exc:
            raise KeyDirectoryError(f"bad key metadata {meta}: {exc}") from exc
        if record.kid != meta.stem:
            raise KeyDirectoryError(f"{meta} names kid {record.kid!r}, not its file name")
        if record.state is not KeyState.RETIRED:
            private[record.kid] = _load_private(directory / f"{record.kid}.pem", record.kid)
        records.append(record)
    return KeyRing(records, private)


def _load_private(path: Path, kid: str) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        # The message of a parse error never quotes the PEM, but say only the kind of failure.
        raise KeyDirectoryError(f"cannot load private key {path}: {type(exc).__name__}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyDirectoryError(f"{path} is not an Ed25519 private key")
    if key_thumbprint(key.public_key()) != kid:
        raise KeyDirectoryError(f"{path} does not hold the key its kid {kid!r} names")
    if mode & 0o077:
        log.warning("private key %s is readable by group or others; chmod 600 it", path)
    return key


class SigningKeySource(Protocol):
    """Where the issuer gets its key: ``KeyRing`` or ``KeyDirectory``."""

    def signing_key(self, now: datetime) -> SigningKey: ...


class PublicKeySource(Protocol):
    """Where redemption and GetSigningKeys get the published keys: ``KeyRing``/``KeyDirectory``."""

    def public_keys(self, now: datetime) -> PublicKeySet: ...


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int, int], ...]:
    """Names, inodes, sizes and mtimes of the directory's files: changes when any key does.

    ``stat`` follows symlinks, so a Kubernetes secret update (a swapped ``..data`` link)
    changes it too. An unreadable directory gives ``()``, which never equals a real print.
    """
    try:
        return tuple(
            sorted(
                (entry.name, st.st_ino, st.st_size, st.st_mtime_ns)
                for entry in directory.iterdir()
                for st in (entry.stat(),)
            )
        )
    except OSError:
        return ()


class KeyDirectory:
    """The service's view of a key directory, checked for changes every ``reload_s`` seconds.

    Checking picks up a ``keys rotate`` run by an operator (or a secret update) without a
    restart; the publication delay of a rotation must exceed ``reload_s``. The files are
    parsed again only when they changed (a few ``stat`` calls otherwise). A directory that
    fails to load after it once loaded keeps the last good snapshot and logs why, so a
    half-updated secret mount cannot take signing down.
    """

    def __init__(self, path: Path, *, reload_s: float = 5.0, clock: Clock | None = None) -> None:
        """Load ``path`` now; raises ``KeyDirectoryError`` when it cannot be read at start."""
        self._path = path
        self._reload_every = timedelta(seconds=reload_s)
        self._clock = clock or SystemClock()
        # Held by the event loop and by worker threads alike (issuing runs in either).
        self._lock = threading.Lock()
        self._fingerprint = _fingerprint(path)
        self._ring = load_key_ring(path)
        self._checked_at = self._clock.now()

    def __repr__(self) -> str:
        return f"KeyDirectory({str(self._path)!r})"

    def ring(self) -> KeyRing:
        """The current snapshot, re-read when the files changed (checked every ``reload_s``)."""
        with self._lock:
            now = self._clock.now()
            if now - self._checked_at < self._reload_every:
                return self._ring
            self._checked_at = now
            fingerprint = _fingerprint(self._path)
            if fingerprint != self._fingerprint:
                try:
                    self._ring = load_key_ring(self._path)
                except KeyDirectoryError as exc:
                    # The print is not taken: the next check tries (and says it) again.
                    log.warning("keeping the previous signing keys: %s", exc)
                else:
                    self._fingerprint = fingerprint
            return self._ring

    def signing_key(self, now: datetime) -> SigningKey:
        """See ``KeyRing.signing_key``."""
        return self.ring().signing_key(now)

    def public_keys(self, now: datetime) -> PublicKeySet:
        """See ``KeyRing.public_keys``."""
        return self.ring().public_keys(now)

    def published(self, now: datetime) -> list[PublishedKey]:
        """See ``KeyRing.published``."""
        return self.ring().published(now)


# --- operator commands (`facesvc keys generate | rotate | list`) --------------------------------


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # Write beside the target and rename, so a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_record(directory: Path, record: KeyRecord) -> None:
    text = json.dumps(record.to_json(), indent=2) + "\n"
    _write_atomic(directory / f"{record.kid}.json", text.encode(), 0o644)


def _new_key(directory: Path, now: datetime, activate_after: datetime) -> KeyRecord:
    key = Ed25519PrivateKey.generate()
    kid = key_thumbprint(key.public_key())
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    # The PEM lands before its metadata: a loader keyed on *.json never finds a key half-made.
    _write_atomic(directory / f"{kid}.pem", pem, 0o600)
    record = KeyRecord(
        kid=kid,
        created_at=now.astimezone(UTC),
        state=KeyState.NEXT if activate_after > now else KeyState.ACTIVE,
        activate_after=activate_after.astimezone(UTC),
        retire_after=None,
    )
    _write_record(directory, record)
    return record


def keys_generate(directory: Path, *, now: datetime | None = None) -> KeyStatus:
    """Create the first signing key, active at once, in ``directory`` (created 0700 if absent).

    Refuses a directory that already holds keys: switching keys is ``keys_rotate``'s job, which
    keeps tokens in flight valid.
    """
    now = _now(now)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(directory.glob("*.json")):
        raise KeyDirectoryError(f"{directory} already holds keys; use `facesvc keys rotate`")
    record = _new_key(directory, now, activate_after=now)
    return KeyStatus(record, KeyState.ACTIVE, published=True, signing=True)


def keys_rotate(
    directory: Path,
    *,
    publish_delay_s: float,
    token_ttl_s: float,
    leeway_s: float,
    now: datetime | None = None,
) -> KeyStatus:
    """Add a new key that signs from ``now + publish_delay_s``; schedule the old ones' retirement.

    Every live key without a retirement time gets ``retire_after = switch + token_ttl_s +
    leeway_s``: the last token it can sign expires (with the verifiers' leeway) by then, so
    ``token_ttl_s`` must be the life of the longest-lived format the keys sign. Keys
    already retired lose their private key file. Returns the new key's status.
    """
    if publish_delay_s < 0 or token_ttl_s <= 0 or leeway_s < 0:
        raise ValueError("publish_delay_s and leeway_s must be >= 0, token_ttl_s > 0")
    now = _now(now)
    ring = load_key_ring(directory)
    switch = now + timedelta(seconds=publish_delay_s)
    for record in ring.records:
        state = record.live_state(now)
        retire_after = record.retire_after
        if state is not KeyState.RETIRED and retire_after is None:
            retire_after = (switch + timedelta(seconds=token_ttl_s + leeway_s)).astimezone(UTC)
        updated = replace(record, state=state, retire_after=retire_after)
        if updated != record:
            _write_record(directory, updated)
        if state is KeyState.RETIRED:
            (directory / f"{record.kid}.pem").unlink(missing_ok=True)
    record = _new_key(directory, now, activate_after=switch)
    return KeyStatus(record, record.live_state(now), published=True, signing=switch <= now)


def keys_list(directory: Path, *, now: datetime | None = None) -> list[KeyStatus]:
    """Every key in ``directory`` with its live state at ``now``, oldest activation first."""
    return load_key_ring(directory).status(_now(now))


def _now(now: datetime | None) -> datetime:
    return SystemClock().now() if now is None else require_aware(now, "now")
