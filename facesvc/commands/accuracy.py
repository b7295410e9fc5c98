"""``facesvc eval`` and ``facesvc calibrate``: a pack's accuracy on a folder of identity folders.

Both describe every photo once with the pack (detect, landmarks, align, embed; plus
simulated frames for eval) and can keep those descriptors in an ``.npz`` cache
(``--cache``), since describing is the slow part and the metrics are cheap.

``eval`` writes ``report.md`` (tables per lever and per source), ``det.png`` and
``summary.json`` to ``--out``. Identities are split into ``--folds`` folds (stratified
by source): every operating-point figure uses a threshold calibrated on the other
folds' identities, so no reported pair ever helped set the threshold it is judged by.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from facesvc.accuracy.calibrate import DEFAULT_TARGET_FMR, calibrate, rates_at
from facesvc.accuracy.evaluation import (
    TURNED_MIN_DEG,
    Comparisons,
    DescriptorSet,
    FrameSimulation,
    Lever,
    LeverResult,
    OperatingPoint,
    ScanProtocol,
    describe_photos,
    evaluate_lever,
    identity_folds,
    lever_table,
    open_pose,
    scan_comparisons,
    scan_identity_folders,
    source_of,
    source_table,
    threshold_at_fmr,
    turned_comparisons,
    write_det_plot,
)
from facesvc.config import QualitySettings, load_settings
from facesvc.models.calibration import (
    Calibration,
    CalibrationData,
    CalibrationError,
    FrontalPose,
    TurnedIdentity,
    load_calibration,
)
from facesvc.models.matching import Distance, FrameRule, MatchRules, TemplateRule
from facesvc.models.pack import ModelPack
from facesvc.models.packs import load_pack
from facesvc.models.pipeline import FacePipeline
from facesvc.models.quality import FrontalGeometry, LandmarkLayout
from facesvc.models.types import RGBImage

log = logging.getLogger("facesvc.accuracy")

MIN_PHOTOS = 3
"""Scan levers use identities with at least this many photos (enrol 2, hold out 1), so
every lever in one report compares the same people."""


def read_photo(path: Path) -> RGBImage:
    """A photo from a trusted evaluation folder as (H, W, 3) uint8 RGB, EXIF orientation applied."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)


def quality_limits(min_face_px: int | None) -> QualitySettings:
    """The service's quality settings (``--min-face-px`` overriding the face size)."""
    limits = load_settings().quality
    if min_face_px is not None:
        limits = replace(limits, min_face_px=min_face_px, min_detect_px=min_face_px)
    return limits


def describe(
    pack: ModelPack,
    data: Path,
    cache: Path | None,
    simulation: FrameSimulation,
    limits: QualitySettings,
) -> DescriptorSet:
    """The pack's descriptors for ``data`` as the service makes them (its pipeline with the
    quality gates of ``limits``, the head pose measured but not yet gated), from ``cache``
    when it holds this pack's with these limits."""
    key = f"{pack.tag} {json.dumps(asdict(limits), sort_keys=True, default=str)}"
    if cache is not None and cache.is_file():
        try:
            cached = DescriptorSet.load(cache)
        except KeyError as e:  # written before the set held that field: describe again
            print(f"cache {cache} lacks {e}: describing again", file=sys.stderr)
        else:
            if cached.pack == key and cached.variants.shape[1] >= simulation.variants:
                print(f"descriptors from cache {cache}", file=sys.stderr)
                return cached
    images = scan_identity_folders(data)
    print(f"describing {len(images)} photos with {pack.tag} ...", file=sys.stderr, flush=True)
    pipeline = FacePipeline(pack.detector, pack.landmarks, pack.embedder, open_pose(limits))
    ds = describe_photos(images, read_photo, pipeline, pack=key, simulation=simulation)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        ds.save(cache)
    return ds


