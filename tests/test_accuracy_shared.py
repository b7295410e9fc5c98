"""The default pack's accuracy on the shared real photos (../shared/data/faces).

Describes every photo once with the real dlib pack (about a minute or two on this
machine), then checks properties that a broken pipeline, a wrong distance or a leaky
calibration would fail. Skips when the shared data is absent.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from facesvc.accuracy_cli import read_photo
from facesvc.config import load_settings
from facesvc.evaluation import (
    DescriptorSet,
    FrameSimulation,
    Lever,
    ScanProtocol,
    cross_validation,
    describe_photos,
    evaluate_lever,
    fnmr_at_fmr,
    identity_folds,
    scan_identity_folders,
    threshold_at_fmr,
)
from facesvc.models.matching import Distance, FrameRule, MatchRules, TemplateRule
from facesvc.models.packs import PackContext, default_registry

pytestmark = [pytest.mark.shared_data, pytest.mark.slow, pytest.mark.timeout(1500)]


def faces_folder() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("FACESVC_SHARED_DATA", default)) / "faces"
    if not path.is_dir():
        pytest.skip(f"shared faces not found at {path}")
    return path


@pytest.fixture(scope="module")
def described() -> DescriptorSet:
    faces = faces_folder()
    settings = load_settings(env={})
    pack = default_registry().load(
        "dlib",
        PackContext(settings.models.cache_dir, 1, None, logging.getLogger("test_accuracy")),
    )
    return describe_photos(
        scan_identity_folders(faces),
        read_photo,
        pack.detector,
        pack.landmarks,
        pack.embedder,
        pack=pack.tag,
        min_face_px=60,
        simulation=FrameSimulation(variants=2),
    )


def test_every_photo_has_a_face(described: DescriptorSet) -> None:
    assert described.failures == ()
    assert len(described.paths) == 115 and len(described.identities) == 31


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
    for calibration, report in cross_validation(len(described.identities), folds):
        centre = described.centre_of(calibration)
        pairs = described.single_photo_comparisons(Distance.COSINE, centre)
        cal, rep = pairs.within(calibration), pairs.within(report)
        threshold = threshold_at_fmr(cal.distance[~cal.genuine], 1e-2)
        fmr = float(np.mean(rep.distance[~rep.genuine] <= threshold))
        assert int((~rep.genuine).sum()) > 1000
        assert fmr <= 3e-2


def test_centred_cosine_and_fusion_beat_single_photo_l2(described: DescriptorSet) -> None:
    """The issue-11 levers, on report folds only: each must lower FNMR at FMR 1e-2."""
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
