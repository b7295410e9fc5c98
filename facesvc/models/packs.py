"""Which model packs there are, and the one way a pack is loaded from the settings.

A pack is chosen by configuration (``models.pack``): the name of a built-in pack
(``yunet-sface``, alias ``default``; ``dlib``) or the path of a pack manifest (TOML or
JSON) of kind ``onnx`` or ``insightface`` (:mod:`facesvc.models.manifest_packs`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from facesvc.config import ModelSettings
from facesvc.models.calibration import log_calibration_status
from facesvc.models.dlib.pack import DLIB_PACK, load_dlib_pack
from facesvc.models.manifest_packs import (
    load_insightface_manifest,
    load_onnx_manifest,
    read_manifest,
)
from facesvc.models.pack import ModelPack, PackContext, PackError
from facesvc.models.yunet_sface import PACK_NAME as YUNET_SFACE
from facesvc.models.yunet_sface import load_yunet_sface_pack

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".toml", ".json")
DEFAULT_ALIAS = "default"
DEFAULT_PACK = YUNET_SFACE


PackLoader = Callable[[PackContext], ModelPack]
ManifestLoader = Callable[[Path, Mapping[str, Any], PackContext], ModelPack]


class PackRegistry:
    """Built-in packs by name and manifest kinds by ``kind``; ``load`` resolves a config value."""

    def __init__(self) -> None:
        self._builtin: dict[str, PackLoader] = {}
        self._kinds: dict[str, ManifestLoader] = {}

    def register_builtin(self, name: str, loader: PackLoader) -> None:
        self._builtin[name] = loader

    def register_kind(self, kind: str, loader: ManifestLoader) -> None:
        self._kinds[kind] = loader

    def load(self, spec: str, context: PackContext) -> ModelPack:
        """The pack named ``spec``, or described by the manifest at path ``spec``."""
        if spec in self._builtin:
            return self._builtin[spec](context)
        path = Path(spec).expanduser()
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise PackError(
                f"model pack {spec!r} is neither a built-in pack "
                f"({', '.join(sorted(self._builtin))}) nor the path of a .toml/.json pack manifest"
            )
        manifest = read_manifest(path)
        kind = manifest.get("kind")
        if kind not in self._kinds:
            raise PackError(
                f"{path}: kind = {kind!r} is not one of {', '.join(sorted(self._kinds))}"
            )
        return self._kinds[kind](path, manifest, context)


def default_registry() -> PackRegistry:
    """The built-in packs (``yunet-sface``, also as ``default``; ``dlib``) and the
    ``onnx``/``insightface`` manifest kinds."""
    registry = PackRegistry()
    registry.register_builtin(DEFAULT_PACK, load_yunet_sface_pack)
    registry.register_builtin(DEFAULT_ALIAS, load_yunet_sface_pack)
    registry.register_builtin(DLIB_PACK, load_dlib_pack)
    registry.register_kind("onnx", load_onnx_manifest)
    registry.register_kind("insightface", load_insightface_manifest)
    return registry


def load_pack(
    settings: ModelSettings, *, spec: str | None = None, calibrated: bool = True
) -> ModelPack:
    """The pack ``models.pack`` names (or ``spec``), loaded (seconds: off the event loop).
    ``calibrated`` False loads it without any calibration, for ``facesvc calibrate`` and
    ``facesvc eval``: calibrating never needs the calibration it is about to write."""
    context = PackContext(
        cache_dir=settings.cache_dir,
        threads=settings.threads,
        lone_threads=settings.lone_threads,
        calibration_override=settings.calibration if calibrated else None,
        logger=log,
        calibrated=calibrated,
    )
    pack = default_registry().load(spec or settings.pack, context)
    log.info("model pack %s (%s); licence: %s", pack.tag, spec or settings.pack, pack.licence)
    if calibrated:
        log_calibration_status(log, pack.name, pack.calibration)
    return pack
