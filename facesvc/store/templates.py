"""Enrolled face templates, encrypted at rest in Redis with AES-256-GCM.

One template per participant, at ``<prefix>:{p:<pid>}:template`` (see
:mod:`facesvc.store.keys`). It keeps every enrollment descriptor, float32 (K, D), so the
matching policy can fuse them however it chooses; nothing here decides that.

Stored value (format version 1), all binary::

    b"FSVT" | version (1 byte) | len(kid) (1 byte) | kid (ASCII) | nonce (12 bytes) | ciphertext+tag

The plaintext is ``len(meta) (4 bytes, big-endian) | meta (JSON) | descriptors (<f4, C order)``,
so the raw Redis value never holds descriptor bytes. The nonce is random per write (96 bits;
a key encrypts far fewer than 2^32 values here, the bound for random GCM nonces). The
associated data is the header (magic, version, kid) plus the participant id, so a value
copied to another participant's key, or relabelled with another kid or version, fails
authentication instead of decrypting.

Keys live outside Redis in a :class:`TemplateKeyRing`: ``kid:base64key`` entries from
``templates.key_file`` (one per line) or ``templates.key`` (env ``FACESVC_TEMPLATES_KEY``,
comma-separated); every kid decrypts, one active kid encrypts. Rotation: append a new key
(it becomes active), run :meth:`TemplateStore.rekey_all` (CLI ``facesvc templates rekey``),
then retire the old entry once a pass reports nothing left under it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import re
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from facesvc.clock import require_aware
from facesvc.config import ConfigError, TemplatesSettings
from facesvc.errors import AlreadyExists, InvalidRequest, PreconditionFailed
from facesvc.store.connection import AsyncRedis, scan_keys
from facesvc.store.errors import store_errors
from facesvc.store.keys import KeySpace, validate_id

_MAGIC = b"FSVT"
_VERSION = 1
_NONCE_BYTES = 12
_KEY_BYTES = 32  # AES-256
_KID = re.compile(r"[A-Za-z0-9._\-]{1,64}")

# Compare-and-set for rekey: replace the value only if nobody rewrote it since it was read
# (a concurrent re-enrollment must win over a rotation of the old value).
_CAS_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


class AlreadyEnrolled(AlreadyExists):
    """The participant has a template and ``replace`` was not set: enroll with replace=True
    to overwrite it, or delete the enrollment first."""


class TemplateUnreadable(PreconditionFailed):
    """A stored template cannot be decrypted: its key id is not in the key ring, or the value
    was altered or moved from another participant's key. Re-enroll the participant, or add
    the missing key to the key ring."""


@dataclass(frozen=True, slots=True)
class Template:
    """An enrollment: ``descriptors`` is float32 (K, D), one row per enrolled image kept.

    ``created_at`` (tz-aware) is when this template was made; ``enrolled_at`` when the
    participant was first enrolled (None: at ``created_at``; a replace keeps the first
    time). ``image_count`` is how many photos were accepted (>= 1). ``tenants`` are the LMS
    tenants that may act for the participant; they are sealed with the descriptors, so
    whoever can write to Redis still cannot grant a tenant access.
    """

    participant_id: str
    model_pack: str
    descriptors: npt.NDArray[np.float32]
    created_at: datetime
    image_count: int
    enrolled_at: datetime | None = None
    tenants: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class TemplateMetadata:
    """What GetEnrollment may show: everything but the descriptors, plus the key id."""

    participant_id: str
    model_pack: str
    created_at: datetime
    enrolled_at: datetime
    image_count: int
    descriptor_count: int
    descriptor_dim: int
    key_id: str
    tenants: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RekeyResult:
    """What a rekey pass did: values re-encrypted, values already under the active key,
    and participants (or, for a malformed key name, keys) whose template could not be read
    (left untouched)."""

    rekeyed: int
    current: int
    unreadable: tuple[str, ...]


class TemplateKeyRing:
    """AES-256 keys by key id (kid); one active kid encrypts, every kid decrypts."""

    def __init__(self, keys: Mapping[str, bytes], active_kid: str) -> None:
        for kid, key in keys.items():
            if not _KID.fullmatch(kid):
                raise ValueError(f"template key id must be 1-64 of A-Z a-z 0-9 . _ - (got {kid!r})")
            if len(key) != _KEY_BYTES:
                raise ValueError(f"template key {kid!r} must be 32 bytes (got {len(key)})")
        if active_kid not in keys:
            raise ValueError(f"active template key id {active_kid!r} is not in the key ring")
        self._keys = dict(keys)
        self.active_kid = active_kid

    @classmethod
    def parse(cls, text: str, active_kid: str | None = None) -> TemplateKeyRing:
        """Read ``kid:base64key`` entries, separated by newlines or commas; ``#`` starts a
        comment. The active kid is ``active_kid``; None or "" means the last entry (append a
        key to rotate)."""
        keys: dict[str, bytes] = {}
        for raw in re.split(r"[\n,]", text):
            entry = raw.split("#", 1)[0].strip()
            if not entry:
                continue
            kid, sep, encoded = entry.partition(":")
            if not sep:
                raise ValueError("template key entries must look like kid:base64key")
            if kid in keys:
                raise ValueError(f"template key id {kid!r} appears twice")
            try:
                keys[kid] = base64.b64decode(encoded.strip(), validate=True)
            except binascii.Error as exc:
                raise ValueError(f"template key {kid!r} is not valid base64") from exc
        if not keys:
            raise ValueError(
                "no template keys configured: add a kid:base64key entry holding 32 random "
                "bytes (generate_template_key makes one)"
            )
        return cls(keys, active_kid or list(keys)[-1])

    @property
    def kids(self) -> tuple[str, ...]:
        """Every key id that can decrypt."""
        return tuple(self._keys)

    def key(self, kid: str) -> bytes | None:
        """The key for ``kid``, or None if the ring does not hold it."""
        return self._keys.get(kid)


def keyring_from_settings(settings: TemplatesSettings) -> TemplateKeyRing:
    """The ring the settings name: ``templates.key`` when set, else ``templates.key_file``.

    Raises ConfigError (naming the setting) when the keys are missing or malformed.
    """
    source = "templates.key" if settings.key else f"templates.key_file={settings.key_file}"
    try:
        text = settings.key or settings.key_file.read_text(encoding="ascii")
        return TemplateKeyRing.parse(text, settings.active_kid)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{source}: {exc}; it must hold kid:base64key entries of 32-byte keys"
        ) from exc


def generate_template_key(kid: str) -> str:
    """A new random AES-256 key as a ``kid:base64key`` line for the key file or env var."""
    if not _KID.fullmatch(kid):
        raise ValueError(f"template key id must be 1-64 of A-Z a-z 0-9 . _ - (got {kid!r})")
    return f"{kid}:{base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode()}"


class TemplateStore:
    """Encrypted templates in Redis (async). All Redis errors raise StoreUnavailable."""

    def __init__(
        self, client: AsyncRedis, keyring: TemplateKeyRing, *, key_prefix: str = "facesvc"
    ) -> None:
        """``client`` must return bytes (redis-py's default, as the factory builds it)."""
        self._client = client
        self._keyring = keyring
        self._keys = KeySpace(key_prefix)
        self._cas = client.register_script(_CAS_LUA)

    async def put(self, template: Template, *, replace: bool) -> TemplateMetadata:
        """Store ``template`` under the active key.

        Without ``replace`` an existing enrollment raises :class:`AlreadyEnrolled` (checked
        and written atomically with SET NX); with it, the new template keeps the first
        enrollment's ``enrolled_at``, and its tenants when it names none. Raises ValueError
        for a malformed template.
        """
        key = self._keys.template(template.participant_id)  # validates the id first
        if replace and template.enrolled_at is None:
            with contextlib.suppress(TemplateUnreadable):  # unreadable: enrolled afresh
                previous = await self.get(template.participant_id)
                if previous is not None:
                    first = previous.enrolled_at or previous.created_at
                    tenants = template.tenants or previous.tenants
                    template = dataclasses.replace(template, enrolled_at=first, tenants=tenants)
        value = self._seal(template)
        async with store_errors("store a template"):
            written = await self._client.set(key, value, nx=not replace)
        if not written:
            raise AlreadyEnrolled(
                f"participant {template.participant_id} is already enrolled: enroll with "
                "replace to overwrite the template, or delete the enrollment first"
            )
        return self._metadata(template, self._keyring.active_kid)

    async def swap_serving_pack(self, tag: str) -> str | None:
        """Record ``tag`` as the model pack this service serves with; return the tag that
        was recorded before (None the first time). Templates carry their pack's tag, so a
        different previous tag means every template made before needs a new enrollment."""
        async with store_errors("record the serving model pack"):
            previous = await self._client.getset(self._keys.serving_pack(), tag.encode())
        value = _binary(previous)
        return None if value is None else value.decode("utf-8", errors="replace")

    async def get(self, participant_id: str) -> Template | None:
        """The participant's template, or None if not enrolled.

        Raises :class:`TemplateUnreadable` if the value cannot be decrypted.
        """
        value = await self._read(participant_id)
        return None if value is None else self._open(participant_id, value)[0]

    async def metadata(self, participant_id: str) -> TemplateMetadata | None:
        """Enrollment metadata (no descriptors), or None if not enrolled."""
        value = await self._read(participant_id)
        if value is None:
            return None
        template, kid = self._open(participant_id, value)
        return self._metadata(template, kid)

    async def set_tenants(
        self, participant_id: str, tenants: frozenset[str]
    ) -> TemplateMetadata | None:
        """Replace the tenants of an enrolled participant's template (re-sealed under the
        active key); None when the participant has no enrollment. A re-enrollment racing
        this call wins (compare-and-set), and the call then applies to the new template.

        Raises :class:`TemplateUnreadable`, StoreUnavailable.
        """
        key = self._keys.template(participant_id)
        while True:
            value = await self._read(participant_id)
            if value is None:
                return None
            template = dataclasses.replace(self._open(participant_id, value)[0], tenants=tenants)
            async with store_errors("update a template's tenants"):
                if await self._cas(keys=[key], args=[value, self._seal(template)]):
                    return self._metadata(template, self._keyring.active_kid)

    async def delete(self, participant_id: str) -> bool:
        """Delete the enrollment and every other key of the participant.

        True if a template existed. Everything under the participant's hash tag goes (see
        :meth:`delete_participant_data`), so a later verification answers NOT_ENROLLED.
        """
        key = self._keys.template(participant_id)
        async with store_errors("delete a template"):
            existed = bool(await self._client.unlink(key))
        await self.delete_participant_data(participant_id)
        return existed

    async def delete_participant_data(self, participant_id: str) -> int:
        """Remove every key ``<prefix>:{p:<pid>}:*``; returns how many were removed.

        That is the template and everything derived from the participant: attempt counters,
        idempotency records, liveness challenges, any key another part stores under the same
        hash tag. Deleting the counters resets today's attempts: deletion is an admin act
        (erasure of the participant's data), not something a participant can trigger.
        The keys share one slot, so on a cluster one node is scanned. A key created
        concurrently (a scan in flight) may survive; repeat the call to catch it.
        """
        anchor = self._keys.participant(participant_id)
        removed = 0
        batch: list[str] = []
        async with store_errors("delete participant data"):
            async for key in scan_keys(
                self._client, self._keys.participant_pattern(participant_id), slot_of=anchor
            ):
                batch.append(key)
                if len(batch) >= 500:
                    removed += int(await self._client.unlink(*batch))
                    batch.clear()
            if batch:
                removed += int(await self._client.unlink(*batch))
        return removed

    async def rekey_all(self) -> RekeyResult:
        """Re-encrypt every template not under the active kid (SCAN, cluster-wide).

        Values keep decrypting under their old kid until rewritten, so the service keeps
        working during the pass. A template re-enrolled during the pass is left as written
        (compare-and-set). Unreadable templates are reported, not touched.
        """
        rekeyed = current = 0
        unreadable: list[str] = []
        active = self._keyring.active_kid
        async with store_errors("re-encrypt templates"):
            async for key in scan_keys(self._client, self._keys.template_pattern()):
                try:
                    participant_id = self._keys.participant_of_template(key)
                except InvalidRequest:  # not written by this service (an id it would refuse)
                    unreadable.append(key)
                    continue
                value = _binary(await self._client.get(key))
                if value is None:
                    continue  # deleted since the scan saw it
                try:
                    template, kid = self._open(participant_id, value)
                except TemplateUnreadable:
                    unreadable.append(participant_id)
                    continue
                if kid == active:
                    current += 1
                    continue
                rekeyed += int(await self._cas(keys=[key], args=[value, self._seal(template)]))
        return RekeyResult(rekeyed, current, tuple(unreadable))

    async def _read(self, participant_id: str) -> bytes | None:
        async with store_errors("read a template"):
            return _binary(await self._client.get(self._keys.template(participant_id)))

    def _seal(self, template: Template) -> bytes:
        """Validate and encrypt ``template`` (id already validated by its key) under the
        active key into the stored value."""
        descriptors = np.asarray(template.descriptors)
        if descriptors.ndim != 2 or 0 in descriptors.shape:
            raise ValueError(
                f"descriptors must be a non-empty (K, D) array (got {descriptors.shape})"
            )
        if not np.all(np.isfinite(descriptors)):
            raise ValueError("descriptors must be finite")
        if not template.model_pack:
            raise ValueError("model_pack must name the pack that made the descriptors")
        if template.image_count < 1:
            raise ValueError(f"image_count must be >= 1 (got {template.image_count})")
        require_aware(template.created_at, "created_at")
        enrolled_at = template.enrolled_at or template.created_at
        require_aware(enrolled_at, "enrolled_at")
        for tenant in template.tenants:
            validate_id(tenant, "tenant")
        meta = json.dumps(
            {
                "participant_id": template.participant_id,
                "model_pack": template.model_pack,
                "created_at": template.created_at.isoformat(),
                "enrolled_at": enrolled_at.isoformat(),
                "image_count": template.image_count,
                "shape": list(descriptors.shape),
                "tenants": sorted(template.tenants),
            },
            separators=(",", ":"),
        ).encode()
        body = descriptors.astype("<f4", copy=False).tobytes(order="C")
        plaintext = struct.pack(">I", len(meta)) + meta + body
        kid = self._keyring.active_kid
        header = _header(kid)
        nonce = secrets.token_bytes(_NONCE_BYTES)
        key = self._keyring.key(kid)
        assert key is not None  # the ring guarantees its active kid
        sealed = AESGCM(key).encrypt(nonce, plaintext, _aad(header, template.participant_id))
        return header + nonce + sealed

    def _open(self, participant_id: str, value: bytes) -> tuple[Template, str]:
        """Decrypt a stored value for ``participant_id``; returns the template and its kid."""
        unreadable = f"the template of participant {participant_id}"
        if len(value) < len(_MAGIC) + 2 or not value.startswith(_MAGIC):
            raise TemplateUnreadable(f"{unreadable} is not in a known format")
        version, kid_len = value[len(_MAGIC)], value[len(_MAGIC) + 1]
        if version != _VERSION:
            raise TemplateUnreadable(f"{unreadable} has unknown format version {version}")
        header_len = len(_MAGIC) + 2 + kid_len
        kid = value[len(_MAGIC) + 2 : header_len].decode("ascii", errors="replace")
        key = self._keyring.key(kid)
        if key is None:
            raise TemplateUnreadable(
                f"{unreadable} is encrypted under key id {kid!r}, which the key ring lacks: "
                "add that key to the ring"
            )
        header = value[:header_len]
        nonce = value[header_len : header_len + _NONCE_BYTES]
        try:
            plaintext = AESGCM(key).decrypt(
                nonce, value[header_len + _NONCE_BYTES :], _aad(header, participant_id)
            )
        except InvalidTag as exc:
            raise TemplateUnreadable(
                f"{unreadable} failed authentication (altered, or copied from another "
                "participant's key): re-enroll the participant"
            ) from exc
        (meta_len,) = struct.unpack_from(">I", plaintext)
        meta = json.loads(plaintext[4 : 4 + meta_len])
        rows, dim = meta["shape"]
        descriptors = np.frombuffer(plaintext, dtype="<f4", offset=4 + meta_len).reshape(rows, dim)
        template = Template(
            participant_id=meta["participant_id"],
            model_pack=meta["model_pack"],
            descriptors=descriptors.astype(np.float32, copy=False),
            created_at=datetime.fromisoformat(meta["created_at"]),
            image_count=int(meta["image_count"]),
            # Templates stored before enrolled_at was recorded: their own creation time.
            enrolled_at=datetime.fromisoformat(meta.get("enrolled_at", meta["created_at"])),
            # Templates stored before tenants were recorded belong to the programme alone.
            tenants=frozenset(meta.get("tenants", ())),
        )
        return template, kid

    @staticmethod
    def _metadata(template: Template, kid: str) -> TemplateMetadata:
        rows, dim = template.descriptors.shape
        return TemplateMetadata(
            participant_id=template.participant_id,
            model_pack=template.model_pack,
            created_at=template.created_at,
            enrolled_at=template.enrolled_at or template.created_at,
            image_count=template.image_count,
            descriptor_count=int(rows),
            descriptor_dim=int(dim),
            key_id=kid,
            tenants=template.tenants,
        )


def _binary(value: bytes | str | None) -> bytes | None:
    """A GET reply as bytes; a client that decodes replies to text cannot carry ciphertext."""
    if isinstance(value, str):
        raise TypeError("the template store needs a Redis client with decode_responses=False")
    return value


def _header(kid: str) -> bytes:
    """Magic, format version and key id: authenticated (AAD) but not secret."""
    encoded = kid.encode("ascii")
    return _MAGIC + bytes([_VERSION, len(encoded)]) + encoded


def _aad(header: bytes, participant_id: str) -> bytes:
    """Associated data: binds the value to its header and to one participant."""
    return header + b"\x00" + participant_id.encode("utf-8")


def next_template_kid(kids: Sequence[str]) -> str:
    """``k<n>`` one above the highest ``k<n>`` in ``kids``: never a kid already in the ring.

    Counting the entries instead would reuse a kid once an old key has been removed (k1 and
    k2, k1 retired, and the next key would be a second k2, which the ring refuses to load).
    """
    numbers = [int(match.group(1)) for kid in kids if (match := re.fullmatch(r"k(\d+)", kid))]
    return f"k{max(numbers, default=0) + 1}"
