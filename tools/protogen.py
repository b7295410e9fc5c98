"""Generate the Python gRPC stubs in ``facesvc/_proto`` from ``proto/``.

Run ``python -m tools.protogen`` (``make proto``) after editing a .proto file;
``--check`` exits 1 when the committed stubs differ from what the proto files
generate. The stubs are committed so that installing the package needs no
protoc; tests/test_proto_drift.py keeps them honest.

protoc writes ``from facesvc.v1 import x_pb2`` for imports between our own
proto files; that would resolve against the top-level ``facesvc`` package, so
every such import is rewritten to ``from facesvc._proto.v1 import x_pb2``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "proto"
STUBS_DIR = REPO_ROOT / "facesvc" / "_proto"
PROTO_PACKAGE = "facesvc"
"""Top-level proto directory (``proto/facesvc/...``) whose output moves under ``_proto``."""

_HEADER = '"""Generated from proto/ by `python -m tools.protogen`; do not edit."""\n'
_IMPORT_RE = re.compile(rf"^(\s*)from {PROTO_PACKAGE}\.(\S+) import ", re.MULTILINE)

# Lines that only stamp the generator's version: ignored when comparing, so
# a patch release of grpcio-tools does not count as drift.
_VERSION_STAMPS = (
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"ValidateProtobufRuntimeVersion\(.*?\)", re.DOTALL),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
)


def generate(proto_root: Path = PROTO_ROOT) -> dict[str, str]:
    """Run protoc on every .proto under ``proto_root``.

    Returns {path relative to ``facesvc/_proto``: file text}, imports rewritten,
    including the ``__init__.py`` files the package needs.
    """
    from grpc_tools import protoc  # dev-only dependency: imported on use

    protos = sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    well_known = resources.files("grpc_tools") / "_proto"
    files: dict[str, str] = {"__init__.py": _HEADER}
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *protos,
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        generated_root = Path(tmp) / PROTO_PACKAGE
        for path in sorted(generated_root.rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(generated_root)
            files[rel.as_posix()] = _IMPORT_RE.sub(
                rf"\1from {PROTO_PACKAGE}._proto.\2 import ", path.read_text()
            )
            for parent in rel.parents:
                if parent != Path("."):
                    files[(parent / "__init__.py").as_posix()] = _HEADER
    return files


def normalise(text: str) -> str:
    """``text`` without the generator's version stamps (see ``_VERSION_STAMPS``)."""
    for pattern in _VERSION_STAMPS:
        text = pattern.sub("<version>", text)
    return text


def committed(stubs_dir: Path = STUBS_DIR) -> dict[str, str]:
    """The stub files now in ``stubs_dir``, as {relative path: text}."""
    return {
        p.relative_to(stubs_dir).as_posix(): p.read_text()
        for p in sorted(stubs_dir.rglob("*"))
        if p.is_file() and p.suffix in (".py", ".pyi")
    }


def drift(stubs_dir: Path = STUBS_DIR, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Relative paths whose committed stub differs from a fresh generation."""
    fresh = {k: normalise(v) for k, v in generate(proto_root).items()}
    have = {k: normalise(v) for k, v in committed(stubs_dir).items()}
    return sorted(k for k in fresh.keys() | have.keys() if fresh.get(k) != have.get(k))


def write(stubs_dir: Path = STUBS_DIR, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Regenerate the stubs into ``stubs_dir``, removing stale ones; returns the files written."""
    files = generate(proto_root)
    for stale in committed(stubs_dir).keys() - files.keys():
        (stubs_dir / stale).unlink()
    written = []
    for rel, text in files.items():
        target = stubs_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.protogen", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed stubs drift from proto/"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = drift()
        for rel in stale:
            print(f"stale stub: facesvc/_proto/{rel} (run `make proto`)", file=sys.stderr)
        return 1 if stale else 0
    for path in write():
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
