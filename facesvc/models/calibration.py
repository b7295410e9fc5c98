"""A model pack's calibration record: its decision threshold at a stated false-match rate, and
what else was measured for the pack on the same photos.

The record is written by ``facesvc calibrate`` (:mod:`facesvc.accuracy.calibrate`) and read
here when a pack loads: the threshold, the distance it applies to, the target, what it was
calibrated on (sources, identity, image and pair counts) and every source's FMR and FNMR at
that threshold. Those per-source figures are measured on the calibration pairs themselves:
they show how uneven one threshold is across populations, they are not accuracy claims
(docs/accuracy.md reports on held-out identities).

It also carries where the pack's landmark model puts the nose in a frontal face
(``frontal``, for the pose gates) and, when turned-head photos were given, the threshold for
"the same person" between a turned face and a frontal one (``turned``, for the liveness
challenge's frames), each with its own counts.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from facesvc.models.binomial import shown_above
from facesvc.models.matching import Distance

FORMAT = "facesvc-calibration/1"

SOURCE_SKEW_LIMIT = 2.0
"""A source whose FMR exceeds this multiple of the overall FMR is called out at start-up."""
SKEW_CONFIDENCE = 0.95
"""How surely a source's own pairs must show that before it is a warning."""


class CalibrationError(ValueError):
    """A calibration file is missing, malformed, or belongs to another pack."""


@dataclass(frozen=True, slots=True)
class RatesAtThreshold:
    """Error counts of one group of pairs at the calibrated threshold."""

    genuine_pairs: int
    impostor_pairs: int
    false_non_matches: int
    false_matches: int

    @property
    def fnmr(self) -> float:
        return self.false_non_matches / self.genuine_pairs if self.genuine_pairs else math.nan

    @property
    def fmr(self) -> float:
        return self.false_matches / self.impostor_pairs if self.impostor_pairs else math.nan


@dataclass(frozen=True, slots=True)
class SourceRates:
    """One source's pairs (both photos from that source) at the threshold."""

    source: str
    identities: int
    rates: RatesAtThreshold


@dataclass(frozen=True, slots=True)
class CalibrationData:
    """What a calibration was computed from."""

    folder: str
    sources: tuple[str, ...]
    identities: int
    images: int
    detection_failures: int
    """Photos where no single usable face was found; they are in no pair."""
    identity_names: tuple[str, ...] = ()
    """The identity folders calibrated on: reports on the same folder use the others."""


@dataclass(frozen=True, slots=True)
class FrontalPose:
    """The pack's frontal geometry as measured (``facesvc.models.quality.FrontalGeometry``):
    the median nose drop, in eye distances, over ``faces`` calibration faces, for
    landmarks of ``layout``."""

    layout: str
    nose_drop: float
    faces: int


@dataclass(frozen=True, slots=True)
class TurnedIdentity:
    """The largest distance at which a turned face (head turned about 30-50 degrees, or
    looking up) is the same person as a frontal face of the same scan, calibrated to
    ``target_fmr`` on impostor (turned, frontal) pairs. Used between the frames of a
    liveness challenge, where the frontal threshold would refuse real people."""

    threshold: float
    target_fmr: float
    folder: str
    identities: int
    rates: RatesAtThreshold
    """Counts at the threshold: genuine (turned, frontal) pairs of one person, impostor
    pairs of different people."""
    min_turn_deg: float
    """A face counts as turned when its yaw differs from the person's frontal face by at
    least this much, or it looks up by the challenge's LOOK_UP measure."""
    fmr_confidence: float | None = None
    """As :attr:`Calibration.fmr_confidence`, for the turned pairs."""


