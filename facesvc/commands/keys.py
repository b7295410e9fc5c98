"""Handlers of ``facesvc keys generate | rotate | list`` (registered in ``facesvc.commands.cli``).

Each reads the settings (``tokens.key_dir``, ``tokens.ttl_s``...) from the usual flags, env and
file, acts on the key directory and prints one line per key: kid, live state, signing period.
Nothing printed is secret: private keys stay in their 0600 files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from facesvc.commands.arguments import settings_from_args
from facesvc.config import Settings
from facesvc.tokens.keys import (
    KeyDirectoryError,
    KeyStatus,
    keys_generate,
    keys_list,
    keys_rotate,
)


def _print(rows: list[KeyStatus]) -> None:
    print(f"{'kid':<44} {'state':<8} {'signing':<8} {'activate_after':<21} retire_after")
    for row in rows:
        record = row.record
        retire = "-" if record.retire_after is None else f"{record.retire_after:%Y-%m-%dT%H:%M:%SZ}"
        print(
            f"{record.kid:<44} {row.state.value:<8} {'yes' if row.signing else 'no':<8} "
            f"{record.activate_after:%Y-%m-%dT%H:%M:%SZ}  {retire}"
        )


def _operator_errors(action: Callable[[], None]) -> int:
    """Run ``action``; a key-directory problem is the operator's to fix: say it, exit 2."""
    try:
        action()
    except KeyDirectoryError as exc:
        print(f"facesvc: {exc}", file=sys.stderr)
        return 2
    return 0


def cli_keys_generate(args: argparse.Namespace) -> int:
    """Create the first signing key in ``tokens.key_dir``."""
    settings = settings_from_args(args).tokens
    return _operator_errors(lambda: _print([keys_generate(settings.key_dir)]))


def longest_signed_life_s(settings: Settings) -> int:
    """Seconds the longest-lived thing the token keys sign stays valid: gate tokens
    (``tokens.ttl_s``) and the Scan Wajah page's launch tickets (``portal.ticket_ttl_s``).

    A rotation keeps the old key published this long after its last signature. Retiring it
    after the token lifetime alone (130 s by default) broke every scan link issued in the
    last minutes before a switch, which live 600 s. Venue passes printed ahead are out of
    reach of any retirement rule: sign them with a key directory of their own
    (``facesvc passes issue --key-dir``)."""
    return max(settings.tokens.ttl_s, settings.portal.ticket_ttl_s)


def cli_keys_rotate(args: argparse.Namespace) -> int:
    """Publish a new key now; it signs after ``tokens.publish_delay_s``, and the keys before
    it retire once everything they signed has expired (:func:`longest_signed_life_s`)."""
    full = settings_from_args(args)
    settings = full.tokens

    def rotate() -> None:
        new = keys_rotate(
            settings.key_dir,
            publish_delay_s=settings.publish_delay_s,
            token_ttl_s=longest_signed_life_s(full),
            leeway_s=settings.leeway_s,
        )
        print(
            f"new key {new.record.kid} is published now and signs from "
            f"{new.record.activate_after:%Y-%m-%dT%H:%M:%SZ}",
            file=sys.stderr,
        )
        _print(keys_list(settings.key_dir))

    return _operator_errors(rotate)


def cli_keys_list(args: argparse.Namespace) -> int:
    """List the keys in ``tokens.key_dir`` with their live state."""
    key_dir = settings_from_args(args).tokens.key_dir
    return _operator_errors(lambda: _print(keys_list(key_dir)))
