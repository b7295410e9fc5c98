"""Verification tokens: forgery, binding, expiry, one-time redemption (real Redis) and rotation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import pickle
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facesvc.clock import FixedClock
from facesvc.domain import Gate, LivenessMethod, TrainingType
from facesvc.store.errors import StoreUnavailable
from facesvc.tokens import (
    CheckPolicy,
    CheckReason,
    Expectation,
    IssuedToken,
    KeyDirectory,
    KeyDirectoryError,
    KeyState,
    NoSigningKeyError,
    PublicKeySet,
    TokenIssuer,
    TokenRedeemer,
    check_token,
    keys_generate,
    keys_list,
    keys_rotate,
    load_key_ring,
)
from facesvc.tokens.claims import reason_of
from facesvc.tokens.jws import TOKEN_TYPE, b64url_decode, b64url_encode
from facesvc.tokens.launch import TicketProblem, ticket_problem
from facesvc.tokens.passes import PassProblem, pass_problem
from facesvc.tokens.signed import Problem
from tests.clocks import wib_at

pytestmark = pytest.mark.calendar

ISSUER = "https://facesvc.test"
POLICY = CheckPolicy(issuer=ISSUER, leeway_s=10)
T0 = wib_at(16)
EXPECTED = Expectation(
    audience="lms-a", gate=Gate.SESSION, session_id="s-7", training_id="tr-1", participant_id="p-42"
)


def issue(issuer: TokenIssuer, **overrides: Any) -> IssuedToken:
    """A token that matches EXPECTED unless ``overrides`` change a binding."""
    fields: dict[str, Any] = {
        "participant_id": "p-42",
        "audience": "lms-a",
        "training_id": "tr-1",
        "training_type": TrainingType.WEBINAR,
        "gate": Gate.SESSION,
        "session_id": "s-7",
        "liveness": LivenessMethod.CHALLENGE,
        "model_pack": "dlib-default",
        "verification_id": "v-1",
    }
    fields.update(overrides)
    return issuer.issue(**fields)


class Keys:
    """A key directory with one active key, its issuer and a clock the test moves."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.clock = FixedClock(T0)
        keys_generate(directory, now=T0)
        self.ring = load_key_ring(directory)
        self.issuer = TokenIssuer(self.ring, issuer=ISSUER, ttl_s=120, clock=self.clock)

    def check(
        self, token: str, expected: Expectation = EXPECTED, at: datetime | None = None
    ) -> CheckReason:
        """The reason ``check_token`` gives at ``at`` (default: the clock's now)."""
        now = at or self.clock.now()
        return check_token(token, self.ring.public_keys(now), expected, POLICY, now).reason


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def split(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(payload)), signature


def encode(header: dict[str, Any], payload: dict[str, Any], signature: str) -> str:
    parts = (json.dumps(header).encode(), json.dumps(payload).encode())
    return ".".join(b64url_encode(p) for p in parts) + "." + signature


def sign_raw(keys: Keys, header: bytes, payload: bytes) -> str:
    """Sign arbitrary header/payload bytes with the real key: tests strict parsing past the
    signature (what a compromised or buggy issuer could emit)."""
    signing_input = b64url_encode(header) + "." + b64url_encode(payload)
    key = keys.ring.signing_key(T0)
    return signing_input + "." + b64url_encode(key.private_key.sign(signing_input.encode()))


# --- the happy path and the claims ---------------------------------------------------------


def test_issued_token_verifies_and_carries_the_bindings_but_no_biometrics(keys: Keys) -> None:
    issued = issue(keys.issuer)
    header, claims, _ = split(issued.token)
    assert header == {"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": keys.ring.signing_key(T0).kid}
    assert set(claims) == {
        "iss", "sub", "aud", "iat", "nbf", "exp", "jti", "training_id", "training_type",
        "gate", "session_id", "liveness", "model_pack", "verification_id",
    }  # fmt: skip
    assert claims["sub"] == "p-42" and claims["gate"] == "SESSION"
    assert claims["exp"] - claims["iat"] == 120
    assert len(b64url_decode(claims["jti"])) == 16
    assert issued.jti == claims["jti"]
    assert issued.expires_at == T0 + timedelta(seconds=120)
    result = check_token(issued.token, keys.ring.public_keys(T0), EXPECTED, POLICY, T0)
    assert result.ok and result.claims is not None
    assert result.kid == header["kid"]
    assert result.claims.training_type is TrainingType.WEBINAR
    assert result.claims.liveness is LivenessMethod.CHALLENGE


