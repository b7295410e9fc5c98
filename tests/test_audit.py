"""The audit trail through the real server and engine: one event per enrollment, deletion,
verification decision and redemption, attributed to the authenticated caller, and no
biometric data in the raw stream; ``facesvc audit tail`` prints it."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc.commands import cli
from facesvc.store.audit import AuditEvent, AuditLog
from facesvc.store.connection import redis_client_from_url
from facesvc.store.keys import KeySpace
from facesvc.store.templates import TemplateStore, keyring_from_settings
from facesvc.transport.auth import Client, Role, new_api_key, write_keys_file
from tests.conftest import RunningServer, ServerStarter
from tests.engine_support import astronaut, jpeg
from tests.test_service_verify import PID, enroll, genuine, impostor, start, verify

pytestmark = pytest.mark.calendar

AUDIT_FIELDS = {f for f in AuditEvent.__dataclass_fields__ if f != "timings_ms"} | {"ts"}


def _stream(server: RunningServer) -> list[dict[bytes, bytes]]:
    stream = KeySpace(server.app.settings.redis.key_prefix).audit_stream()
    with redis.Redis.from_url(server.app.settings.redis.url) as client:
        return [fields for _, fields in client.xrange(stream)]


def _descriptors(server: RunningServer) -> np.ndarray:
    """The enrolled template's descriptors, read and decrypted the way the service does."""
    settings = server.app.settings

    async def read() -> np.ndarray:
        client = redis_client_from_url(settings.redis.url)
        try:
            store = TemplateStore(
                client,
                keyring_from_settings(settings.templates),
                key_prefix=settings.redis.key_prefix,
            )
            template = await store.get(PID)
            assert template is not None
            return np.asarray(template.descriptors, dtype=np.float32)
        finally:
            await client.aclose()

    return asyncio.run(read())


