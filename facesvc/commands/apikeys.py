"""Handlers of ``facesvc apikeys add | list | revoke`` (registered in ``facesvc.commands.cli``).

``add`` prints a new API key once, on stdout, and stores only its hash; lost keys are
revoked and replaced, never recovered. The keys file is ``--file`` or
``security.api_keys_file``; a running service picks up changes within seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facesvc.commands.arguments import settings_from_args
from facesvc.domain import TrainingType
from facesvc.transport.auth import (
    Client,
    KeysFileError,
    Role,
    new_api_key,
    read_keys_file,
    write_keys_file,
)


def _keys_file(args: argparse.Namespace) -> Path:
    if args.file is not None:
        return Path(args.file)
    path = settings_from_args(args).security.api_keys_file
    if path is None:
        raise KeysFileError("no keys file: pass --file or set security.api_keys_file")
    return path


def _existing(path: Path) -> list[Client]:
    return read_keys_file(path) if path.exists() else []


def _add(args: argparse.Namespace) -> None:
    path = _keys_file(args)
    clients = _existing(path)
    role = Role(args.role)
    types = args.training_type or (["OFFLINE"] if role is Role.KIOSK else None)
    key = ""
    key_id = key_sha256 = ""
    if not args.mtls_identity or args.with_key:
        key, key_id, key_sha256 = new_api_key()
    client = Client(
        name=args.name,
        role=role,
        tenant=args.tenant,
        key_id=key_id,
        key_sha256=key_sha256,
        mtls_identity=args.mtls_identity or "",
        training_types=None if types is None else frozenset(TrainingType(t) for t in types),
    )
    client.check(f"client {args.name!r}")
    if any(c.name == client.name for c in clients):
        raise KeysFileError(f"a client named {client.name!r} exists; revoke it first")
    write_keys_file(path, [*clients, client])
    print(
        f"added {client.name} (role {role.value}, tenant {client.tenant}) to {path}",
        file=sys.stderr,
    )
    if key:
        print("the API key follows; it is shown only this once:", file=sys.stderr)
        print(key)


def _list(args: argparse.Namespace) -> None:
    print(f"{'name':<24} {'role':<8} {'tenant':<20} {'key_id':<13} {'mtls_identity':<30} types")
    for c in _existing(_keys_file(args)):
        types = (
            "all"
            if c.training_types is None
            else ",".join(sorted(t.value for t in c.training_types))
        )
        print(
            f"{c.name:<24} {c.role.value:<8} {c.tenant:<20} {c.key_id or '-':<13} "
            f"{c.mtls_identity or '-':<30} {types}"
        )


def _revoke(args: argparse.Namespace) -> None:
    path = _keys_file(args)
    clients = _existing(path)
    kept = [c for c in clients if c.name != args.name]
    if len(kept) == len(clients):
        raise KeysFileError(f"no client named {args.name!r} in {path}")
    write_keys_file(path, kept)
    print(f"revoked {args.name}", file=sys.stderr)


def _run(action: str, args: argparse.Namespace) -> int:
    """An operator's mistake (bad name, missing file) is said plainly, exit 2."""
    try:
        {"add": _add, "list": _list, "revoke": _revoke}[action](args)
    except (KeysFileError, ValueError) as exc:
        print(f"facesvc: {exc}", file=sys.stderr)
        return 2
    return 0


def cli_apikeys_add(args: argparse.Namespace) -> int:
    """Register a client and print its new API key once."""
    return _run("add", args)


def cli_apikeys_list(args: argparse.Namespace) -> int:
    """List registered clients (never secrets)."""
    return _run("list", args)


def cli_apikeys_revoke(args: argparse.Namespace) -> int:
    """Remove a client by name."""
    return _run("revoke", args)
