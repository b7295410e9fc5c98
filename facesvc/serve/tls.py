"""Transport security of both servers, built from ``[security]``.

- ``tls_cert`` + ``tls_key``: gRPC and HTTP serve TLS (1.2 or later) with that certificate.
- ``tls_ca`` as well: gRPC requires a client certificate signed by that CA (mTLS; the
  certificate's CN or subjectAltName then identifies the caller, see :mod:`facesvc.transport.auth`).
  HTTP never asks for one: it serves the Scan Wajah page to browsers, and a TLS certificate
  request makes a browser that holds any client certificate prompt the participant to pick
  one. ``/metrics`` takes an API key instead.
- no certificate: plaintext, allowed only while ``allow_plaintext`` is on (settings refuse
  the combination otherwise, so the service never starts unencrypted by accident), and
  announced with a loud warning at start-up (:func:`insecure_warnings`).

Unreadable or mismatched files are a :class:`~facesvc.config.ConfigError` naming the
setting, raised before anything binds.

Off loopback, both servers need TLS and API keys (:func:`check_exposure`): ``facesvc serve``
refuses to start on 0.0.0.0 in plaintext or with every caller an admin, unless
``security.allow_insecure_network`` says so, which is logged as CRITICAL.

Under TLS every HTTP response carries ``Strict-Transport-Security`` (:func:`add_hsts`): a
browser that has reached the scan page once over HTTPS never again follows a plain
``http://`` link to it, where a network attacker could serve a page of their own.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from facesvc.config import ConfigError, SecuritySettings, Settings


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """Credentials for the gRPC server and the SSL context for the HTTP server."""

    grpc_credentials: Any  # grpc.ServerCredentials (untyped in grpc's stubs)
    http_context: ssl.SSLContext


def _read(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"security.{name}={path}: cannot read it ({exc.strerror})") from None


def server_tls(security: SecuritySettings) -> ServerTLS | None:
    """The TLS set-up for ``security``; None when no certificate is configured."""
    if security.tls_cert is None or security.tls_key is None:
        return None
    cert = _read("tls_cert", security.tls_cert)
    key = _read("tls_key", security.tls_key)
    ca = _read("tls_ca", security.tls_ca) if security.tls_ca is not None else None

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(security.tls_cert, security.tls_key)
    except ssl.SSLError as exc:
        # Checked here because gRPC would only fail later, at bind, with a vague message.
        raise ConfigError(
            "security.tls_cert/tls_key: not a PEM certificate (chain) and its matching "
            f"private key ({exc.reason})"
        ) from None
    if ca is not None:
        try:
            ssl.create_default_context(cadata=ca.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as exc:
            # gRPC would refuse it only at the first handshake, with no word about the file.
            raise ConfigError(f"security.tls_ca: not a PEM CA certificate ({exc})") from None
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )
    return ServerTLS(credentials, context)


def insecure_warnings(security: SecuritySettings) -> list[str]:
    """Banner lines for a set-up fit only for local development (empty when none apply)."""
    lines = []
    if security.tls_cert is None:
        lines.append(
            "PLAINTEXT: gRPC and HTTP serve without TLS (security.allow_plaintext is on and no "
            "security.tls_cert is set); API keys, photos and tokens cross the network "
            "unencrypted. For local development only: set security.tls_cert/tls_key and "
            "security.allow_plaintext=false in production."
        )
    if security.api_keys_file is None:
        lines.append(
            "NO AUTHENTICATION: security.api_keys_file is unset, so every caller is an admin "
            "(may enroll and delete). For local development only: create keys with "
            "`facesvc apikeys add`, set security.api_keys_file and "
            "security.allow_anonymous=false in production."
        )
    return lines


STRICT_TRANSPORT_SECURITY = "max-age=31536000"
"""One year, the usual value; no includeSubDomains or preload: the service cannot speak for
other hosts of its domain."""


async def add_hsts(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp ``on_response_prepare`` hook of an HTTPS server: the HSTS header."""
    response.headers.setdefault("Strict-Transport-Security", STRICT_TRANSPORT_SECURITY)


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (``localhost``, 127.0.0.0/8, ``::1``);
    False for every other, the wildcard addresses and host names included."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problems(settings: Settings) -> list[str]:
    """What is missing for serving beyond loopback, one sentence each (empty on loopback, or
    with TLS and API keys both set)."""
    server, security = settings.server, settings.security
    exposed = [
        f"server.{name}={host}"
        for name, host in (("grpc_host", server.grpc_host), ("http_host", server.http_host))
        if not is_loopback(host)
    ]
    if not exposed:
        return []
    where = " and ".join(exposed)
    problems = []
    if security.tls_cert is None:
        problems.append(
            f"{where}: reachable from other machines without TLS (security.tls_cert): "
            "photos, API keys and tokens would cross the network in clear"
        )
    if security.api_keys_file is None:
        problems.append(
            f"{where}: reachable from other machines without API keys "
            "(security.api_keys_file): every caller would be an admin, able to enroll and delete"
        )
    return problems


def check_exposure(settings: Settings) -> list[str]:
    """Raise ConfigError when the servers would be reachable from other machines without TLS
    or API keys, naming what to set; with ``security.allow_insecure_network``, return the
    problems instead, for the start-up banner."""
    problems = exposure_problems(settings)
    if problems and not settings.security.allow_insecure_network:
        raise ConfigError(
            "refusing to serve: "
            + "; ".join(problems)
            + ". Set security.tls_cert, security.tls_key and security.api_keys_file "
            "(`facesvc init` makes all three; compose.yaml shows how), or bind "
            "server.grpc_host and server.http_host to 127.0.0.1; for development only, "
            "security.allow_insecure_network=true"
        )
    return problems