def choose_centre(
    ds: DescriptorSet, folds: Sequence[npt.NDArray[np.int64]], target_fmr: float
) -> tuple[bool, str]:
    """Whether cosine around the calibration photos' mean descriptor beats plain cosine for
    this pack, measured on identity folds (each judged at the threshold calibrated on the
    others): the one with the lower FMR + FNMR there wins, plain on a tie."""
    plain = evaluate_lever(
        ds, Lever("plain", MatchRules(Distance.COSINE)), folds, target_fmr, 0
    ).within["all"]
    around = evaluate_lever(
        ds, Lever("centred", MatchRules(Distance.COSINE), centred=True), folds, target_fmr, 0
    ).within["all"]
    centred = around.fmr + around.fnmr < plain.fmr + plain.fnmr

    def text(op: OperatingPoint) -> str:
        return (
            f"FMR {op.fmr:.2%} ({op.false_matches}/{op.impostor_count}), "
            f"FNMR {op.fnmr:.2%} ({op.false_non_matches}/{op.genuine_count})"
        )

    why = (
        f"{'centred' if centred else 'plain'} cosine: on {len(folds)} identity folds at "
        f"thresholds for FMR {target_fmr:g} calibrated on the other folds, plain cosine "
        f"{text(plain)}, centred cosine {text(around)}"
    )
    return centred, why


def standard_levers(full: bool, centred: bool = True) -> list[Lever]:
    """The comparisons ``facesvc eval`` reports, one lever at a time.

    Distances first (L2, cosine, cosine around the calibration centre), then frames and
    enrolment photos with the pack's distance (``centred``: around the centre, as the
    pack serves when its calibration has one), then per-source calibration on top of the
    default rules. With ``full`` every frame and template rule is measured (how the
    defaults were chosen); otherwise only the default and the runner-up.
    """
    cos, l2 = Distance.COSINE, Distance.L2
    mean, mean_desc = TemplateRule.MEAN, FrameRule.MEAN_DESCRIPTOR
    name = "centred cosine" if centred else "cosine"

    def scan(k: int, f: int) -> ScanProtocol:
        return ScanProtocol(enroll=k, frames=f, min_photos=MIN_PHOTOS)

    def lever(label: str, rules: MatchRules, protocol: ScanProtocol, **kw: bool) -> Lever:
        return Lever(f"{label}, {name}", rules, protocol, centred=centred, **kw)

    levers = [
        Lever("all photo pairs, L2", MatchRules(l2)),
        Lever("all photo pairs, cosine", MatchRules(cos)),
        Lever("all photo pairs, centred cosine", MatchRules(cos), centred=True),
        Lever("1 photo, 1 frame, L2", MatchRules(l2), scan(1, 1)),
        Lever("1 photo, 1 frame, cosine", MatchRules(cos), scan(1, 1)),
        Lever("1 photo, 1 frame, centred cosine", MatchRules(cos), scan(1, 1), centred=True),
    ]
    frame_rules = list(FrameRule) if full else [mean_desc, FrameRule.MIN]
    for frames in (3, 5):
        for frame_rule in frame_rules:
            r = MatchRules(cos, mean, frame_rule)
            levers.append(
                lever(f"1 photo, {frames} frames ({frame_rule.value})", r, scan(1, frames))
            )
    template_rules = list(TemplateRule) if full else [mean, TemplateRule.NEAREST]
    for template_rule in template_rules:
        r = MatchRules(cos, template_rule, mean_desc)
        levers.append(lever(f"2 photos ({template_rule.value}), 1 frame", r, scan(2, 1)))
    for frames in (3, 5):
        label = f"2 photos (mean), {frames} frames (mean-descriptor)"
        levers.append(lever(label, MatchRules(cos, mean, mean_desc), scan(2, frames)))
    levers.append(
        lever(
            "2 photos (mean), 3 frames (mean-descriptor), per-source threshold",
            MatchRules(cos, mean, mean_desc),
            scan(2, 3),
            per_source=True,
        )
    )
    return levers


SHIPPED_LEVERS = (
    ("1 photo, 1 frame", ScanProtocol(1, 1, MIN_PHOTOS)),
    ("1 photo, 3 frames", ScanProtocol(1, 3, MIN_PHOTOS)),
    ("2 photos, 1 frame", ScanProtocol(2, 1, MIN_PHOTOS)),
    ("2 photos, 3 frames (the default rules)", ScanProtocol(2, 3, MIN_PHOTOS)),
)
"""What ``eval --calibration`` judges at the record's own threshold, with the served rules."""


