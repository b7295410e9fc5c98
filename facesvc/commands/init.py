"""``facesvc init``: make the secrets a first start needs, where the settings say they live.

For each of these that is configured and missing, and only then (a later run changes
nothing, so it can run before every start, as compose.yaml's one-shot ``init`` service does):

- ``tokens.key_dir``: a first token signing key (``facesvc keys generate``);
- ``templates.key_file`` (unless ``templates.key`` is set): a first template key;
- ``security.api_keys_file``: a keys file with one admin client, ``admin``; its API key is
  written once to ``<api_keys_file>.admin-key`` (mode 0600) and never printed;
- ``security.tls_cert`` and ``security.tls_key``: a self-signed certificate (ECDSA P-256, two
  years) for the ``--tls-host`` names and addresses, loopback always included so the
  container's health probe can check it. Callers trust that certificate file itself;
  replace both files with ones from your CA whenever you like.

Every file is created readable by its owner only, except the certificate. Nothing secret is
printed: one line per thing made or found.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from facesvc.commands.arguments import settings_from_args
from facesvc.config import ConfigError
from facesvc.store.templates import generate_template_key
from facesvc.tokens.keys import keys_generate
from facesvc.transport.auth import Client, Role, new_api_key, write_keys_file

ADMIN_NAME = "admin"
ADMIN_TENANT = "programme"
CERT_DAYS = 730
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never briefly readable by others)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def self_signed_certificate(hosts: list[str]) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a self-signed server certificate for ``hosts``
    (DNS names or IP addresses; the first is the subject's CN)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def cli_init(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    made: list[str] = []

    key_dir = settings.tokens.key_dir
    if any(key_dir.glob("*.json")):
        print(f"token signing keys: found in {key_dir}")
    else:
        keys_generate(key_dir)
        made.append(f"token signing key: made in {key_dir}")

    templates = settings.templates
    if templates.key:
        print("template keys: given in templates.key")
    elif templates.key_file.exists() and templates.key_file.stat().st_size > 0:
        print(f"template keys: found in {templates.key_file}")
    else:
        _write_new(templates.key_file, (generate_template_key("k1") + "\n").encode(), 0o600)
        made.append(f"template key k1: made in {templates.key_file}")

    security = settings.security
    if security.api_keys_file is None:
        print("API keys: security.api_keys_file is unset, none made")
    elif security.api_keys_file.exists():
        print(f"API keys: found in {security.api_keys_file}")
    else:
        key, key_id, digest = new_api_key()
        key_path = security.api_keys_file.with_name(security.api_keys_file.name + ".admin-key")
        if key_path.exists():
            raise ConfigError(f"{key_path} exists without its keys file; move it away first")
        _write_new(key_path, (key + "\n").encode(), 0o600)
        write_keys_file(
            security.api_keys_file, [Client(ADMIN_NAME, Role.ADMIN, ADMIN_TENANT, key_id, digest)]
        )
        made.append(
            f"API keys: made {security.api_keys_file} with client {ADMIN_NAME!r}; its key is "
            f"in {key_path} (add the others with `facesvc apikeys add`)"
        )

    cert, cert_key = security.tls_cert, security.tls_key
    if cert is None or cert_key is None:
        print("TLS: security.tls_cert is unset, none made")
    elif cert.exists() or cert_key.exists():
        if not (cert.exists() and cert_key.exists()):
            raise ConfigError(
                f"security.tls_cert={cert} and tls_key={cert_key}: only one exists; "
                "restore the other or remove both"
            )
        print(f"TLS: found {cert}")
    else:
        hosts = list(dict.fromkeys([*args.tls_host, *_LOOPBACK]))
        cert_pem, key_pem = self_signed_certificate(hosts)
        _write_new(cert_key, key_pem, 0o600)
        _write_new(cert, cert_pem, 0o644)
        made.append(
            f"TLS: made a self-signed certificate for {', '.join(hosts)} in {cert} (callers "
            "trust this file; replace both files with your CA's at any time)"
        )

    for line in made:
        print(line)
    return 0
