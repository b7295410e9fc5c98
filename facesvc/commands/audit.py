"""``facesvc audit tail``: the newest events of the audit trail."""

from __future__ import annotations

import argparse
import asyncio
import sys

from facesvc.commands.arguments import settings_from_args
from facesvc.store.audit import AuditLog
from facesvc.store.connection import redis_from_settings


def cli_audit_tail(args: argparse.Namespace) -> int:
    """Print the newest ``-n`` audit events, one ``id key=value ...`` line each, oldest
    first; with ``--follow`` keep polling for newer ones until interrupted."""
    settings = settings_from_args(args)

    async def run() -> int:
        client = redis_from_settings(settings.redis)
        audit = AuditLog(client, key_prefix=settings.redis.key_prefix)
        seen = ""
        try:
            while True:
                for entry_id, fields in await audit.tail(args.n):
                    if _stream_id(entry_id) > _stream_id(seen):
                        print(entry_id, " ".join(f"{k}={v}" for k, v in fields.items()))
                        seen = entry_id
                if not args.follow:
                    return 0
                sys.stdout.flush()
                await asyncio.sleep(1.0)
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0


def _stream_id(entry_id: str) -> tuple[int, int]:
    """A Redis stream id ``<ms>-<seq>`` as a sortable pair ("" sorts first)."""
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq)) if ms else (-1, -1)