def held_out_table(ds: DescriptorSet, calibration: Calibration) -> str:
    """A markdown table: every SHIPPED_LEVERS protocol on the identities the calibration was
    not made on, decided at its threshold with its centre and the served match rules."""
    used = set(calibration.data.identity_names)
    held = [i for i in ds.identities if i not in used]
    if not used or not held:
        return (
            "The calibration does not name its identities, or used all of them: nothing held out.\n"
        )
    part = ds.of_identities(held)
    centre = None if calibration.centre is None else np.array(calibration.centre)
    rules = MatchRules(calibration.distance)
    lines = [
        f"{len(held)} identities held out of the calibration ({', '.join(held)}); threshold "
        f"{calibration.threshold:.6f} ({calibration.distance.value}"
        f"{', centred' if centre is not None else ''}), target FMR {calibration.target_fmr:g}.",
        "",
        "| protocol | genuine | impostor | FNMR at threshold | FMR at threshold "
        "| worst source FMR (same-source impostors) / overall |",
        "|---|---|---|---|---|---|",
    ]
    for label, protocol in (("all photo pairs", None), *SHIPPED_LEVERS):
        comps = (
            part.single_photo_comparisons(calibration.distance, centre)
            if protocol is None
            else scan_comparisons(part, protocol, rules, centre)
        )
        op = _operating(comps, calibration.threshold)
        worst = []
        for source in sorted(set(comps.sources)):
            own = _operating(comps.of_source(source), calibration.threshold)
            if own.impostor_count:
                worst.append((own.fmr, source, own))
        fmr_text = "n/a"
        if worst:
            fmr, source, own = max(worst)
            ratio = fmr / op.fmr if op.fmr > 0 else (math.inf if fmr > 0 else 0.0)
            fmr_text = (
                f"{source}: {fmr:.2%} ({own.false_matches}/{own.impostor_count}), {ratio:.1f}x"
            )
        lines.append(
            f"| {label} | {op.genuine_count} | {op.impostor_count} "
            f"| {op.fnmr:.2%} ({op.false_non_matches}/{op.genuine_count}) "
            f"| {op.fmr:.2%} ({op.false_matches}/{op.impostor_count}) | {fmr_text} |"
        )
    return "\n".join(lines) + "\n"


def _operating(comps: Comparisons, threshold: float) -> OperatingPoint:
    gen = comps.genuine
    accepted = comps.distance <= threshold
    return OperatingPoint(
        false_matches=int(np.sum(accepted & ~gen)),
        impostor_count=int((~gen).sum()),
        false_non_matches=int(np.sum(~accepted & gen)),
        genuine_count=int(gen.sum()),
    )


def _report(ds: DescriptorSet, results: Sequence[LeverResult], folds: int, seed: int) -> str:
    lines = [
        f"# Accuracy of {ds.pack.split(' ', 1)[0]}",
        "",
        f"{len(ds.paths)} photos of {len(ds.identities)} identities described as the service "
        f"does (its quality gates included), {len(ds.failures)} without a usable face"
        + (": " + "; ".join(_failure(f) for f in ds.failures) if ds.failures else "")
        + ".",
        f"Operating points: threshold at FMR 1e-3 calibrated on the other fold "
        f"({folds} identity folds, stratified by source, seed {seed}); counts pooled over folds.",
        "ROC AUC, EER and FNMR @ FMR are threshold-free, over the same report-fold"
        " comparisons, with 95% intervals from a bootstrap over identities.",
        "",
        "## Levers, all sources",
        "",
        lever_table(results),
    ]
    for r in results:
        lines += [f"## {r.lever.label}", "", source_table(r)]
    return "\n".join(lines)


def _failure(text: str) -> str:
    """``path: STATUS: reason`` as ``file (STATUS: the first reason)``."""
    path, _, rest = text.partition(": ")
    return f"{Path(path).name} ({rest.split(': ')[0]}: {rest.partition(': ')[2].split(':')[0]})"


def _on_det_plot(lever: Lever) -> bool:
    """The enrolment/scan levers with the default template and frame rules (a readable plot)."""
    return (
        lever.protocol is not None
        and not lever.per_source
        and lever.rules.template is TemplateRule.MEAN
        and (lever.protocol.frames == 1 or lever.rules.frames is FrameRule.MEAN_DESCRIPTOR)
    )


