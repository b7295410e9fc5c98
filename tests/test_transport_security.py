"""Transport security of the real servers (issue 18.8): HSTS under TLS."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

from tests.conftest import ServerStarter
from tests.test_auth import Pki

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