@pytest.fixture
def audited(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> tuple[RunningServer, str]:
    """A server with keys: the LMS gate verifies and redeems, the operator enrolls."""
    admin_key, admin_id, admin_hash = new_api_key()
    lms_key, lms_id, lms_hash = new_api_key()
    keys = tmp_path / "keys.json"
    write_keys_file(
        keys,
        [
            Client("ops", Role.ADMIN, "programme", admin_id, admin_hash),
            Client("lms-a-gate", Role.LMS, "lms-a", lms_id, lms_hash),
        ],
    )
    server = start(start_server, redis_url, tmp_path, security__api_keys_file=str(keys))
    return server, f"{admin_key} {lms_key}"


class _Keyed:
    """A stub whose calls carry an API key."""

    def __init__(self, stub: object, key: str) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {key}"),)

    def __getattr__(self, rpc: str) -> object:
        method = getattr(self._stub, rpc)
        return lambda request, **kw: method(request, metadata=self._metadata, **kw)


def as_caller(server: RunningServer, key: str) -> RunningServer:
    """``server`` seen by the holder of ``key`` (test_service_verify's helpers use .stub)."""
    return dataclasses.replace(server, stub=_Keyed(server.stub, key))  # type: ignore[arg-type]


def test_one_event_per_decision_and_no_biometric_data(
    audited: tuple[RunningServer, str], capsys: pytest.CaptureFixture[str]
) -> None:
    server, keys = audited
    admin_key, lms_key = keys.split()
    admin, lms = as_caller(server, admin_key), as_caller(server, lms_key)
    assert enroll(admin).enrolled

    decisions = [verify(lms, genuine()), verify(lms, impostor())]
    with pytest.raises(grpc.RpcError) as bad:
        verify(lms, b"not an image")  # malformed: no decision, so no event
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    token = decisions[0].token
    redeem = pb.RedeemTokenRequest(
        token=token,
        expected_gate=pb.GATE_SESSION,
        expected_session_id="s1",
        audience="lms-a",
        expected_participant_id=PID,
    )
    redemptions = [lms.stub.RedeemToken(redeem, timeout=10) for _ in range(2)]
    assert [r.valid for r in redemptions] == [True, False]
    descriptors = _descriptors(server)
    admin.stub.DeleteEnrollment(pb.DeleteEnrollmentRequest(participant_id=PID), timeout=10)

    events = [{k.decode(): v.decode() for k, v in e.items()} for e in _stream(server)]
    actions = [(e["action"], e["outcome"], e["caller"]) for e in events]
    decided = [pb.Decision.Name(d.decision).removeprefix("DECISION_") for d in decisions]
    assert decided[0] == "VERIFIED"
    assert actions == [
        ("enroll", "ok", "ops"),
        ("verify", decided[0], "lms-a-gate"),
        ("verify", decided[1], "lms-a-gate"),
        ("redeem", "OK", "lms-a-gate"),
        ("redeem", "ALREADY_USED", "lms-a-gate"),
        ("delete", "deleted", "ops"),
    ]
    verifies = [e for e in events if e["action"] == "verify"]
    assert [e["verification_id"] for e in verifies] == [d.verification_id for d in decisions]
    assert all(e["tenant"] == "lms-a" and e["participant_id"] == PID for e in verifies)
    assert all(float(e["t_total"]) > 0 for e in verifies)  # timings are recorded

    # No biometric data: only the event's own fields, short values, and none of the
    # photos' bytes or the template's descriptors in any encoding.
    raw = [value for event in _stream(server) for value in event.values()]
    for event in events:
        assert set(event) - AUDIT_FIELDS <= {k for k in event if k.startswith("t_")}
    assert max(len(value) for value in raw) < 300
    blobs = [jpeg(astronaut()), genuine(), impostor()]
    needles: list[bytes] = []
    for blob in blobs:
        needles += [blob[i : i + 24] for i in range(0, len(blob) - 24, max(1, len(blob) // 50))]
        needles.append(base64.b64encode(blob)[:32])
    for row in descriptors:
        needles += [row.tobytes()[:16], base64.b64encode(row.tobytes())[:24]]
        needles += [f"{row[0]:.4f}".encode(), f"{row[1]:.4f}".encode()]
    control = b"".join(blobs) + descriptors.tobytes()
    assert sum(n in control for n in needles) > len(blobs)  # the search can find bytes
    joined = b"\n".join(raw)
    found = [n for n in needles if len(n) >= 6 and n in joined]
    assert not found, f"biometric bytes in the audit stream: {found[:3]}"

    # facesvc audit tail prints the same events, oldest first.
    settings = server.app.settings
    argv = ["audit", "--redis-url", settings.redis.url, "--redis-key-prefix"]
    assert cli.main([*argv, settings.redis.key_prefix, "tail", "-n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert "action=redeem" in lines[0] and "outcome=OK" in lines[0]
    assert "action=delete" in lines[2] and "caller=ops" in lines[2]


async def test_events_are_kept_by_age_not_by_count(redis_url: str, redis_prefix: str) -> None:
    # A count cap let one client push the whole trail out with cheap calls; by age, an
    # event stays for the retention however many come after it, and older ones go.
    client = redis_client_from_url(redis_url)
    stream = KeySpace(redis_prefix).audit_stream()
    try:
        seconds, micros = await client.time()  # Redis's clock: the one stream ids follow
        now_ms = seconds * 1000 + micros // 1000
        day_ms = 24 * 3600 * 1000
        for age_days in (9, 8, 1):
            await client.xadd(
                stream, {"action": f"{age_days}d"}, id=f"{now_ms - age_days * day_ms}-0"
            )
        audit = AuditLog(client, key_prefix=redis_prefix, retention=timedelta(days=7))
        event = AuditEvent("verify", "lms-a-gate", "lms-a", "p-1", "NO_FACE")
        for _ in range(50):
            await audit.append(event)
        rows = await client.xrange(stream)
        actions = [fields[b"action"] for _, fields in rows]
        assert actions == [b"1d"] + [b"verify"] * 50  # 8 and 9 days old: trimmed
        ((_, newest),) = await audit.tail(1)
        assert newest["outcome"] == "NO_FACE"
    finally:
        await client.aclose()


def test_retention_must_be_positive() -> None:
    with pytest.raises(ValueError, match="retention"):
        AuditLog(object(), retention=timedelta(0))
