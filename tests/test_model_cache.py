"""The model cache converts once, names files by what made them, and rebuilds damaged files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from facesvc.models.model_cache import ModelCache, default_cache_dir


class CountingBuild:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return self.payload


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "weights.dat"
    path.write_bytes(b"weights v1")
    return path


def test_converts_once_then_reuses_the_verified_file(tmp_path: Path, source: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    build = CountingBuild(b"converted model")
    first = cache.path_for("net", [source], "1", build)
    second = cache.path_for("net", [source], "1", build)
    assert first == second
    assert first.read_bytes() == b"converted model"
    assert build.calls == 1
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name, first.name + ".sha256"]


def test_new_weights_or_converter_version_get_a_new_file(tmp_path: Path, source: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    original = cache.path_for("net", [source], "1", CountingBuild(b"a"))
    assert cache.path_for("net", [source], "2", CountingBuild(b"b")) != original
    assert cache.path_for("other", [source], "1", CountingBuild(b"c")) != original
    source.write_bytes(b"weights v2")
    assert cache.path_for("net", [source], "1", CountingBuild(b"d")) != original


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:3]),  # truncated
        lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]),  # corrupted, same length
        lambda p: p.with_name(p.name + ".sha256").unlink(),  # crashed before the sidecar
        lambda p: p.unlink(),  # removed
    ],
)
def test_damaged_file_is_rebuilt(
    tmp_path: Path, source: Path, damage: Callable[[Path], object]
) -> None:
    cache = ModelCache(tmp_path / "cache")
    build = CountingBuild(b"converted model")
    path = cache.path_for("net", [source], "1", build)
    damage(path)
    assert cache.path_for("net", [source], "1", build) == path
    assert path.read_bytes() == b"converted model"
    assert build.calls == 2


def test_failed_build_leaves_no_file(tmp_path: Path, source: Path) -> None:
    cache = ModelCache(tmp_path / "cache")

    def broken() -> bytes:
        raise RuntimeError("converter failed")

    with pytest.raises(RuntimeError):
        cache.path_for("net", [source], "1", broken)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_default_directory_follows_xdg_cache_home(tmp_path: Path) -> None:
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "facesvc" / "models"
    assert default_cache_dir({}) == Path.home() / ".cache" / "facesvc" / "models"
