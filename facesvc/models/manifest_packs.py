"""Packs an operator describes in a manifest (TOML or JSON) dropped next to the model files.

- ``kind = "onnx"``: any ONNX face recogniser described by its input contract
  (size, layout, colour order, mean/std, alignment template, output size, distance),
  with SCRFD as the detector (through insightface, which also gives the five points).
- ``kind = "insightface"``: an InsightFace model directory (e.g. buffalo_l: SCRFD
  ``det_10g.onnx`` + ArcFace ``w600k_r50.onnx``) loaded through the ``insightface``
  package. Its weights are for non-commercial research only: the manifest must say
  ``non_commercial_research_only = true`` and every load logs a warning.

docs/packs.md walks through adding and calibrating a pack.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from facesvc.models.calibration import Calibration, CalibrationError, load_calibration
from facesvc.models.insightface_pack import (
    ArcFaceEmbedder,
    ScrfdDetector,
    load_insightface_model,
    warn_non_commercial,
)
from facesvc.models.matching import Distance
from facesvc.models.onnx_embedder import (
    ALIGNMENT_TEMPLATES,
    ColourOrder,
    InputSpec,
    Layout,
    OnnxEmbedder,
)
from facesvc.models.onnx_session import SessionSettings, create_session
from facesvc.models.pack import ModelPack, PackContext, PackError, files_digest
from facesvc.models.types import Embedder


def read_manifest(path: Path) -> dict[str, Any]:
    """The parsed manifest at ``path`` (TOML or JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PackError(f"cannot read pack manifest {path}: {e}") from e
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise PackError(f"pack manifest {path} is not valid {path.suffix[1:].upper()}: {e}") from e
    if not isinstance(raw, dict):
        raise PackError(f"pack manifest {path} must be a table/object at the top level")
    return raw


# --------------------------------------------------------------------------- manifest fields


def _field(table: Mapping[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    value = table.get(key, default)
    if value is None:
        raise PackError(f"{where}: missing required field {key!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PackError(f"{where}: field {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _table(manifest: Mapping[str, Any], key: str, path: Path) -> Mapping[str, Any]:
    t = manifest.get(key)
    if not isinstance(t, Mapping):
        raise PackError(f"{path}: missing the [{key}] table")
    return t


def _triple(table: Mapping[str, Any], key: str, where: str) -> tuple[float, float, float]:
    value = table.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (float(value),) * 3
    if (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        return (float(value[0]), float(value[1]), float(value[2]))
    raise PackError(f"{where}: {key!r} must be a number or a list of 3 numbers, got {value!r}")


def _enum(table: Mapping[str, Any], key: str, enum: Any, where: str, default: str) -> Any:
    raw = table.get(key, default)
    try:
        return enum(raw)
    except ValueError:
        allowed = ", ".join(e.value for e in enum)
        raise PackError(f"{where}: {key} = {raw!r} is not one of {allowed}") from None


def _model_file(base: Path, table: Mapping[str, Any], where: str) -> Path:
    rel: str = _field(table, "model", str, where)
    path = (base / rel).resolve()
    if not path.is_file():
        raise PackError(f"{where}: model file {path} does not exist")
    return path


def _calibration(
    name: str,
    digest: str,
    distance: Distance,
    manifest_dir: Path,
    declared: str | None,
    context: PackContext,
) -> Calibration | None:
    if not context.calibrated:
        return None
    path = context.calibration_override or (manifest_dir / declared if declared else None)
    if path is None:
        return None
    try:
        return load_calibration(path, pack=name, pack_digest=digest, distance=distance)
    except CalibrationError as e:
        raise PackError(str(e)) from e


def _scrfd(
    base: Path, manifest: Mapping[str, Any], path: Path, context: PackContext
) -> tuple[ScrfdDetector, Path]:
    det = _table(manifest, "detector", path)
    where = f"{path} [detector]"
    kind = det.get("kind", "scrfd")
    if kind != "scrfd":
        raise PackError(f'{where}: kind = {kind!r}; manifest packs use kind = "scrfd"')
    model_path = _model_file(base, det, where)
    size = det.get("input_size", [640, 640])
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(v, int) and v % 32 == 0 and v > 0 for v in size)
    ):
        raise PackError(
            f"{where}: input_size must be [width, height], multiples of 32, got {size!r}"
        )
    threshold = _field(det, "score_threshold", float, where, 0.5)
    try:
        model = load_insightface_model(model_path, "detection", context.threads)
    except ValueError as e:
        raise PackError(f"{where}: {e}") from e
    return ScrfdDetector(model, (size[0], size[1]), threshold), model_path


def _scrfd_pack(
    name: str,
    path: Path,
    manifest: Mapping[str, Any],
    context: PackContext,
    recogniser: Path,
    embedder: Embedder,
    distance: Distance,
    licence: str,
) -> ModelPack:
    """What both manifest kinds finish alike: the SCRFD detector of the [detector] table,
    the digest over both model files and both tables, and the calibration."""
    detector, det_path = _scrfd(path.parent, manifest, path, context)
    settings = {
        "recogniser": dict(_table(manifest, "recogniser", path)),
        "detector": dict(_table(manifest, "detector", path)),
    }
    digest = files_digest([recogniser, det_path], settings)
    return ModelPack(
        name=name,
        digest=digest,
        detector=detector,
        landmarks=None,
        embedder=embedder,
        distance=distance,
        calibration=_calibration(
            name, digest, distance, path.parent, manifest.get("calibration"), context
        ),
        licence=licence,
    )


def load_onnx_manifest(path: Path, manifest: Mapping[str, Any], context: PackContext) -> ModelPack:
    """A ``kind = "onnx"`` pack: a generic recogniser described by its manifest."""
    base = path.parent
    name = _field(manifest, "name", str, str(path))
    rec = _table(manifest, "recogniser", path)
    where = f"{path} [recogniser]"
    model_path = _model_file(base, rec, where)
    template_name = _field(rec, "alignment", str, where, "arcface_112")
    if template_name not in ALIGNMENT_TEMPLATES:
        raise PackError(
            f"{where}: alignment = {template_name!r} is not one of {', '.join(ALIGNMENT_TEMPLATES)}"
        )
    template, template_size = ALIGNMENT_TEMPLATES[template_name]
    size = _field(rec, "input_size", int, where)
    if size != template_size:
        raise PackError(
            f"{where}: alignment {template_name} makes {template_size}px chips, "
            f"but input_size is {size}"
        )
    spec = InputSpec(
        size=size,
        layout=_enum(rec, "layout", Layout, where, "NCHW"),
        colour=_enum(rec, "colour", ColourOrder, where, "RGB"),
        mean=_triple(rec, "mean", where),
        std=_triple(rec, "std", where),
    )
    output_size = _field(rec, "output_size", int, where)
    distance = _enum(rec, "distance", Distance, where, "cosine")
    try:
        embedder = OnnxEmbedder(
            create_session(model_path, SessionSettings(intra_threads=context.threads)),
            spec,
            template,
            output_size,
        )
    except ValueError as e:
        raise PackError(f"{where}: {e}") from e
    licence = str(manifest.get("licence", "not stated in the manifest"))
    return _scrfd_pack(name, path, manifest, context, model_path, embedder, distance, licence)


def load_insightface_manifest(
    path: Path, manifest: Mapping[str, Any], context: PackContext
) -> ModelPack:
    """A ``kind = "insightface"`` pack: SCRFD + ArcFace loaded through insightface."""
    base = path.parent
    name = _field(manifest, "name", str, str(path))
    if manifest.get("non_commercial_research_only") is not True:
        raise PackError(
            f"{path}: InsightFace weights are licensed for non-commercial research only; "
            "set non_commercial_research_only = true in the manifest to confirm that this "
            "deployment may use them"
        )
    warn_non_commercial(context.logger, name)
    rec = _table(manifest, "recogniser", path)
    where = f"{path} [recogniser]"
    model_path = _model_file(base, rec, where)
    distance = _enum(rec, "distance", Distance, where, "cosine")
    try:
        embedder = ArcFaceEmbedder(
            load_insightface_model(model_path, "recognition", context.threads)
        )
    except ValueError as e:
        raise PackError(f"{where}: {e}") from e
    licence = "InsightFace: non-commercial research only"
    return _scrfd_pack(name, path, manifest, context, model_path, embedder, distance, licence)
