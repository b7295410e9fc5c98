"""``facesvc keys rotate`` keeps the old key published until everything it signed has expired,
launch tickets included (issue 18.7: retired about 130 s after the switch, while a scan
link lives ``portal.ticket_ttl_s``, 600 s)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from facesvc.clock import FixedClock
from facesvc.commands import cli
from facesvc.config import PortalSettings, TokensSettings
from facesvc.store.connection import redis_client_from_url
from facesvc.tokens.keys import KeyDirectory, keys_list
from facesvc.tokens.launch import LaunchTickets
from tests.test_gateway import RETURN, scope

pytestmark = pytest.mark.calendar


async def test_a_scan_link_signed_just_before_the_switch_opens_until_it_expires(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    key_dir = tmp_path / "token-keys"
    assert cli.main(["keys", "--tokens-key-dir", str(key_dir), "generate"]) == 0
    assert cli.main(["keys", "--tokens-key-dir", str(key_dir), "rotate"]) == 0
    old, new = keys_list(key_dir)
    switch = new.record.activate_after
    assert old.record.retire_after is not None
    ticket_ttl_s = PortalSettings().ticket_ttl_s
    leeway_s = TokensSettings().leeway_s
    assert old.record.retire_after - switch >= timedelta(seconds=ticket_ttl_s + leeway_s)

    # The page's launch tickets, signed and checked with those keys on a clock that walks
    # through the switch.
    clock = FixedClock(switch - timedelta(seconds=1))
    redis = redis_client_from_url(redis_url)
    tickets = LaunchTickets(
        KeyDirectory(key_dir, reload_s=0.01, clock=clock),
        redis,
        issuer=TokensSettings().issuer,
        allowed_prefixes=lambda tenant: (RETURN,),
        ttl_s=ticket_ttl_s,
        key_prefix=redis_prefix,
        clock=clock,
    )
    try:
        ticket = tickets.issue(scope())
        assert ticket.token.count(".") == 2
        clock.advance(timedelta(seconds=ticket_ttl_s - 5))  # the link is still valid...
        opened = tickets.open(ticket.token)  # ...and its key still published
        assert opened.ticket_id == ticket.ticket_id
    finally:
        await redis.aclose()
