"""``facesvc passes issue | jwks``: the programme side of venue passes (see facesvc.commands.cli).

Signs a :class:`~facesvc.tokens.passes.VenuePass` with the active key of a key directory (by
default the service's token keys, ``tokens.key_dir``, whose public half the service already
publishes through GetSigningKeys and /.well-known/jwks.json, where kiosks fetch it) and
writes the QR code as a PNG; ``facesvc passes jwks`` prints the matching public keys for
kiosks that are given a key file. The participant dashboard would call :func:`issue_pass_png`
the same way when it shows the code.

Key lifetime: token keys retire a rotation's publication delay plus the longest token or
launch-ticket life after it (about 20 minutes by default), and a pass signed by a retired
key no longer checks. Passes are therefore best minted close to the meeting (the
dashboard draws the code when opened); a programme that prints passes days ahead keeps a
key directory of its own for them (``--key-dir``) and gives kiosks its JWKS file
(``facesvc-kiosk --pass-keys``).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from facesvc.clock import SystemClock
from facesvc.commands.arguments import settings_from_args
from facesvc.domain import Gate
from facesvc.kiosk.qr import qr_png
from facesvc.tokens.keys import KeyDirectoryError, NoSigningKeyError, SigningKey, load_key_ring
from facesvc.tokens.passes import VenuePass, new_pass, sign_pass


def issue_pass_png(venue_pass: VenuePass, key: SigningKey) -> tuple[str, bytes]:
    """The signed pass and its QR code as PNG bytes."""
    text = sign_pass(venue_pass, key)
    return text, qr_png(text)


def _when(text: str, flag: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{flag} {text!r} needs a time zone, e.g. 2026-12-01T09:00+07:00")
    return moment


def cli_passes_issue(args: argparse.Namespace) -> int:
    """Write the PNG to ``--out``; print ``{"pass_id", "expires_at", "out"}`` (and the pass
    text with ``--print-pass``) as one JSON line. Exit 2 on a bad flag or key directory."""
    key_dir: Path = args.key_dir or settings_from_args(args).tokens.key_dir
    now = SystemClock().now()
    try:
        venue_pass = new_pass(
            participant_id=args.participant,
            training_id=args.training,
            session_id=args.session,
            scheduled_start=_when(args.start, "--start"),
            venue=args.venue,
            gate=Gate(args.gate.upper()),
            expires_at=None if args.expires is None else _when(args.expires, "--expires"),
            now=now,
        )
        key = load_key_ring(key_dir).signing_key(now)
    except (ValueError, KeyDirectoryError, NoSigningKeyError) as exc:
        print(f"facesvc: {exc}", file=sys.stderr)
        return 2
    text, png = issue_pass_png(venue_pass, key)
    args.out.write_bytes(png)
    line = {
        "pass_id": venue_pass.pass_id,
        "expires_at": venue_pass.expires_at.isoformat(),
        "out": str(args.out),
    }
    if args.print_pass:
        line["pass"] = text
    print(json.dumps(line))
    return 0


def cli_passes_jwks(args: argparse.Namespace) -> int:
    """Print the JWKS of the keys published now in the key directory: the file a kiosk
    takes as ``--pass-keys`` when passes are not checked against GetSigningKeys."""
    key_dir: Path = args.key_dir or settings_from_args(args).tokens.key_dir
    try:
        keys = load_key_ring(key_dir).public_keys(SystemClock().now())
    except KeyDirectoryError as exc:
        print(f"facesvc: {exc}", file=sys.stderr)
        return 2
    print(keys.to_json())
    return 0