def test_every_token_gets_a_fresh_jti(keys: Keys) -> None:
    assert issue(keys.issuer).jti != issue(keys.issuer).jti


# --- forgery -------------------------------------------------------------------------------


def test_tampered_payload_is_rejected(keys: Keys) -> None:
    header, claims, signature = split(issue(keys.issuer).token)
    claims["sub"] = "p-43"
    assert keys.check(encode(header, claims, signature)) is CheckReason.BAD_SIGNATURE


def test_tampered_signature_is_rejected(keys: Keys) -> None:
    token = issue(keys.issuer).token
    head, _, signature = token.rpartition(".")
    raw = bytearray(b64url_decode(signature))
    raw[5] ^= 0x01
    assert keys.check(head + "." + b64url_encode(bytes(raw))) is CheckReason.BAD_SIGNATURE


def test_alg_none_is_rejected(keys: Keys) -> None:
    header, claims, _ = split(issue(keys.issuer).token)
    for alg in ("none", "None", "NONE"):
        forged = encode({**header, "alg": alg}, claims, "")
        assert keys.check(forged) is CheckReason.BAD_SIGNATURE


def test_hs256_keyed_with_the_public_key_is_rejected(keys: Keys) -> None:
    """The algorithm-confusion attack: HMAC the token with the (public) verification key."""
    header, claims, _ = split(issue(keys.issuer).token)
    claims["sub"] = "p-43"
    public = keys.ring.signing_key(T0).private_key.public_key()
    secrets_an_attacker_has = [
        public.public_bytes(Encoding.Raw, PublicFormat.Raw),
        public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        keys.ring.public_keys(T0).to_json().encode(),
    ]
    for secret in secrets_an_attacker_has:
        for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
            h = b64url_encode(json.dumps({**header, "alg": alg}).encode())
            p = b64url_encode(json.dumps(claims).encode())
            mac = hmac.new(secret, f"{h}.{p}".encode(), digest).digest()
            assert keys.check(f"{h}.{p}.{b64url_encode(mac)}") is CheckReason.BAD_SIGNATURE


def test_other_asymmetric_algorithms_are_rejected_before_any_key_is_used(keys: Keys) -> None:
    header, claims, signature = split(issue(keys.issuer).token)
    for alg in ("RS256", "ES256", "Ed25519", "eddsa"):
        assert keys.check(encode({**header, "alg": alg}, claims, signature)) is (
            CheckReason.BAD_SIGNATURE
        )


@pytest.mark.parametrize(
    "change",
    [
        {"typ": "JWT"},
        {"typ": None},
        {"crit": ["exp"]},
        {"jku": "https://attacker.example/jwks.json"},
        {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}},
        {"kid": ""},
        {"kid": 7},
    ],
)
def test_header_other_than_ours_is_rejected_even_when_signed(
    keys: Keys, change: dict[str, Any]
) -> None:
    header, claims, _ = split(issue(keys.issuer).token)
    header.update(change)
    header = {k: v for k, v in header.items() if v is not None}
    token = sign_raw(keys, json.dumps(header).encode(), json.dumps(claims).encode())
    assert keys.check(token) is CheckReason.MALFORMED


def test_unknown_kid_is_rejected(keys: Keys) -> None:
    header, claims, _ = split(issue(keys.issuer).token)
    token = sign_raw(
        keys, json.dumps({**header, "kid": "other"}).encode(), json.dumps(claims).encode()
    )
    assert keys.check(token) is CheckReason.UNKNOWN_KEY


