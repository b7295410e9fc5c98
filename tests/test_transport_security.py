"""Transport security of the real servers: HSTS under TLS and credentials checked before a
gRPC call's message is read (issue 18.8); no serving beyond loopback without TLS and API keys,
and `facesvc init`, which makes both (issue 18.6)."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from facesvc.commands import cli
from facesvc.config import ConfigError, Settings, load_settings
from facesvc.serve.app import App
from facesvc.serve.tls import check_exposure
from facesvc.store.templates import generate_template_key
from facesvc.tokens.keys import keys_generate
from tests.conftest import ServerStarter
from tests.serve_process import REPO, child_env, serve_process
from tests.test_auth import Pki, admitted, call, make_keys

# The module-scoped PKI fixture (a CA and a server certificate for localhost).
from tests.test_auth import pki as pki


def _headers(url: str, context: ssl.SSLContext | None = None) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=30, context=context) as reply:
        return dict(reply.headers.items())


def test_https_answers_carry_hsts_and_plaintext_ones_do_not(
    start_server: ServerStarter, redis_url: str, pki: Pki
) -> None:
    secure = start_server(
        redis_url,
        security__tls_cert=str(pki.server_cert),
        security__tls_key=str(pki.server_key),
        security__allow_plaintext="false",
    )
    browser = ssl.create_default_context(cadata=pki.ca.decode())
    for path in ("/scan/", "/.well-known/jwks.json", "/healthz"):
        try:
            headers = _headers(f"https://localhost:{secure.app.http_port}{path}", browser)
        except urllib.error.HTTPError as error:  # /healthz and JWKS may answer 503 here
            headers = dict(error.headers.items())
        assert headers["Strict-Transport-Security"] == "max-age=31536000", path
    plain = start_server(redis_url)
    assert "Strict-Transport-Security" not in _headers(plain.http_url + "/scan/")


def test_an_anonymous_call_is_refused_before_its_message_is_read(
    start_server: ServerStarter, redis_url: str, tmp_path: Path
) -> None:
    # A 256 KiB service receives at most 512 KiB; the calls below send 1 MiB. A call whose
    # message is read first fails on its size (RESOURCE_EXHAUSTED); refused unread, on its
    # credentials. Production reads up to 64 MiB per call this way.
    keys = make_keys(tmp_path)
    server = start_server(
        redis_url,
        security__api_keys_file=str(keys.path),
        server__max_message_bytes=str(256 * 1024),
    )
    huge = pb.EnrollRequest(participant_id="p-1", images=[b"\0" * (1 << 20)])
    options = [("grpc.max_send_message_length", 8 << 20)]
    with grpc.insecure_channel(server.grpc_target, options=options) as channel:
        stub = pb_grpc.FaceVerificationStub(channel)
        anonymous = call(stub, "Enroll", huge, None)
        assert anonymous.code() is grpc.StatusCode.UNAUTHENTICATED
        forged = call(stub, "Enroll", huge, "fsk_000000000000_" + "x" * 43)
        assert forged.code() is grpc.StatusCode.UNAUTHENTICATED
        # With a valid key the message is read, and the receive limit applies as before.
        keyed = call(stub, "Enroll", huge, keys.keys["ops"])
        assert keyed.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # Calls of normal size go through every check as before.
        small = pb.EnrollRequest(participant_id="p-1", images=[b"\0" * 1024])
        assert admitted(call(stub, "Enroll", small, keys.keys["ops"]))
        lms = call(stub, "Enroll", small, keys.keys["lms-a-gate"])
        assert lms.code() is grpc.StatusCode.PERMISSION_DENIED
    # The refusals still show in the metrics, though the metrics interceptor never saw them.
    text, _ = server.app.metrics.render()
    assert re.search(
        rb'facesvc_grpc_calls_total\{code="UNAUTHENTICATED",'
        rb'method="facesvc.v1.FaceVerification/Enroll"\} 2\.0',
        text,
    ), text


# ---------------------------------------------------------------- safe defaults (issue 18.6)


def _secrets_env(tmp_path: Path) -> dict[str, str]:
    """Token and template keys, so that `facesvc serve` would otherwise start."""
    keys_generate(tmp_path / "token-keys")
    return {
        "FACESVC_TOKENS_KEY_DIR": str(tmp_path / "token-keys"),
        "FACESVC_TEMPLATES_KEY": generate_template_key("k1"),
        "FACESVC_SERVER_GRPC_PORT": "0",
        "FACESVC_SERVER_HTTP_PORT": "0",
    }


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        # The container's addresses with the old defaults: plaintext, every caller an admin.
        (["--server-grpc-host", "0.0.0.0", "--server-http-host", "0.0.0.0"], ["TLS", "API keys"]),
        (["--server-http-host", "0.0.0.0"], ["server.http_host=0.0.0.0", "TLS", "API keys"]),
    ],
)
def test_serve_refuses_other_machines_without_tls_and_api_keys(
    tmp_path: Path, redis_url: str, flags: list[str], named: list[str]
) -> None:
    args = ["--redis-url", redis_url, *flags]
    with serve_process(args, tmp_path / "serve.log", env=_secrets_env(tmp_path)) as served:
        assert served.proc.wait(timeout=120) == 2
        log = served.log()
    assert "refusing to serve" in log
    for word in named:
        assert word in log
    assert "security.allow_insecure_network=true" in log  # how to go on, for development
    assert "facesvc listening" not in log


def _build(settings: Settings) -> None:
    """Construct the App (its gRPC server needs an event loop), start nothing."""

    async def build() -> None:
        app = App(settings)
        await app.redis.aclose()

    asyncio.run(build())


def test_serve_with_tls_and_keys_passes_the_check_and_the_dev_flag_is_loud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exposed = {"server.grpc_host": "0.0.0.0", "server.http_host": "0.0.0.0"}
    secured = tmp_path / "state"
    init = [
        "init",
        "--tokens-key-dir",
        str(secured / "tokens"),
        "--templates-key-file",
        str(secured / "templates.key"),
        "--security-api-keys-file",
        str(secured / "apikeys.json"),
        "--security-tls-cert",
        str(secured / "tls.pem"),
        "--security-tls-key",
        str(secured / "tls.key"),
    ]
    assert cli.main(init) == 0
    settings = load_settings(
        env={},
        overrides={
            **exposed,
            "security.api_keys_file": secured / "apikeys.json",
            "security.tls_cert": secured / "tls.pem",
            "security.tls_key": secured / "tls.key",
            "security.allow_plaintext": "false",
            "security.allow_anonymous": "false",
        },
    )
    assert check_exposure(settings) == []
    _build(settings)  # built, not started: nothing is bound off loopback here
    with pytest.raises(ConfigError, match="refusing to serve"):
        _build(load_settings(env={}, overrides=exposed))
    flagged = load_settings(
        env={}, overrides={**exposed, "security.allow_insecure_network": "true"}
    )
    lines = check_exposure(flagged)
    assert len(lines) == 2 and "without TLS" in lines[0] and "without API keys" in lines[1]
    caplog.clear()
    _build(flagged)
    loud = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(loud) == 2 and all("INSECURE NETWORK" in line for line in loud)


def test_init_makes_a_working_secure_set_up_once(
    tmp_path: Path, start_server: ServerStarter, redis_url: str
) -> None:
    state = tmp_path / "state"
    settings_flags = [
        "--tokens-key-dir",
        str(state / "keys" / "tokens"),
        "--templates-key-file",
        str(state / "keys" / "templates.key"),
        "--security-api-keys-file",
        str(state / "keys" / "apikeys.json"),
        "--security-tls-cert",
        str(state / "tls" / "server.pem"),
        "--security-tls-key",
        str(state / "tls" / "server.key"),
    ]
    assert cli.main(["init", *settings_flags, "--tls-host", "facesvc"]) == 0
    made = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    admin_key_file = state / "keys" / "apikeys.json.admin-key"
    for secret in (admin_key_file, state / "tls" / "server.key", state / "keys" / "templates.key"):
        assert secret.stat().st_mode & 0o077 == 0, secret
    # A second run, as compose runs it before every start, changes nothing.
    assert cli.main(["init", *settings_flags]) == 0
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == made

    server = start_server(
        redis_url,
        tokens__key_dir=str(state / "keys" / "tokens"),
        templates__key_file=str(state / "keys" / "templates.key"),
        security__api_keys_file=str(state / "keys" / "apikeys.json"),
        security__tls_cert=str(state / "tls" / "server.pem"),
        security__tls_key=str(state / "tls" / "server.key"),
        security__allow_plaintext="false",
        security__allow_anonymous="false",
    )
    # The container's health probe trusts the certificate init made (127.0.0.1 is in it).
    probe = subprocess.run(
        [sys.executable, "-m", "facesvc.commands.healthcheck"],
        cwd=REPO,
        env=child_env(
            {
                "FACESVC_SERVER_GRPC_PORT": str(server.app.grpc_port),
                "FACESVC_SECURITY_TLS_CERT": str(state / "tls" / "server.pem"),
                "FACESVC_SECURITY_TLS_KEY": str(state / "tls" / "server.key"),
            }
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "SERVING" in probe.stdout, probe.stderr
    # The admin key init wrote is accepted over that TLS; no key is not.
    credentials = grpc.ssl_channel_credentials((state / "tls" / "server.pem").read_bytes())
    with grpc.secure_channel(f"localhost:{server.app.grpc_port}", credentials) as channel:
        stub = pb_grpc.FaceVerificationStub(channel)
        request = pb.GetEnrollmentRequest(participant_id="p-1")
        admin_key = admin_key_file.read_text().strip()
        assert admitted(call(stub, "GetEnrollment", request, admin_key))
        assert call(stub, "GetEnrollment", request, None).code() is (
            grpc.StatusCode.UNAUTHENTICATED
        )
