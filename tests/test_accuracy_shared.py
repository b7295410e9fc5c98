"""The built-in packs' accuracy on the shared real photos (../shared/data/faces).

Describes every photo once with each real pack (yunet-sface, the default, in seconds; dlib
in about a minute on this machine) as the service does, then checks properties that a
broken pipeline, a wrong distance or a leaky calibration would fail. Skips when the
shared data is absent.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from facesvc.accuracy.evaluation import (
    DescriptorSet,
    FrameSimulation,
    Lever,
    ScanProtocol,
    cross_validation,
    describe_photos,
    evaluate_lever,
    fnmr_at_fmr,
    identity_folds,
    open_pose,
    scan_identity_folders,
    threshold_at_fmr,
)
from facesvc.commands.accuracy import read_photo
from facesvc.config import load_settings
from facesvc.models.matching import Distance, FrameRule, MatchRules, TemplateRule
from facesvc.models.pack import PackContext
from facesvc.models.packs import default_registry
from facesvc.models.pipeline import FacePipeline

pytestmark = [pytest.mark.shared_data, pytest.mark.slow, pytest.mark.timeout(1500)]


def faces_folder() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("FACESVC_SHARED_DATA", default)) / "faces"
    if not path.is_dir():
        pytest.skip(f"shared faces not found at {path}")
    return path


OVEREXPOSED = {
    "0004_01_06_03_116.jpg",
    "0006_00_06_03_131.jpg",
    "0012_01_07_03_240.jpg",
    "0012_01_07_03_445.jpg",
    "0012_01_07_03_67.jpg",
    "0014_01_06_03_251.jpg",
    "0014_01_06_03_440.jpg",
    "0014_01_06_03_60.jpg",
}
"""NUAA frames whose face is over 215 grey and a quarter clipped: the exposure gate refuses
them whatever the pack."""


@pytest.fixture(scope="module", params=["yunet-sface", "dlib"])
def described(request: pytest.FixtureRequest) -> DescriptorSet:
    faces = faces_folder()
    settings = load_settings(env={})
    pack = default_registry().load(
        request.param,
        PackContext(settings.models.cache_dir, 1, None, logging.getLogger("test_accuracy")),
    )
    limits = settings.quality
    pipeline = FacePipeline(pack.detector, pack.landmarks, pack.embedder, open_pose(limits))
    described = describe_photos(
        scan_identity_folders(faces),
        read_photo,
        pipeline,
        pack=pack.tag,
        simulation=FrameSimulation(variants=2),
    )
    return described.posed(pack.frontal or described.frontal_pose()[0], limits)


TURNED_CROP = "stuart5.png"
"""A 150x150 crop of a head turned about 40 degrees, its far side cut off: YuNet's own
points measure 57 degrees, and the profile gate (45) refuses it."""


def test_every_photo_has_a_face_but_the_overexposed(described: DescriptorSet) -> None:
    """As served: every face found and measured, and the quality gates refuse only the
    eight overexposed webcam frames and, with a detector that gives its own points, the one
    strongly turned crop (no portrait fails the pose gates)."""
    refused = {Path(f.split(": ")[0]).name: f.split(": ")[1] for f in described.failures}
    expected = dict.fromkeys(OVEREXPOSED, "LOW_QUALITY")
    if described.pack.startswith("yunet-sface@"):
        expected[TURNED_CROP] = "head pose outside the quality gates"
    assert refused == expected
    assert len(described.paths) == 115 - len(expected) and len(described.identities) == 31


@pytest.mark.parametrize("distance", list(Distance))
def test_genuine_pairs_are_closer_than_impostors_in_every_source(
    described: DescriptorSet, distance: Distance
) -> None:
    pairs = described.single_photo_comparisons(distance)
    for source in sorted(set(pairs.sources)):
        own = pairs.of_source(source)
        genuine, impostor = own.distance[own.genuine], own.distance[~own.genuine]
        assert genuine.mean() < impostor.mean(), source
        # and clearly so: the genuine mean sits below the impostors' 10th percentile
        assert genuine.mean() < np.quantile(impostor, 0.1), source


def test_threshold_from_one_half_holds_on_the_other(described: DescriptorSet) -> None:
    """A threshold at FMR 1e-2 calibrated on one half of the people gives at most 3e-2 on
    the other half (about 1500 impostor pairs each: ~15 false matches expected)."""
    folds = identity_folds(described.identities, 2, seed=0)
    dlib = described.pack.startswith("dlib@")  # the pack that compares around a centre
    for calibration, report in cross_validation(len(described.identities), folds):
        centre = described.centre_of(calibration) if dlib else None
        pairs = described.single_photo_comparisons(Distance.COSINE, centre)
        cal, rep = pairs.within(calibration), pairs.within(report)
        threshold = threshold_at_fmr(cal.distance[~cal.genuine], 1e-2)
        fmr = float(np.mean(rep.distance[~rep.genuine] <= threshold))
        assert int((~rep.genuine).sum()) > 1000
        assert fmr <= 3e-2


def test_centred_cosine_and_fusion_beat_single_photo_l2(described: DescriptorSet) -> None:
    """The issue-11 levers for dlib, on report folds only: each must lower FNMR at FMR 1e-2."""
    if not described.pack.startswith("dlib@"):
        pytest.skip("dlib's levers: SFace loses nothing to fix with them (next test)")
    folds = identity_folds(described.identities, 2, seed=0)

    def fnmr(lever: Lever) -> float:
        result = evaluate_lever(described, lever, folds, 1e-3, bootstrap_rounds=0)
        report = result.validated.report
        return fnmr_at_fmr(report.distance[report.genuine], report.distance[~report.genuine], 1e-2)

    single = ScanProtocol(enroll=1, frames=1, min_photos=3)
    fused = ScanProtocol(enroll=2, frames=3, min_photos=3)
    l2 = fnmr(Lever("l2", MatchRules(Distance.L2), single))
    centred = fnmr(Lever("centred", MatchRules(Distance.COSINE), single, centred=True))
    default = MatchRules(Distance.COSINE, TemplateRule.MEAN, FrameRule.MEAN_DESCRIPTOR)
    both = fnmr(Lever("fused", default, fused, centred=True))
    assert centred < l2
    assert both < centred


def test_sface_separates_every_pair_and_plain_cosine_beats_centred(
    described: DescriptorSet,
) -> None:
    """yunet-sface: no genuine pair lost at FMR 1e-3 on held-out identities, and the centre
    that rescued dlib raises the held-out FMR at the calibrated thresholds (the measurement
    that makes the pack's calibration plain cosine)."""
    if not described.pack.startswith("yunet-sface@"):
        pytest.skip("the default pack's properties")
    folds = identity_folds(described.identities, 2, seed=0)
    single = ScanProtocol(enroll=1, frames=1, min_photos=3)
    plain = evaluate_lever(
        described, Lever("plain", MatchRules(Distance.COSINE), single), folds, 1e-3, 0
    )
    centred = evaluate_lever(
        described,
        Lever("centred", MatchRules(Distance.COSINE), single, centred=True),
        folds,
        1e-3,
        0,
    )
    report = plain.validated.report
    genuine, impostor = report.distance[report.genuine], report.distance[~report.genuine]
    assert fnmr_at_fmr(genuine, impostor, 1e-3) == 0.0
    assert plain.within["all"].fnmr <= 0.03
    assert centred.within["all"].fmr > 2 * plain.within["all"].fmr


@pytest.mark.parametrize("photo", ["image00475.jpg", "image02420.jpg"])
def test_a_profile_is_refused_though_the_landmark_model_draws_it_frontal(photo: str) -> None:
    """AFLW2000-3D profiles (labelled 65.6 and 70.9 degrees of yaw): dlib's five points,
    fitted in YuNet's box, put them inside the 30-degree yaw gate; YuNet's own points see
    the profile, and the default pack refuses them for it."""
    path = faces_folder().parent / "poses" / "aflw2000_prnet__one_image_per_person" / photo
    if not path.is_file():
        pytest.skip(f"shared pose photo not found at {path}")
    settings = load_settings(env={})
    pack = default_registry().load(
        "yunet-sface",
        PackContext(settings.models.cache_dir, 1, None, logging.getLogger("test_profile")),
    )
    image = read_photo(path)
    no_profile_gate = replace(settings.quality, max_profile_yaw_deg=90.0)
    for limits, refused in ((no_profile_gate, False), (settings.quality, True)):
        pipeline = FacePipeline(
            pack.detector, pack.landmarks, pack.embedder, limits, frontal=pack.frontal
        )
        analysis = pipeline.analyze(image)
        assert analysis.quality is not None and analysis.quality.face_px >= limits.min_face_px
        assert abs(analysis.quality.pose.yaw) <= limits.max_abs_yaw_deg
        assert ("in profile" in analysis.reason) is refused, analysis.reason
