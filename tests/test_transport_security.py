"""Transport security of the real servers (issue 18.8): HSTS under TLS, and credentials checked
before a gRPC call's message is read."""

from __future__ import annotations

import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from facesvc._proto.v1 import facesvc_pb2 as pb
from facesvc._proto.v1 import facesvc_pb2_grpc as pb_grpc
from tests.conftest import ServerStarter
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
