"""A directory of converted models, built once and verified on every load.

A converted file's name carries its key: the converter's name and version and the sha256 of
every source file, so a new converter version or new weights never reuse an old conversion.
Each file is written atomically (a temporary file in the same directory, fsync, rename) with a
sidecar ``.sha256`` holding the digest of its bytes; a file whose bytes disagree with the
sidecar (truncated, corrupt, or written by a crashed run) is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_CHUNK = 1 << 20


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME/facesvc/models``, or ``~/.cache/facesvc/models`` without it."""
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "facesvc" / "models"


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ModelCache:
    """Converted model files under ``directory`` (created on first write)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def key(self, name: str, source_files: Sequence[Path], version: str) -> str:
        """Hex sha256 identifying a conversion of ``source_files`` by converter ``name`` at
        ``version``."""
        digest = hashlib.sha256(f"{name}\0{version}\0".encode())
        for source in source_files:
            digest.update(sha256_file(source).encode() + b"\0")
        return digest.hexdigest()

    def path_for(
        self,
        name: str,
        source_files: Sequence[Path],
        version: str,
        build: Callable[[], bytes],
        suffix: str = ".onnx",
    ) -> Path:
        """The path of the verified converted file, calling ``build`` to (re)create it when it
        is missing or fails its checksum."""
        key = self.key(name, source_files, version)
        path = self.directory / f"{name}-v{version}-{key[:16]}{suffix}"
        if self._is_intact(path):
            return path
        data = build()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path, data)
        self._write_atomic(_sidecar(path), hashlib.sha256(data).hexdigest().encode() + b"\n")
        return path

    @staticmethod
    def _is_intact(path: Path) -> bool:
        sidecar = _sidecar(path)
        if not path.is_file() or not sidecar.is_file():
            return False
        expected = sidecar.read_text(encoding="ascii", errors="replace").strip()
        return sha256_file(path) == expected

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                # mkstemp creates 0600; an image built as root is read by another user.
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
