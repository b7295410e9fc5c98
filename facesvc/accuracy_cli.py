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
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from facesvc.calibration import DEFAULT_TARGET_FMR, CalibrationData, calibrate
from facesvc.config import load_settings
from facesvc.evaluation import (
    DescriptorSet,
    FrameSimulation,
    Lever,
    LeverResult,
    ScanProtocol,
    describe_photos,
    evaluate_lever,
    identity_folds,
    lever_table,
    scan_identity_folders,
    source_table,
    write_det_plot,
)
from facesvc.models.matching import Distance, FrameRule, MatchRules, TemplateRule
from facesvc.models.packs import ModelPack, PackContext, default_registry
from facesvc.models.types import RGBImage

log = logging.getLogger("facesvc.accuracy")

MIN_PHOTOS = 3
"""Scan levers use identities with at least this many photos (enrol 2, hold out 1), so
every lever in one report compares the same people."""


def read_photo(path: Path) -> RGBImage:
    """A photo from a trusted evaluation folder as (H, W, 3) uint8 RGB, EXIF orientation applied."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)


def _load_pack(name: str | None, calibration: Path | None = None) -> ModelPack:
    settings = load_settings()
    context = PackContext(
        cache_dir=settings.models.cache_dir,
        threads=settings.models.threads,
        calibration_override=calibration,
        logger=log,
    )
    return default_registry().load(name or settings.models.pack, context)


def describe(
    pack: ModelPack,
    data: Path,
    cache: Path | None,
    simulation: FrameSimulation,
    min_face_px: int,
) -> DescriptorSet:
    """The pack's descriptors for ``data``, from ``cache`` when it holds this pack's."""
    if cache is not None and cache.is_file():
        cached = DescriptorSet.load(cache)
        if cached.pack == pack.tag and cached.variants.shape[1] >= simulation.variants:
            print(f"descriptors from cache {cache}", file=sys.stderr)
            return cached
    images = scan_identity_folders(data)
    print(f"describing {len(images)} photos with {pack.tag} ...", file=sys.stderr, flush=True)
    ds = describe_photos(
        images,
        read_photo,
        pack.detector,
        pack.landmarks,
        pack.embedder,
        pack=pack.tag,
        min_face_px=min_face_px,
        simulation=simulation,
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        ds.save(cache)
    return ds


def standard_levers(full: bool) -> list[Lever]:
    """The comparisons ``facesvc eval`` reports, one lever at a time.

    Distances first (L2, cosine, cosine around the calibration centre), then frames and
    enrolment photos with the centred cosine, then per-source calibration on top of the
    default rules. With ``full`` every frame and template rule is measured (how the
    defaults were chosen); otherwise only the default and the runner-up.
    """
    cos, l2 = Distance.COSINE, Distance.L2
    mean, mean_desc = TemplateRule.MEAN, FrameRule.MEAN_DESCRIPTOR

    def scan(k: int, f: int) -> ScanProtocol:
        return ScanProtocol(enroll=k, frames=f, min_photos=MIN_PHOTOS)

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
            label = f"1 photo, {frames} frames ({frame_rule.value}), centred cosine"
            levers.append(Lever(label, r, scan(1, frames), centred=True))
    template_rules = list(TemplateRule) if full else [mean, TemplateRule.NEAREST]
    for template_rule in template_rules:
        r = MatchRules(cos, template_rule, mean_desc)
        label = f"2 photos ({template_rule.value}), 1 frame, centred cosine"
        levers.append(Lever(label, r, scan(2, 1), centred=True))
    for frames in (3, 5):
        label = f"2 photos (mean), {frames} frames (mean-descriptor), centred cosine"
        levers.append(Lever(label, MatchRules(cos, mean, mean_desc), scan(2, frames), centred=True))
    levers.append(
        Lever(
            "2 photos (mean), 3 frames (mean-descriptor), centred cosine, per-source threshold",
            MatchRules(cos, mean, mean_desc),
            scan(2, 3),
            centred=True,
            per_source=True,
        )
    )
    return levers


def _report(ds: DescriptorSet, results: Sequence[LeverResult], folds: int, seed: int) -> str:
    lines = [
        f"# Accuracy of {ds.pack}",
        "",
        f"{len(ds.paths)} photos of {len(ds.identities)} identities described, "
        f"{len(ds.failures)} without a usable face"
        + (": " + ", ".join(Path(f).name for f in ds.failures) if ds.failures else "")
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


def _on_det_plot(lever: Lever) -> bool:
    """The enrolment/scan levers with the default template and frame rules (a readable plot)."""
    return (
        lever.protocol is not None
        and not lever.per_source
        and lever.rules.template is TemplateRule.MEAN
        and (lever.protocol.frames == 1 or lever.rules.frames is FrameRule.MEAN_DESCRIPTOR)
    )


def run_eval(args: argparse.Namespace) -> int:
    pack = _load_pack(args.pack)
    simulation = FrameSimulation(variants=args.variants, seed=args.seed)
    ds = describe(pack, args.data, args.cache, simulation, args.min_face_px)
    folds = identity_folds(ds.identities, args.folds, seed=args.seed)
    results = []
    for lever in standard_levers(args.full):
        print(f"measuring: {lever.label}", file=sys.stderr, flush=True)
        results.append(evaluate_lever(ds, lever, folds, DEFAULT_TARGET_FMR, args.bootstrap))
    report = _report(ds, results, args.folds, args.seed)
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


def run_calibrate(args: argparse.Namespace) -> int:
    # Calibrating must not require the calibration it replaces: load the pack without one.
    pack = _load_pack(args.pack, calibration=None)
    ds = describe(pack, args.data, args.cache, FrameSimulation(variants=0), args.min_face_px)
    everyone = np.arange(len(ds.identities), dtype=np.int64)
    centre = ds.centre_of(everyone) if pack.distance is Distance.COSINE else None
    pairs = ds.single_photo_comparisons(pack.distance, centre)
    c = calibrate(
        pairs,
        pack=pack.name,
        pack_digest=pack.digest,
        distance=pack.distance,
        data=CalibrationData(
            folder=args.data.name,
            sources=tuple(sorted(set(pairs.sources))),
            identities=len(ds.identities),
            images=len(ds.paths),
            detection_failures=len(ds.failures),
        ),
        target_fmr=args.fmr,
        centre=None if centre is None else centre.tolist(),
    )
    out: Path = args.out or Path(f"calibration-{pack.name}.json")
    c.save(out)
    print(c.to_json())
    print(f"wrote {out}", file=sys.stderr)
    for s in c.per_source:
        r = s.rates
        print(
            f"  {s.source}: FMR {r.fmr:.2e} ({r.false_matches}/{r.impostor_pairs}),"
            f" FNMR {r.fnmr:.2%} ({r.false_non_matches}/{r.genuine_pairs})",
            file=sys.stderr,
        )
    if c.skewed_sources():
        print(f"WARNING: uneven sources at this threshold: {c.skewed_sources()}", file=sys.stderr)
    return 0
