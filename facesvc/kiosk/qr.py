"""The kiosk's side of the venue pass: the programme's keys to check it with, and its QR code.

The pass itself (claims, signature, checks) is :mod:`facesvc.tokens.passes`; the QR code's
text is the JWS itself (about 500 ASCII characters: a version-14-ish QR code, easy for a
phone screen). The kiosk checks a pass before it scans, so a participant at the wrong venue
hears why at once; the service checks it again on every Verify.

Where the kiosk gets the programme's public keys (:class:`PassKeys`): a JWKS file given to it
(:class:`JwksFileKeys`), or the service's GetSigningKeys (:class:`ServiceKeys`) when passes
are signed with the service's token keys (``facesvc passes issue`` does that by default).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import qrcode
import qrcode.constants
import zxingcpp
from PIL import Image

from facesvc.clock import Clock, SystemClock
from facesvc.models.types import RGBImage
from facesvc.tokens.jws import PublicKeySet
from facesvc.tokens.passes import PassProblem, PassRefused, VenuePass, open_pass


class PassKeysUnavailable(Exception):
    """The programme's public keys could not be obtained (the service is unreachable)."""


# --------------------------------------------------------------------------- programme keys


class PassKeys(Protocol):
    """The programme's published keys. ``refresh=True`` asks for a fresh copy (a pass named a
    key not seen yet); raises :class:`PassKeysUnavailable` when none can be had."""

    def keys(self, *, refresh: bool = False) -> PublicKeySet: ...


class JwksFileKeys:
    """Keys from a JWKS file handed to the kiosk (``/.well-known/jwks.json`` saved, or the
    programme's own pass-key JWKS); read again on refresh, so replacing the file is enough."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._keys: PublicKeySet | None = None

    def keys(self, *, refresh: bool = False) -> PublicKeySet:
        """See :class:`PassKeys`."""
        if self._keys is None or refresh:
            try:
                self._keys = PublicKeySet.from_json(self._path.read_bytes())
            except (OSError, ValueError) as exc:
                raise PassKeysUnavailable(f"cannot read the pass keys {self._path}: {exc}") from exc
        return self._keys


class ServiceKeys:
    """Keys from the service's GetSigningKeys (``fetch``: ``client.signing_keys``).

    Fetched on first use and kept; a refresh is made at most once per ``min_refresh_s``,
    so a stream of junk passes naming unknown keys cannot hammer the service.
    """

    def __init__(
        self,
        fetch: Callable[[], PublicKeySet],
        *,
        min_refresh_s: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        self._fetch = fetch
        self._min_refresh = timedelta(seconds=min_refresh_s)
        self._clock = clock or SystemClock()
        self._keys: PublicKeySet | None = None
        self._fetched_at: datetime | None = None

    def keys(self, *, refresh: bool = False) -> PublicKeySet:
        """See :class:`PassKeys`."""
        now = self._clock.now()
        recent = self._fetched_at is not None and now - self._fetched_at < self._min_refresh
        if self._keys is None or (refresh and not recent):
            try:
                self._keys = self._fetch()
            except Exception as exc:  # any transport failure means the same: no keys now
                raise PassKeysUnavailable(f"cannot fetch the programme's keys: {exc}") from exc
            self._fetched_at = now
        return self._keys


class PassChecker:
    """Checks scanned passes for one venue with the programme's keys.

    ``check`` raises :class:`PassRefused` or :class:`PassKeysUnavailable`.
    """

    def __init__(self, keys: PassKeys, venue: str, clock: Clock | None = None) -> None:
        self._keys = keys
        self._venue = venue
        self._clock = clock or SystemClock()

    @property
    def venue(self) -> str:
        return self._venue

    def check(self, text: str) -> VenuePass:
        """The pass ``text`` encodes, once its signature, expiry and venue check out."""
        now = self._clock.now()
        try:
            return open_pass(text, self._keys.keys(), venue=self._venue, now=now)
        except PassRefused as exc:
            if exc.problem is not PassProblem.FORGED:
                raise
            # A key rotated in after the last fetch looks forged until the keys are refreshed.
            return open_pass(text, self._keys.keys(refresh=True), venue=self._venue, now=now)


# --------------------------------------------------------------------------- QR images


def qr_png(text: str, *, box_px: int = 8) -> bytes:
    """``text`` as a QR code PNG (error correction M, 4-module quiet zone, ``box_px`` pixels
    per module: about 600 px wide for a pass)."""
    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, box_size=box_px)
    code.add_data(text)
    code.make(fit=True)
    buffer = io.BytesIO()
    code.make_image().save(buffer, format="PNG")
    return buffer.getvalue()


def read_qr(image: RGBImage) -> list[str]:
    """The texts of every QR code found in ``image`` ((H, W, 3) uint8 RGB), in reading order."""
    grey = Image.fromarray(image).convert("L")
    qr_only = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode)
    found = zxingcpp.read_barcodes(grey, formats=qr_only)
    return [code.text for code in found if code.valid]