def test_malformed_encodings_are_rejected(keys: Keys) -> None:
    token = issue(keys.issuer).token
    h, p, s = token.split(".")
    for bad in (
        "",
        "a.b",
        f"{h}.{p}.{s}.x",
        f"{h}=.{p}.{s}",  # padding
        f"{h}.{p}.{s}+",  # standard, not url-safe, alphabet
        f"{h} .{p}.{s}",
        f"{h}.{p}é.{s}",
        b64url_encode(b"[" * 3000) + f".{p}.{s}",  # deep nesting must not blow the stack
        "x" * 5000,
    ):
        assert keys.check(bad) is CheckReason.MALFORMED, bad
    # The signature covers the payload's exact characters, so a respelled payload fails it.
    assert keys.check(f"{h}.{p}+.{s}") is CheckReason.BAD_SIGNATURE


def test_non_canonical_base64_signature_is_rejected(keys: Keys) -> None:
    # 64 bytes encode to 86 characters whose last one carries 4 unused bits; setting one of
    # them yields the same bytes under another spelling.
    h, p, s = issue(keys.issuer).token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet[alphabet.index(s[-1]) ^ 0x01]
    assert keys.check(f"{h}.{p}.{s[:-1]}{last}") is CheckReason.MALFORMED


def test_signed_but_sloppy_json_is_rejected(keys: Keys) -> None:
    header, claims, _ = split(issue(keys.issuer).token)
    header_bytes = json.dumps(header).encode()
    body = json.dumps(claims)
    duplicate = body[:-1] + ', "sub": "p-43"}'
    for payload in (
        duplicate,
        body.replace(f'"exp": {claims["exp"]}', '"exp": true'),
        body.replace(f'"exp": {claims["exp"]}', '"exp": NaN'),
        body.replace(f'"exp": {claims["exp"]}', f'"exp": {claims["exp"]}.5'),
        body.replace('"gate": "SESSION"', '"gate": "BACKSTAGE"'),
        body.replace('"aud": "lms-a"', '"aud": ["lms-a"]'),
        "[1, 2]",
        '{"sub": "p-42"}',
    ):
        assert keys.check(sign_raw(keys, header_bytes, payload.encode())) is (
            CheckReason.MALFORMED
        ), payload


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.text(max_size=700))
def test_any_string_gets_a_reason_never_an_exception(keys: Keys, garbage: str) -> None:
    assert keys.check(garbage) is not CheckReason.OK


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_no_single_character_change_keeps_a_token_valid(keys: Keys, data: st.DataObject) -> None:
    token = issue(keys.issuer).token
    at = data.draw(st.integers(0, len(token) - 1))
    new = data.draw(
        st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=")
    )
    mutated = token[:at] + new + token[at + 1 :]
    if mutated != token:
        assert keys.check(mutated) is not CheckReason.OK


# --- time and bindings ---------------------------------------------------------------------


def test_expired_token_is_rejected_after_the_leeway(keys: Keys) -> None:
    token = issue(keys.issuer).token
    exp = T0 + timedelta(seconds=120)
    assert keys.check(token, at=exp + timedelta(seconds=9)) is CheckReason.OK
    assert keys.check(token, at=exp + timedelta(seconds=10)) is CheckReason.EXPIRED
    assert keys.check(token, at=exp + timedelta(days=1)) is CheckReason.EXPIRED


def test_not_yet_valid_token_is_rejected(keys: Keys) -> None:
    token = issue(keys.issuer).token
    assert keys.check(token, at=T0 - timedelta(seconds=10)) is CheckReason.OK
    assert keys.check(token, at=T0 - timedelta(seconds=11)) is CheckReason.NOT_YET_VALID


