"""``facesvc templates keygen | rekey``: template encryption keys and their rotation."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from facesvc.commands.arguments import settings_from_args
from facesvc.config import Settings
from facesvc.store.connection import redis_from_settings
from facesvc.store.errors import StoreUnavailable
from facesvc.store.templates import (
    TemplateKeyRing,
    TemplateStore,
    generate_template_key,
    keyring_from_settings,
    next_template_kid,
)


def cli_keygen(args: argparse.Namespace) -> int:
    """``facesvc templates keygen``: append a new key to ``templates.key_file`` (created with
    mode 0600) and print its id. The newest entry encrypts new templates unless
    ``templates.active_kid`` says otherwise; run ``templates rekey`` to move old ones."""
    path = settings_from_args(args).templates.key_file
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = path.read_text(encoding="ascii") if path.exists() else ""
    try:
        kids = TemplateKeyRing.parse(existing).kids if existing.strip() else ()
    except ValueError as exc:
        # Appending to a file the service cannot read would only hide the problem.
        print(f"facesvc: {path}: {exc}; fix the file before adding a key", file=sys.stderr)
        return 2
    kid = next_template_kid(kids)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (generate_template_key(kid) + "\n").encode())
    finally:
        os.close(fd)
    print(f"added template key {kid} to {path}")
    return 0


def cli_rekey(args: argparse.Namespace) -> int:
    """``facesvc templates rekey``: re-encrypt every template under the active key.

    Exit 0 when every template is under the active key afterwards, 1 when some could not
    be read (listed on stderr) or Redis is unavailable.
    """
    return asyncio.run(_rekey(settings_from_args(args)))


async def _rekey(settings: Settings) -> int:
    keyring = keyring_from_settings(settings.templates)
    client = redis_from_settings(settings.redis)
    try:
        store = TemplateStore(client, keyring, key_prefix=settings.redis.key_prefix)
        result = await store.rekey_all()
    except StoreUnavailable as exc:
        print(f"facesvc templates rekey: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()
    print(
        f"re-encrypted {result.rekeyed} template(s) under key {keyring.active_kid}; "
        f"{result.current} already used it"
    )
    if result.unreadable:
        print(
            f"{len(result.unreadable)} template(s) could not be read (their key is not in the "
            f"ring, or the value was altered); re-enroll: {', '.join(result.unreadable)}",
            file=sys.stderr,
        )
        return 1
    return 0