@dataclass(frozen=True, slots=True)
class Calibration:
    """A pack's threshold and its provenance.

    ``threshold`` is a distance in ``distance`` units: a comparison matches when its
    (fused) distance is at most the threshold. ``pack_digest`` identifies the exact
    model files; a calibration never applies to another pack or another version.
    """

    pack: str
    pack_digest: str
    distance: Distance
    threshold: float
    target_fmr: float
    fmr_resolvable: bool
    """False when too few impostor pairs were available to allow even one false match."""
    data: CalibrationData
    overall: RatesAtThreshold
    per_source: tuple[SourceRates, ...]
    created_utc: str
    centre: tuple[float, ...] | None = None
    """(D,) mean unit descriptor of the calibration photos: cosine distance is measured
    around it (see facesvc.models.matching); None for the origin."""
    frontal: FrontalPose | None = None
    """Where the pack's landmarks put the nose of a frontal face; None: the layout's mean
    face."""
    turned: TurnedIdentity | None = None
    """The same-person threshold between turned and frontal faces; None: not calibrated
    (the liveness check then uses ``threshold``)."""
    centre_choice: str = ""
    """Why the centre is there or not: the measurement that chose it."""
    fmr_confidence: float | None = None
    """The one-sided confidence (Clopper-Pearson) with which the impostor pairs show the FMR
    at the threshold to be at most ``target_fmr``; None: the threshold is the point
    estimate, and the FMR on new people lands on either side of the target."""

    @property
    def skew_bound(self) -> float:
        """The FMR above which a source is uneven: SOURCE_SKEW_LIMIT times the target or
        the overall FMR, whichever is larger."""
        return SOURCE_SKEW_LIMIT * max(self.overall.fmr, self.target_fmr)

    def sources_above_skew(self) -> tuple[tuple[SourceRates, bool], ...]:
        """Sources whose FMR on their own pairs is above :attr:`skew_bound`, each with
        whether their pairs show it at SKEW_CONFIDENCE: 2 false matches among 631 pairs
        against a bound of 0.2% (1.3 expected) are no evidence that the source is uneven,
        only that it needs more pairs to tell."""
        bound = self.skew_bound
        return tuple(
            (s, shown_above(s.rates.false_matches, s.rates.impostor_pairs, bound, SKEW_CONFIDENCE))
            for s in self.per_source
            if s.rates.fmr > bound
        )

    def skewed_sources(self) -> tuple[str, ...]:
        """Sources shown (at SKEW_CONFIDENCE) to have an FMR above :attr:`skew_bound`."""
        return tuple(s.source for s, shown in self.sources_above_skew() if shown)

    def to_json(self) -> str:
        body = asdict(self)
        body["distance"] = self.distance.value
        body["overall"] = _rates_json(self.overall)
        body["per_source"] = [
            {"source": s.source, "identities": s.identities, **_rates_json(s.rates)}
            for s in self.per_source
        ]
        if self.turned is not None:
            body["turned"]["rates"] = _rates_json(self.turned.rates)
        return json.dumps({"format": FORMAT, **body}, indent=2) + "\n"

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")


def _rates_json(r: RatesAtThreshold) -> dict[str, Any]:
    fields = asdict(r)
    fields["fmr"] = r.fmr
    fields["fnmr"] = r.fnmr
    return fields


def _rates_from(raw: dict[str, Any]) -> RatesAtThreshold:
    return RatesAtThreshold(
        genuine_pairs=int(raw["genuine_pairs"]),
        impostor_pairs=int(raw["impostor_pairs"]),
        false_non_matches=int(raw["false_non_matches"]),
        false_matches=int(raw["false_matches"]),
    )


def _frontal_from(raw: Any) -> FrontalPose | None:
    if raw is None:
        return None
    return FrontalPose(str(raw["layout"]), float(raw["nose_drop"]), int(raw["faces"]))


def _turned_from(raw: Any) -> TurnedIdentity | None:
    if raw is None:
        return None
    return TurnedIdentity(
        threshold=float(raw["threshold"]),
        target_fmr=float(raw["target_fmr"]),
        folder=str(raw["folder"]),
        identities=int(raw["identities"]),
        rates=_rates_from(raw["rates"]),
        min_turn_deg=float(raw["min_turn_deg"]),
        fmr_confidence=_confidence_from(raw),
    )


def _confidence_from(raw: dict[str, Any]) -> float | None:
    # Records written before confidences were recorded are point estimates.
    value = raw.get("fmr_confidence")
    return None if value is None else float(value)