@pytest.mark.parametrize(
    ("expected", "reason"),
    [
        (replace(EXPECTED, audience="lms-b"), CheckReason.WRONG_AUDIENCE),
        (replace(EXPECTED, gate=Gate.POST_TEST), CheckReason.WRONG_GATE),
        (replace(EXPECTED, session_id="s-8"), CheckReason.WRONG_SESSION),
        (replace(EXPECTED, session_id=""), CheckReason.WRONG_SESSION),
        (replace(EXPECTED, training_id="tr-2"), CheckReason.WRONG_TRAINING),
        (replace(EXPECTED, participant_id="p-43"), CheckReason.WRONG_PARTICIPANT),
        (replace(EXPECTED, participant_id=None, training_id=None), CheckReason.OK),
    ],
)
def test_token_for_another_gate_is_rejected(
    keys: Keys, expected: Expectation, reason: CheckReason
) -> None:
    assert keys.check(issue(keys.issuer).token, expected) is reason


def test_token_of_another_issuer_sharing_the_keys_is_rejected(keys: Keys) -> None:
    staging = TokenIssuer(keys.ring, issuer="https://staging.test", clock=keys.clock)
    assert keys.check(issue(staging).token) is CheckReason.WRONG_ISSUER


def test_issuer_refuses_ids_that_cannot_be_bound(keys: Keys) -> None:
    for overrides in ({"participant_id": "p{1}"}, {"training_id": ""}, {"audience": ""}):
        with pytest.raises(ValueError):
            issue(keys.issuer, **overrides)


# --- independent verification --------------------------------------------------------------


