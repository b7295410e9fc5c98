"""Encrypted templates against a real Redis server: secrecy, binding, rotation, deletion."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import redis.asyncio as aioredis

from facesvc.clock import SystemClock
from facesvc.commands.cli import main as facesvc_cli
from facesvc.config import ConfigError, LimitsSettings, TemplatesSettings
from facesvc.domain import TrainingType
from facesvc.limits.caps import AttemptCaps, IdempotentScan, cap_rules
from facesvc.store.connection import redis_client_from_url
from facesvc.store.errors import StoreUnavailable
from facesvc.store.keys import KeySpace
from facesvc.store.templates import (
    AlreadyEnrolled,
    Template,
    TemplateKeyRing,
    TemplateStore,
    TemplateUnreadable,
    generate_template_key,
    keyring_from_settings,
)
from tests.clocks import wib_at
from tools.redis_local import free_port

pytestmark = pytest.mark.calendar

CREATED = wib_at(16, 30)

Scenario = Callable[[aioredis.Redis, str], Awaitable[None]]


def run(scenario: Scenario, url: str, prefix: str) -> None:
    """Run ``scenario`` with a client on ``prefix`` (the ``redis_prefix`` fixture cleans it)."""

    async def main() -> None:
        client = redis_client_from_url(url, socket_timeout_s=2.0)
        assert isinstance(client, aioredis.Redis)
        try:
            await scenario(client, prefix)
        finally:
            await client.aclose()

    asyncio.run(main())


def ring(*kids: str, active: str | None = None) -> TemplateKeyRing:
    return TemplateKeyRing.parse("\n".join(generate_template_key(kid) for kid in kids), active)


def descriptors(seed: int, rows: int = 3, dim: int = 128) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def template(pid: str, seed: int = 1, pack: str = "dlib-resnet-v1") -> Template:
    return Template(pid, pack, descriptors(seed), CREATED, image_count=3)


def test_round_trip_keeps_every_descriptor(redis_url: str, redis_prefix: str) -> None:
    async def scenario(client: aioredis.Redis, prefix: str) -> None:
        store = TemplateStore(client, ring("k1"), key_prefix=prefix)
        original = template("p1")
        meta = await store.put(original, replace=False)
        assert (meta.descriptor_count, meta.descriptor_dim, meta.key_id) == (3, 128, "k1")
        loaded = await store.get("p1")
        assert loaded is not None
        assert loaded.descriptors.dtype == np.float32
        assert np.array_equal(loaded.descriptors, original.descriptors)
        assert (loaded.participant_id, loaded.model_pack) == ("p1", "dlib-resnet-v1")
        assert (loaded.created_at, loaded.image_count) == (CREATED, 3)
        assert await store.metadata("p1") == meta
        assert await store.get("p2") is None
        assert await store.metadata("p2") is None

    run(scenario, redis_url, redis_prefix)


def test_raw_value_holds_no_descriptor_bytes(redis_url: str, redis_prefix: str) -> None:
    async def scenario(client: aioredis.Redis, prefix: str) -> None:
        store = TemplateStore(client, ring("k1"), key_prefix=prefix)
        original = template("p1", pack="secret-pack-name")
        await store.put(original, replace=False)
        raw = await client.get(KeySpace(prefix).template("p1"))
        assert isinstance(raw, bytes)
        needles = [original.descriptors.tobytes()]
        for row in original.descriptors:
            needles += [row.tobytes(), row.tobytes()[:16], row.astype(">f4").tobytes()[:16]]
        needles += [base64.b64encode(n) for n in list(needles)]
        needles += [b"secret-pack-name", repr(float(original.descriptors[0, 0])).encode()[:8]]
        for needle in needles:
            assert needle not in raw

    run(scenario, redis_url, redis_prefix)


def test_tampered_value_fails_to_decrypt(redis_url: str, redis_prefix: str) -> None:
    async def scenario(client: aioredis.Redis, prefix: str) -> None:
        store = TemplateStore(client, ring("k1"), key_prefix=prefix)
        await store.put(template("p1"), replace=False)
        key = KeySpace(prefix).template("p1")
        raw = await client.get(key)
        assert isinstance(raw, bytes)
        for position in (len(raw) - 1, len(raw) // 2, 12):  # tag, ciphertext, nonce
            flipped = bytearray(raw)
            flipped[position] ^= 0x01
            await client.set(key, bytes(flipped))
            with pytest.raises(TemplateUnreadable, match="failed authentication"):
                await store.get("p1")
        await client.set(key, b"not a template")
        with pytest.raises(TemplateUnreadable, match="format"):
            await store.get("p1")

    run(scenario, redis_url, redis_prefix)


def test_value_moved_to_another_participant_fails_to_decrypt(
    redis_url: str, redis_prefix: str
) -> None:
    async def scenario(client: aioredis.Redis, prefix: str) -> None:
        store = TemplateStore(client, ring("k1"), key_prefix=prefix)
        await store.put(template("victim"), replace=False)
        raw = await client.get(KeySpace(prefix).template("victim"))
        assert isinstance(raw, bytes)
        await client.set(KeySpace(prefix).template("attacker"), raw)
        with pytest.raises(TemplateUnreadable, match="another participant"):
            await store.get("attacker")

    run(scenario, redis_url, redis_prefix)


def test_replace_semantics(redis_url: str, redis_prefix: str) -> None:
    async def scenario(client: aioredis.Redis, prefix: str) -> None:
        store = TemplateStore(client, ring("k1"), key_prefix=prefix)
        await store.put(template("p1", seed=1), replace=False)
        with pytest.raises(AlreadyEnrolled, match="already enrolled"):
            await store.put(template("p1", seed=2), replace=False)
        loaded = await store.get("p1")
        assert loaded is not None and np.array_equal(loaded.descriptors, descriptors(1))
        later = dataclasses.replace(template("p1", seed=2), created_at=CREATED + timedelta(days=3))
        replaced = await store.put(later, replace=True)
        loaded = await store.get("p1")
        assert loaded is not None and np.array_equal(loaded.descriptors, descriptors(2))
        # A replace is an update: the first enrollment's time stays.
        assert (replaced.enrolled_at, replaced.created_at) == (CREATED, later.created_at)
        meta = await store.metadata("p1")
        assert meta is not None and (meta.enrolled_at, meta.created_at) == (
            CREATED,
            later.created_at,
        )

    run(scenario, redis_url, redis_prefix)


def test_rekey_moves_every_template_to_the_active_key(redis_url: str, redis_prefix: str) -> None:
    async def scenario(client: aioredis.Redis, prefix: str) -> None:
        line_k1, line_k2 = generate_template_key("k1"), generate_template_key("k2")
        old = TemplateStore(client, TemplateKeyRing.parse(line_k1), key_prefix=prefix)
        for seed, pid in enumerate(("p1", "p2", "p3")):
            await old.put(template(pid, seed=seed), replace=False)
        # The same k1 plus a new k2, made active by being the last line.
        new = TemplateStore(
            client, TemplateKeyRing.parse(f"{line_k1}\n{line_k2}"), key_prefix=prefix
        )
        meta = await new.metadata("p1")
        assert meta is not None and meta.key_id == "k1"  # old values read before the rekey
        await new.put(template("p4"), replace=False)  # new writes use the active key

        result = await new.rekey_all()
        assert (result.rekeyed, result.current, result.unreadable) == (3, 1, ())
        for pid in ("p1", "p2", "p3", "p4"):
            meta = await new.metadata(pid)
            assert meta is not None and meta.key_id == "k2"
        # The old key is no longer needed ...
        only_new = TemplateStore(client, TemplateKeyRing.parse(line_k2), key_prefix=prefix)
        loaded = await only_new.get("p1")
        assert loaded is not None and np.array_equal(loaded.descriptors, descriptors(0))
        # ... and a store holding only the old key cannot read the new values.
        with pytest.raises(TemplateUnreadable, match="'k2'"):
            await old.get("p1")
        assert (await new.rekey_all()).rekeyed == 0

        # A template under a key the ring lacks is reported and left alone.
        stranger = TemplateStore(client, ring("k9"), key_prefix=prefix)
        await stranger.put(template("p9"), replace=False)
        result = await new.rekey_all()
        assert (result.rekeyed, result.current, result.unreadable) == (0, 4, ("p9",))

    run(scenario, redis_url, redis_prefix)


def test_cli_rekey(redis_url: str, redis_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    old_line, new_line = generate_template_key("old"), generate_template_key("new")

    async def enroll(client: aioredis.Redis, prefix: str) -> None:
        store = TemplateStore(client, TemplateKeyRing.parse(old_line), key_prefix=prefix)
        await store.put(template("p1"), replace=False)

    run(enroll, redis_url, redis_prefix)
    flags = ["--redis-url", redis_url, "--redis-key-prefix", redis_prefix]
    keys = ["--templates-key", f"{old_line},{new_line}"]
    assert facesvc_cli(["templates", *flags, *keys, "rekey"]) == 0
    assert "re-encrypted 1 template(s) under key new" in capsys.readouterr().out

    async def check(client: aioredis.Redis, prefix: str) -> None:
        store = TemplateStore(client, TemplateKeyRing.parse(new_line), key_prefix=prefix)
        meta = await store.metadata("p1")
        assert meta is not None and meta.key_id == "new"

    run(check, redis_url, redis_prefix)


def test_delete_removes_every_key_of_that_participant_only(
    redis_url: str, redis_prefix: str
) -> None:
    async def scenario(client: aioredis.Redis, prefix: str) -> None:
        store = TemplateStore(client, ring("k1"), key_prefix=prefix)
        caps = AttemptCaps(client, cap_rules(LimitsSettings()), key_prefix=prefix)
        now = SystemClock().now()
        for pid in ("p1", "p10", "p2"):
            await store.put(template(pid), replace=False)
            await caps.reserve(
                pid, "t1", TrainingType.SPL, now, idempotent=IdempotentScan("k", "test", "request")
            )
            await client.set(f"{KeySpace(prefix).participant(pid)}:challenge:abc", b"x")
        assert await store.delete("p1") is True
        left = sorted([key async for key in client.scan_iter(match=f"{prefix}*")])
        assert left and not any("{p:p1}" in key.decode() for key in left)
        # template, attempt counter, idempotency record and its lease, challenge
        assert sum("{p:p10}" in key.decode() for key in left) == 5
        assert sum("{p:p2}" in key.decode() for key in left) == 5
        assert await store.get("p1") is None
        assert (await caps.usage("p1", "t1", TrainingType.SPL, now)).used == 0
        assert await store.delete("p1") is False
        assert await store.get("p10") is not None

    run(scenario, redis_url, redis_prefix)


def test_prefix_with_or_without_trailing_colon_names_the_same_keys(
    redis_url: str, redis_prefix: str
) -> None:
    async def scenario(client: aioredis.Redis, prefix: str) -> None:
        keys = ring("k1")
        bare = prefix.removesuffix(":")
        await TemplateStore(client, keys, key_prefix=prefix).put(template("p1"), replace=False)
        assert await TemplateStore(client, keys, key_prefix=bare).get("p1") is not None
        assert await client.exists(f"{bare}:{{p:p1}}:template") == 1

    run(scenario, redis_url, redis_prefix)


def test_malformed_templates_are_refused(redis_url: str, redis_prefix: str) -> None:
    async def scenario(client: aioredis.Redis, prefix: str) -> None:
        store = TemplateStore(client, ring("k1"), key_prefix=prefix)
        bad = [
            Template("p1", "pack", descriptors(1)[0], CREATED, 1),  # 1-D
            Template("p1", "pack", np.full((2, 4), np.nan, np.float32), CREATED, 1),
            Template("p1", "", descriptors(1), CREATED, 1),
            Template("p1", "pack", descriptors(1), CREATED, 0),
            Template("p1", "pack", descriptors(1), CREATED.replace(tzinfo=None), 1),
            Template("p}1", "pack", descriptors(1), CREATED, 1),
        ]
        for item in bad:
            with pytest.raises(ValueError):
                await store.put(item, replace=True)
        assert await store.get("p1") is None

    run(scenario, redis_url, redis_prefix)


def test_key_ring_parsing(tmp_path: Path) -> None:
    a, b = generate_template_key("2026-01"), generate_template_key("2026-07")
    path = tmp_path / "template-keys"
    path.write_text(f"# rotated 2026-07\n{a}\n\n{b}  # current\n")
    from_file = keyring_from_settings(TemplatesSettings(key_file=path))
    assert from_file.active_kid == "2026-07"  # the last line
    chosen = keyring_from_settings(TemplatesSettings(key_file=path, active_kid="2026-01"))
    assert chosen.active_kid == "2026-01"
    inline = keyring_from_settings(TemplatesSettings(key=f"{a},{b}", key_file=tmp_path / "none"))
    assert inline.kids == ("2026-01", "2026-07")
    with pytest.raises(ConfigError, match=r"templates\.key_file"):
        keyring_from_settings(TemplatesSettings(key_file=tmp_path / "missing"))
    with pytest.raises(ValueError, match="not in the key ring"):
        TemplateKeyRing.parse(a, "other")
    with pytest.raises(ValueError, match="32 bytes"):
        TemplateKeyRing.parse("k:" + base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="base64"):
        TemplateKeyRing.parse("k:!!!")
    with pytest.raises(ValueError, match="twice"):
        TemplateKeyRing.parse(f"{a}\n{a}")
    with pytest.raises(ValueError, match="no template keys"):
        TemplateKeyRing.parse("# nothing\n")
    with pytest.raises(ValueError, match="key id"):
        generate_template_key("bad kid")


def test_redis_down_raises_store_unavailable() -> None:
    async def main() -> None:
        client = redis_client_from_url(f"redis://127.0.0.1:{free_port()}/0")
        store = TemplateStore(client, ring("k1"), key_prefix="test-tpl-down")
        try:
            with pytest.raises(StoreUnavailable, match="read a template"):
                await store.get("p1")
            with pytest.raises(StoreUnavailable):
                await store.put(template("p1"), replace=True)
            with pytest.raises(StoreUnavailable):
                await store.delete("p1")
        finally:
            await client.aclose()

    asyncio.run(main())


def test_keygen_after_removing_an_old_key_adds_a_new_kid(tmp_path: Path) -> None:
    # Rotation: k1 and k2 in the file, templates rekeyed to k2, k1 removed. The next
    # keygen used to number keys by counting lines and wrote a second k2, and the service
    # then refused to start ("appears twice").
    key_file = tmp_path / "templates.key"
    args = ["templates", "--templates-key-file", str(key_file), "keygen"]
    assert facesvc_cli(args) == 0
    assert facesvc_cli(args) == 0
    assert TemplateKeyRing.parse(key_file.read_text()).kids == ("k1", "k2")
    key_file.write_text(key_file.read_text().splitlines()[1] + "\n")
    assert facesvc_cli(args) == 0
    ring = keyring_from_settings(TemplatesSettings(key_file=key_file))
    assert ring.kids == ("k2", "k3")
    assert ring.active_kid == "k3"


def test_keygen_refuses_to_append_to_a_file_the_service_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "templates.key"
    key_file.write_text("k1:not base64!\n")
    assert facesvc_cli(["templates", "--templates-key-file", str(key_file), "keygen"]) == 2
    assert "fix the file before adding a key" in capsys.readouterr().err
    assert key_file.read_text() == "k1:not base64!\n"