def load_calibration(
    path: Path,
    pack: str | None = None,
    pack_digest: str | None = None,
    distance: Distance | None = None,
) -> Calibration:
    """Read a calibration JSON; refuse one made for another pack, model files or distance
    when ``pack``, ``pack_digest`` or ``distance`` is given."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CalibrationError(
            f"calibration file {path} does not exist; run `facesvc calibrate`"
        ) from e
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(
            f"calibration file {path} is unreadable JSON ({e}); re-run `facesvc calibrate`"
        ) from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CalibrationError(f"{path} is not a {FORMAT} file; re-run `facesvc calibrate`")
    try:
        data = raw["data"]
        calibration = Calibration(
            pack=str(raw["pack"]),
            pack_digest=str(raw["pack_digest"]),
            distance=Distance(raw["distance"]),
            threshold=float(raw["threshold"]),
            target_fmr=float(raw["target_fmr"]),
            fmr_resolvable=bool(raw["fmr_resolvable"]),
            data=CalibrationData(
                folder=str(data["folder"]),
                sources=tuple(str(s) for s in data["sources"]),
                identities=int(data["identities"]),
                images=int(data["images"]),
                detection_failures=int(data["detection_failures"]),
                identity_names=tuple(str(n) for n in data.get("identity_names", ())),
            ),
            overall=_rates_from(raw["overall"]),
            per_source=tuple(
                SourceRates(str(s["source"]), int(s["identities"]), _rates_from(s))
                for s in raw["per_source"]
            ),
            created_utc=str(raw["created_utc"]),
            centre=None if raw.get("centre") is None else tuple(float(v) for v in raw["centre"]),
            frontal=_frontal_from(raw.get("frontal")),
            turned=_turned_from(raw.get("turned")),
            centre_choice=str(raw.get("centre_choice", "")),
            fmr_confidence=_confidence_from(raw),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CalibrationError(
            f"{path} is missing or has a bad field ({e}); re-run `facesvc calibrate`"
        ) from e
    thresholds = [calibration.threshold]
    if calibration.turned is not None:
        thresholds.append(calibration.turned.threshold)
    if not all(math.isfinite(t) for t in thresholds):
        raise CalibrationError(f"{path}: a threshold in it is not a finite distance")
    if pack is not None and calibration.pack != pack:
        raise CalibrationError(
            f"{path} calibrates pack {calibration.pack!r}, not {pack!r}: calibrate this pack"
        )
    if pack_digest is not None and calibration.pack_digest != pack_digest:
        raise CalibrationError(
            f"{path} was calibrated for pack {calibration.pack!r} version "
            f"{calibration.pack_digest}, but the loaded models are {pack_digest}: "
            "re-run `facesvc calibrate` for these models"
        )
    if distance is not None and calibration.distance is not distance:
        raise CalibrationError(
            f"{path} holds a threshold for {calibration.distance.value} distance, but the pack "
            f"compares with {distance.value}: re-run `facesvc calibrate` for this pack"
        )
    return calibration


def target_text(target_fmr: float, confidence: float | None) -> str:
    """How a threshold's false-match rate was set, in words: "FMR <= 0.001 shown at 95%
    confidence" or "FMR 0.001 (point estimate)"."""
    if confidence is None:
        return f"FMR {target_fmr:g} (point estimate)"
    return f"FMR <= {target_fmr:g} shown at {confidence:.0%} confidence"


def log_calibration_status(
    logger: logging.Logger, pack: str, calibration: Calibration | None
) -> None:
    """Log, once at start-up, which calibration the pack decides with.

    An uncalibrated pack is logged at ERROR level in capitals: its threshold has no
    stated false-match rate, so every VERIFIED it returns is of unknown strength.
    """
    if calibration is None:
        logger.error(
            "UNCALIBRATED MODEL PACK %r: its match threshold has NO measured false-match rate. "
            "Run `facesvc calibrate <folder of identity folders>` on photos like your "
            "participants' and set the pack's calibration file before relying on any match.",
            pack,
        )
        return
    c = calibration
    logger.info(
        "model pack %r (%s) runs with calibration of %s: %s distance%s <= %.6f for %s, "
        "calibrated on %d identities / %d images from %s (%d genuine, %d impostor pairs; "
        "FMR %.2e, FNMR %.2e on those pairs)",
        c.pack,
        c.pack_digest,
        c.created_utc,
        c.distance.value,
        "" if c.centre is None else " (around the calibrated centre)",
        c.threshold,
        target_text(c.target_fmr, c.fmr_confidence),
        c.data.identities,
        c.data.images,
        ",".join(c.data.sources),
        c.overall.genuine_pairs,
        c.overall.impostor_pairs,
        c.overall.fmr,
        c.overall.fnmr,
    )
    if c.turned is not None:
        t = c.turned
        logger.info(
            "model pack %r: turned faces are the same person as the frontal one up to distance "
            "%.6f (%s; %d genuine, %d impostor pairs from %s)",
            c.pack,
            t.threshold,
            target_text(t.target_fmr, t.fmr_confidence),
            t.rates.genuine_pairs,
            t.rates.impostor_pairs,
            t.folder,
        )
    if not c.fmr_resolvable:
        logger.warning(
            "calibration of pack %r rests on %d impostor pairs: too few to resolve FMR %g; "
            "the threshold's real false-match rate is unknown",
            c.pack,
            c.overall.impostor_pairs,
            c.target_fmr,
        )
    for s, shown in c.sources_above_skew():
        args = (c.pack, s.source, s.rates.fmr, s.rates.false_matches, s.rates.impostor_pairs)
        if shown:
            logger.warning(
                "calibration of pack %r: source %r has FMR %.2e (%d of %d impostor pairs) at "
                "this threshold, shown at %.0f%% to be more than %.2e: people like these are "
                "falsely matched more often; calibrate on data that looks like the deployment",
                *args,
                SKEW_CONFIDENCE * 100,
                c.skew_bound,
            )
        else:
            logger.info(
                "calibration of pack %r: source %r has FMR %.2e (%d of %d impostor pairs) at "
                "this threshold, above %.2e but too few pairs to show it at %.0f%%: more "
                "people like these in the calibration would tell",
                *args,
                c.skew_bound,
                SKEW_CONFIDENCE * 100,
            )