def test_tokens_verify_with_pyjwt_from_the_published_jwks_alone(keys: Keys) -> None:
    token = issue(keys.issuer).token
    jwks = json.loads(keys.ring.public_keys(T0).to_json())
    assert jwks["keys"][0].keys() == {"kty", "crv", "x", "kid", "use", "alg"}
    jwk_set = jwt.PyJWKSet.from_dict(jwks)
    header = jwt.get_unverified_header(token)
    assert header["typ"] == TOKEN_TYPE
    key = jwk_set[header["kid"]]
    claims = jwt.decode(
        token,
        key,
        algorithms=["EdDSA"],
        audience="lms-a",
        issuer=ISSUER,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims["sub"] == "p-42" and claims["session_id"] == "s-7"
    with pytest.raises(jwt.InvalidSignatureError):
        h, p, s = token.split(".")
        # A different character at position 10 (replacing an "A" with "A" would change nothing).
        flipped = "B" if s[10] == "A" else "A"
        tampered = f"{h}.{p}.{s[:10]}{flipped}{s[11:]}"
        jwt.decode(tampered, key, algorithms=["EdDSA"], audience="lms-a")


def test_jwks_round_trips_and_skips_foreign_keys(keys: Keys) -> None:
    published = keys.ring.public_keys(T0)
    doc = published.to_jwks()
    doc["keys"].append({"kty": "RSA", "kid": "rsa-1", "n": "AQAB", "e": "AQAB"})
    parsed = PublicKeySet.from_jwks(doc)
    assert list(parsed) == list(published)
    token = issue(keys.issuer).token
    assert check_token(token, parsed, EXPECTED, POLICY, T0).ok
    with pytest.raises(ValueError):
        PublicKeySet.from_jwks({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k", "x": "AAA"}]})


# --- redemption against a real Redis -------------------------------------------------------


Scenario = Callable[[TokenRedeemer, aioredis.Redis], Awaitable[None]]


def run_redemption(keys: Keys, redis_url: str, scenario: Scenario) -> None:
    """Run ``scenario`` with a redeemer on a unique key prefix, then delete its keys."""

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url)
        prefix = f"test-{uuid.uuid4().hex}"
        try:
            redeemer = TokenRedeemer(client, keys.ring, POLICY, key_prefix=prefix, clock=keys.clock)
            await scenario(redeemer, client)
        finally:
            found = [k async for k in client.scan_iter(match=f"{prefix}:*")]
            if found:
                await client.delete(*found)
            await client.aclose()

    asyncio.run(main())


def test_second_redemption_is_rejected(keys: Keys, redis_url: str) -> None:
    issued = issue(keys.issuer)

    async def scenario(redeemer: TokenRedeemer, client: aioredis.Redis) -> None:
        first = await redeemer.redeem(issued.token, EXPECTED)
        assert first.ok
        second = await redeemer.redeem(issued.token, EXPECTED)
        assert second.reason is CheckReason.ALREADY_USED
        # The mark lives exactly as long as the token could still pass the time check.
        ttl = await client.ttl(redeemer.used_key("p-42", issued.jti))
        assert 125 <= ttl <= 130

    run_redemption(keys, redis_url, scenario)


def test_a_refused_redemption_does_not_spend_the_token(keys: Keys, redis_url: str) -> None:
    issued = issue(keys.issuer)

    async def scenario(redeemer: TokenRedeemer, client: aioredis.Redis) -> None:
        wrong = await redeemer.redeem(issued.token, replace(EXPECTED, session_id="s-8"))
        assert wrong.reason is CheckReason.WRONG_SESSION
        assert (await redeemer.redeem(issued.token, EXPECTED)).ok

    run_redemption(keys, redis_url, scenario)


def test_racing_redemptions_admit_exactly_one(keys: Keys, redis_url: str) -> None:
    issued = issue(keys.issuer)

    async def scenario(redeemer: TokenRedeemer, client: aioredis.Redis) -> None:
        results = await asyncio.gather(
            *(redeemer.redeem(issued.token, EXPECTED) for _ in range(16))
        )
        reasons = [r.reason for r in results]
        assert reasons.count(CheckReason.OK) == 1
        assert reasons.count(CheckReason.ALREADY_USED) == 15

    run_redemption(keys, redis_url, scenario)


def test_racing_redemptions_from_separate_processes_admit_exactly_one(
    keys: Keys, redis_url: str
) -> None:
    """Threads with their own event loop and connection stand in for service replicas."""
    issued = issue(keys.issuer)
    prefix = f"test-{uuid.uuid4().hex}"
    start = threading.Barrier(6)
    reasons: list[CheckReason] = []

    def replica() -> None:
        async def main() -> None:
            client = aioredis.Redis.from_url(redis_url)
            try:
                redeemer = TokenRedeemer(
                    client, keys.ring, POLICY, key_prefix=prefix, clock=keys.clock
                )
                await client.ping()  # connect before the start line
                start.wait()
                reasons.append((await redeemer.redeem(issued.token, EXPECTED)).reason)
            finally:
                await client.aclose()

        asyncio.run(main())

    threads = [threading.Thread(target=replica) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def cleanup() -> None:
        client = aioredis.Redis.from_url(redis_url)
        found = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if found:
            await client.delete(*found)
        await client.aclose()

    asyncio.run(cleanup())
    assert sorted(r.value for r in reasons) == ["ALREADY_USED"] * 5 + ["OK"]


def test_redis_down_fails_closed(keys: Keys) -> None:
    issued = issue(keys.issuer)

    async def main() -> None:
        # Port 1 on localhost refuses connections.
        client = aioredis.Redis.from_url("redis://127.0.0.1:1")
        try:
            redeemer = TokenRedeemer(client, keys.ring, POLICY, clock=keys.clock)
            with pytest.raises(StoreUnavailable):
                await redeemer.redeem(issued.token, EXPECTED)
        finally:
            await client.aclose()

    asyncio.run(main())


# --- keys and rotation ---------------------------------------------------------------------


def test_key_files_are_private_and_named_by_thumbprint(keys: Keys) -> None:
    (status,) = keys_list(keys.dir, now=T0)
    pem = keys.dir / f"{status.record.kid}.pem"
    assert pem.stat().st_mode & 0o777 == 0o600
    assert status.state is KeyState.ACTIVE and status.signing and status.published
    with pytest.raises(KeyDirectoryError):
        keys_generate(keys.dir, now=T0)


def test_rotation_publishes_first_signs_later_and_retires_after_the_last_token(
    keys: Keys,
) -> None:
    old_kid = keys.ring.signing_key(T0).kid
    rotated_at = T0 + timedelta(hours=1)
    new = keys_rotate(keys.dir, publish_delay_s=600, token_ttl_s=120, leeway_s=10, now=rotated_at)
    ring = load_key_ring(keys.dir)
    switch = rotated_at + timedelta(seconds=600)
    retire = switch + timedelta(seconds=130)

    # Published at once, signing only after the delay.
    assert set(ring.public_keys(rotated_at)) == {old_kid, new.record.kid}
    assert [(k.kid, k.active, k.signs_until) for k in ring.published(rotated_at)] == [
        (old_kid, True, switch),
        (new.record.kid, False, None),
    ]
    assert [k.jwk for k in ring.published(rotated_at)] == ring.public_keys(rotated_at).to_jwks()[
        "keys"
    ]
    assert ring.signing_key(switch - timedelta(seconds=1)).kid == old_kid
    assert ring.signing_key(switch).kid == new.record.kid

    # A token the old key signed just before the switch verifies until it expires ...
    clock = FixedClock(switch - timedelta(seconds=1))
    last_old = issue(TokenIssuer(ring, issuer=ISSUER, ttl_s=120, clock=clock))
    assert split(last_old.token)[0]["kid"] == old_kid
    for at in (switch, switch + timedelta(seconds=128)):
        assert check_token(last_old.token, ring.public_keys(at), EXPECTED, POLICY, at).ok

    # ... and the old key leaves the JWKS only once that token is dead with the leeway.
    assert old_kid in ring.public_keys(retire - timedelta(seconds=1))
    assert old_kid not in ring.public_keys(retire)
    assert [s.state for s in ring.status(retire)] == [KeyState.RETIRED, KeyState.ACTIVE]


def test_token_signed_before_a_rotation_verifies_after_it(keys: Keys) -> None:
    before = issue(keys.issuer)
    later = T0 + timedelta(seconds=60)
    keys_rotate(keys.dir, publish_delay_s=0, token_ttl_s=120, leeway_s=10, now=later)
    ring = load_key_ring(keys.dir)
    assert ring.signing_key(later).kid != split(before.token)[0]["kid"]
    assert check_token(before.token, ring.public_keys(later), EXPECTED, POLICY, later).ok


def test_a_later_rotation_removes_retired_private_keys(keys: Keys) -> None:
    first = keys.ring.signing_key(T0).kid
    # The first rotation happens in the very second the key was made: no tie may confuse it.
    second = keys_rotate(keys.dir, publish_delay_s=0, token_ttl_s=120, leeway_s=10, now=T0)
    assert load_key_ring(keys.dir).signing_key(T0).kid == second.record.kid
    later = T0 + timedelta(hours=1)
    third = keys_rotate(keys.dir, publish_delay_s=0, token_ttl_s=120, leeway_s=10, now=later)
    assert not (keys.dir / f"{first}.pem").exists()
    rows = {s.record.kid: (s.state, s.signing) for s in keys_list(keys.dir, now=later)}
    assert rows == {
        first: (KeyState.RETIRED, False),
        second.record.kid: (KeyState.ACTIVE, False),  # draining until its last token expires
        third.record.kid: (KeyState.ACTIVE, True),
    }


def test_service_picks_up_a_rotation_and_survives_a_broken_directory(keys: Keys) -> None:
    directory = KeyDirectory(keys.dir, reload_s=5, clock=keys.clock)
    new = keys_rotate(keys.dir, publish_delay_s=60, token_ttl_s=120, leeway_s=10, now=T0)
    assert new.record.kid not in directory.public_keys(T0)  # not re-read yet
    keys.clock.advance(timedelta(seconds=5))
    assert new.record.kid in directory.public_keys(keys.clock.now())
    (keys.dir / f"{new.record.kid}.pem").write_text("garbage")
    keys.clock.advance(timedelta(seconds=5))
    assert new.record.kid in directory.public_keys(keys.clock.now())


def test_service_reparses_the_directory_only_when_it_changed(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    # A group-readable key (a secret mount's default mode) warns on every parse.
    for pem in keys.dir.glob("*.pem"):
        pem.chmod(0o640)
    directory = KeyDirectory(keys.dir, reload_s=5, clock=keys.clock)
    for _ in range(3):
        keys.clock.advance(timedelta(seconds=5))
        directory.public_keys(keys.clock.now())
    assert caplog.text.count("chmod 600") == 1
    keys_rotate(keys.dir, publish_delay_s=60, token_ttl_s=120, leeway_s=10, now=T0)
    keys.clock.advance(timedelta(seconds=5))
    assert len(directory.public_keys(keys.clock.now())) == 2
    assert caplog.text.count("chmod 600") == 3  # rotate's own read, then one re-parse


def test_no_active_key_is_a_clear_error(tmp_path: Path) -> None:
    keys_generate(tmp_path, now=T0)
    with pytest.raises(NoSigningKeyError, match="keys generate"):
        load_key_ring(tmp_path).signing_key(T0 - timedelta(seconds=1))


def test_mismatched_key_files_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    kid_a = keys_generate(a, now=T0).record.kid
    kid_b = keys_generate(b, now=T0).record.kid
    (a / f"{kid_a}.pem").write_bytes((b / f"{kid_b}.pem").read_bytes())
    with pytest.raises(KeyDirectoryError, match="does not hold the key"):
        load_key_ring(a)


# --- private key hygiene -------------------------------------------------------------------


def test_private_key_material_never_shows(
    keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (status,) = keys_list(keys.dir, now=T0)
    pem_path = keys.dir / f"{status.record.kid}.pem"
    pem = pem_path.read_text()
    secret_lines = [line for line in pem.splitlines() if not line.startswith("-----")]
    private_raw = keys.ring.signing_key(T0).private_key.private_bytes_raw()
    secret_forms = [
        *secret_lines,
        b64url_encode(private_raw),
        base64.b64encode(private_raw).decode(),
    ]

    key = keys.ring.signing_key(T0)
    shown = [repr(key), str(key), repr(keys.ring), repr(KeyDirectory(keys.dir)), f"{key}"]
    shown += [repr(s) for s in keys_list(keys.dir, now=T0)]
    with pytest.raises(TypeError):
        pickle.dumps(key)

    # A group-readable key is loaded with a warning, and a corrupt one refused: neither
    # message may carry the key.
    caplog.set_level(logging.DEBUG)
    pem_path.chmod(0o640)
    load_key_ring(keys.dir)
    broken = tmp_path / "broken"
    kid = keys_generate(broken, now=T0).record.kid
    (broken / f"{kid}.pem").write_text(pem.replace(secret_lines[0][:8], "AAAAAAAA"))
    with pytest.raises(KeyDirectoryError) as info:
        load_key_ring(broken)
    shown += [caplog.text, str(info.value), repr(info.value)]
    assert "chmod 600" in caplog.text
    for text in shown:
        for secret in secret_forms:
            assert secret not in text


def test_keys_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from facesvc.commands.cli import main

    key_dir = str(tmp_path / "keys")
    assert main(["keys", "--tokens-key-dir", key_dir, "generate"]) == 0
    assert main(["keys", "--tokens-key-dir", key_dir, "generate"]) == 2  # refuses to overwrite
    assert main(["keys", "--tokens-key-dir", key_dir, "rotate"]) == 0
    capsys.readouterr()
    assert main(["keys", "--tokens-key-dir", key_dir, "list"]) == 0
    listing = capsys.readouterr().out
    kids = [s.record.kid for s in keys_list(Path(key_dir))]
    assert len(kids) == 2 and all(kid in listing for kid in kids)
    assert "PRIVATE" not in listing and "next" in listing


@pytest.mark.parametrize("problem", list(Problem))
def test_every_problem_of_a_signed_document_has_a_word_in_each_format(problem: Problem) -> None:
    # One vocabulary (tokens.signed.Problem), specialised by each format where it differs.
    assert reason_of(problem).name == problem.name
    assert ticket_problem(problem) in TicketProblem
    assert pass_problem(problem) in PassProblem


def test_a_token_wrong_in_issuer_and_time_names_the_issuer(keys: Keys) -> None:
    staging = TokenIssuer(keys.ring, issuer="https://staging.test", clock=keys.clock)
    token = issue(staging).token
    assert keys.check(token, at=T0 + timedelta(days=1)) is CheckReason.WRONG_ISSUER