def run_eval(args: argparse.Namespace) -> int:
    pack = load_pack(load_settings().models, spec=args.pack, calibrated=False)
    limits = quality_limits(args.min_face_px)
    calibration = None
    if args.calibration is not None:
        calibration = load_calibration(
            args.calibration, pack=pack.name, pack_digest=pack.digest, distance=pack.distance
        )
    simulation = FrameSimulation(variants=args.variants, seed=args.seed)
    described = describe(pack, args.data, args.cache, simulation, limits)
    frontal = _frontal_of(calibration) or described.frontal_pose()[0]
    ds = described.posed(frontal, limits)
    folds = identity_folds(ds.identities, args.folds, seed=args.seed)
    if calibration is not None:
        centred, why = calibration.centre is not None, calibration.centre_choice
    else:
        centred, why = choose_centre(ds, folds, DEFAULT_TARGET_FMR)
    results = []
    for lever in standard_levers(args.full, centred):
        print(f"measuring: {lever.label}", file=sys.stderr, flush=True)
        results.append(evaluate_lever(ds, lever, folds, DEFAULT_TARGET_FMR, args.bootstrap))
    report = _report(ds, results, args.folds, args.seed)
    report += f"\n## Distance\n\n{why or 'as the calibration record says'}\n"
    report += (
        f"\n## Head pose\n\nFrontal nose drop {frontal.nose_drop:.3f} eye distances "
        f"({frontal.layout.value} points, "
        f"{'from the calibration' if calibration else 'the median of these photos'}).\n"
    )
    if calibration is not None:
        report += "\n## At the calibration's own threshold, on held-out identities\n\n"
        report += held_out_table(ds, calibration)
        if args.turned is not None:
            report += "\n## Turned faces at the calibration's turned threshold\n\n"
            report += turned_table(pack, args, calibration, ds, frontal, limits)
    out: Path = args.out or Path("eval-" + pack.name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report, encoding="utf-8")
    write_det_plot(
        {r.lever.label: r.validated.report for r in results if _on_det_plot(r.lever)},
        out / "det.png",
        f"DET, {pack.name} on {args.data.name}",
    )
    summary = {
        r.lever.label: {
            "summaries": {k: asdict(v) for k, v in r.summaries.items()},
            "same_source_operating": {k: asdict(v) for k, v in r.within.items()},
            "any_impostor_operating": {k: asdict(v) for k, v in r.claimed.items()},
            "thresholds": r.validated.thresholds,
        }
        for r in results
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    print(report)
    print(f"wrote {out / 'report.md'}, {out / 'det.png'}, {out / 'summary.json'}", file=sys.stderr)
    return 0


def _frontal_of(calibration: Calibration | None) -> FrontalGeometry | None:
    if calibration is None or calibration.frontal is None:
        return None
    f = calibration.frontal
    return FrontalGeometry(LandmarkLayout(f.layout), f.nose_drop)


def turned_table(
    pack: ModelPack,
    args: argparse.Namespace,
    calibration: Calibration,
    ds: DescriptorSet,
    frontal: FrontalGeometry,
    limits: QualitySettings,
) -> str:
    """The calibration's turned threshold on ``args.turned``, impostors being the frontal
    photos of the identities the calibration was not made on."""
    if calibration.turned is None:
        return "The calibration has no turned threshold.\n"
    held = [i for i in ds.identities if i not in set(calibration.data.identity_names)]
    others = ds.of_identities(held)
    turned_set = describe(pack, args.turned, None, FrameSimulation(variants=0), limits)
    centre = None if calibration.centre is None else np.array(calibration.centre)
    comps = turned_comparisons(turned_set, frontal, others, calibration.distance, centre)
    op = _operating(comps, calibration.turned.threshold)
    frontal_op = _operating(comps, calibration.threshold)
    return (
        f"Turned faces of {args.turned.name} against frontal faces: genuine pairs of the same "
        f"person, impostor pairs against the frontal photos of the {len(held)} held-out "
        f"identities and of the other people there.\n\n"
        "| threshold | genuine | impostor | FNMR | FMR |\n|---|---|---|---|---|\n"
        f"| turned {calibration.turned.threshold:.6f} | {op.genuine_count} | {op.impostor_count} "
        f"| {op.fnmr:.2%} ({op.false_non_matches}) | {op.fmr:.2%} ({op.false_matches}) |\n"
        f"| frontal {calibration.threshold:.6f} | {frontal_op.genuine_count} "
        f"| {frontal_op.impostor_count} | {frontal_op.fnmr:.2%} ({frontal_op.false_non_matches}) "
        f"| {frontal_op.fmr:.2%} ({frontal_op.false_matches}) |\n"
    )


def run_calibrate(args: argparse.Namespace) -> int:
    # Calibrating never needs the calibration it is about to write: the pack loads without.
    pack = load_pack(load_settings().models, spec=args.pack, calibrated=False)
    limits = quality_limits(args.min_face_px)
    simulation = FrameSimulation(variants=0)
    portraits = describe(pack, args.data, args.cache, simulation, limits)
    more = [describe(pack, folder, None, simulation, limits) for folder in args.more_people]
    described = DescriptorSet.pooled([portraits, *more])
    if args.hold_out is not None:
        # The folds are DATA's, as `facesvc eval --calibration` reports on DATA; the
        # --more-people identities always stay in.
        folds = identity_folds(portraits.identities, args.folds, seed=args.seed)
        if not 0 <= args.hold_out < len(folds):
            raise SystemExit(f"--hold-out must be a fold in 0..{len(folds) - 1}")
        held = {portraits.identities[k] for k in folds[args.hold_out].tolist()}
        described = described.of_identities([i for i in described.identities if i not in held])
    # The frontal geometry comes from the portraits alone: --more-people folders may be
    # mostly turned heads, and only their photos inside the pose gates are paired.
    frontal, faces = described.of_identities(portraits.identities).frontal_pose()
    ds = described.posed(frontal, limits).at_most(args.max_photos)
    confidence = args.confidence or None
    used = sorted({ds.identities[i] for i in ds.image_identity.tolist()})
    if args.centre == "auto":
        everyone = [np.array([k for k, i in enumerate(ds.identities) if i in set(used)])]
        folds = identity_folds([ds.identities[k] for k in everyone[0]], args.folds, args.seed)
        folds = [everyone[0][f] for f in folds]
        centred, why = choose_centre(ds, folds, args.fmr)
    else:
        centred, why = args.centre == "on", f"--centre {args.centre}"
    print(f"distance: {why}", file=sys.stderr)
    members = np.array([k for k, i in enumerate(ds.identities) if i in set(used)], np.int64)
    centre = ds.centre_of(members) if centred and pack.distance is Distance.COSINE else None
    pairs = ds.single_photo_comparisons(pack.distance, centre)
    try:
        c = calibrate(
            pairs,
            pack=pack.name,
            pack_digest=pack.digest,
            distance=pack.distance,
            data=CalibrationData(
                folder="+".join(f.name for f in (args.data, *args.more_people)),
                sources=tuple(sorted({source_of(i) for i in used})),
                identities=len(used),
                images=len(ds.paths),
                detection_failures=len(ds.failures),
                identity_names=tuple(used),
            ),
            target_fmr=args.fmr,
            confidence=confidence,
            centre=None if centre is None else centre.tolist(),
            centre_choice=why,
            frontal=FrontalPose(frontal.layout.value, frontal.nose_drop, faces),
        )
    except CalibrationError as e:
        raise SystemExit(f"facesvc calibrate: {e}") from e
    if args.turned is not None:
        turned_set = describe(pack, args.turned, None, simulation, limits)
        # A person in both the turned folder and --more-people is no impostor of themself.
        others = ds.of_identities([i for i in ds.identities if i not in turned_set.identities])
        comps = turned_comparisons(turned_set, frontal, others, pack.distance, centre)
        try:
            threshold = threshold_at_fmr(comps.distance[~comps.genuine], args.fmr, confidence)
        except ValueError as e:
            raise SystemExit(f"turned faces: {e}") from e
        c = replace(
            c,
            turned=TurnedIdentity(
                threshold=threshold,
                target_fmr=args.fmr,
                folder=args.turned.name,
                identities=len(turned_set.identities),
                rates=rates_at(comps, threshold),
                min_turn_deg=TURNED_MIN_DEG,
                fmr_confidence=confidence,
            ),
        )
    out: Path = args.out or Path(f"calibration-{pack.name}.json")
    c.save(out)
    print(c.to_json())
    print(f"wrote {out}", file=sys.stderr)
    for f in ds.failures:
        print(f"  not used: {f}", file=sys.stderr)
    for s in c.per_source:
        r = s.rates
        print(
            f"  {s.source}: FMR {r.fmr:.2e} ({r.false_matches}/{r.impostor_pairs}),"
            f" FNMR {r.fnmr:.2%} ({r.false_non_matches}/{r.genuine_pairs})",
            file=sys.stderr,
        )
    if c.turned is not None:
        r = c.turned.rates
        print(
            f"  turned faces: threshold {c.turned.threshold:.6f}, FMR {r.fmr:.2e} "
            f"({r.false_matches}/{r.impostor_pairs}), FNMR {r.fnmr:.2%} "
            f"({r.false_non_matches}/{r.genuine_pairs})",
            file=sys.stderr,
        )
    if c.skewed_sources():
        print(f"WARNING: uneven sources at this threshold: {c.skewed_sources()}", file=sys.stderr)
    return 0
