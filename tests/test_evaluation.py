"""Biometric metrics on synthetic score sets whose answers are known by hand."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from facesvc.accuracy.evaluation import (
    Comparisons,
    DescriptorSet,
    ScanProtocol,
    cross_validate,
    cross_validation,
    equal_error_rate,
    fmr_resolvable,
    fnmr_at_fmr,
    identity_folds,
    impostors_needed,
    pairwise_comparisons,
    rates_at,
    roc_auc,
    scan_comparisons,
    scan_identity_folders,
    source_of,
    summarize,
    threshold_at_fmr,
    write_det_plot,
)
from facesvc.models.matching import MatchRules


def arr(*v: float) -> np.ndarray:
    return np.array(v, dtype=np.float64)


def test_source_is_the_folder_prefix() -> None:
    assert source_of("nuaa__client0001") == "nuaa"
    assert source_of("face_recognition_pr1285__paul_allen") == "face_recognition_pr1285"
    assert source_of("plain") == "plain"


def test_perfect_separation_has_zero_eer_and_unit_auc() -> None:
    genuine, impostor = arr(0.1, 0.2, 0.3), arr(0.6, 0.7, 0.8, 0.9)
    assert equal_error_rate(genuine, impostor) == 0.0
    assert roc_auc(genuine, impostor) == 1.0
    assert fnmr_at_fmr(genuine, impostor, 1e-3) == 0.0


def test_inverted_scores_have_unit_eer_and_zero_auc() -> None:
    genuine, impostor = arr(0.8, 0.9), arr(0.1, 0.2)
    assert equal_error_rate(genuine, impostor) == 1.0
    assert roc_auc(genuine, impostor) == 0.0


def test_auc_counts_ties_as_half() -> None:
    assert roc_auc(arr(0.5), arr(0.5)) == 0.5
    # genuine 0.2 beats both impostors, genuine 0.6 beats 0.7 only: 3 of 4.
    assert roc_auc(arr(0.2, 0.6), arr(0.5, 0.7)) == 0.75


def test_eer_interpolates_where_the_rates_cross() -> None:
    # Thresholds at 0.4: FMR 0/2, FNMR 1/2 -> at 0.5: FMR 1/2, FNMR 1/2 -> crossing at 0.5.
    assert equal_error_rate(arr(0.1, 0.5), arr(0.4, 0.9)) == pytest.approx(0.5)
    # 4 genuine, 4 impostor, one of each on the wrong side: EER = 1/4.
    genuine, impostor = arr(0.1, 0.2, 0.3, 0.75), arr(0.25, 0.8, 0.85, 0.9)
    assert equal_error_rate(genuine, impostor) == pytest.approx(0.25)


def test_fnmr_at_fmr_on_a_hand_made_example() -> None:
    # 10 impostors at 0.10 .. 1.00; FMR 0.1 allows exactly one: threshold just below 0.20.
    impostor = np.linspace(0.1, 1.0, 10)
    genuine = arr(0.05, 0.15, 0.19, 0.2, 0.3)
    threshold = threshold_at_fmr(impostor, 0.1)
    assert 0.19 < threshold < 0.2
    assert rates_at(threshold, genuine, impostor) == (0.1, 0.4)
    assert fnmr_at_fmr(genuine, impostor, 0.1) == pytest.approx(0.4)
    # FMR 0.05 with 10 impostors allows none: threshold just below the closest impostor.
    assert fnmr_at_fmr(genuine, impostor, 0.05) == pytest.approx(0.8)


def test_threshold_never_splits_tied_impostors() -> None:
    impostor = arr(0.3, 0.3, 0.3, 0.9)
    threshold = threshold_at_fmr(impostor, 0.5)  # allows 2, but 3 are tied at 0.3
    assert threshold < 0.3
    assert rates_at(threshold, arr(0.1), impostor)[0] == 0.0


def test_fmr_resolution_needs_enough_impostors() -> None:
    assert not fmr_resolvable(999, 1e-3)
    assert fmr_resolvable(1000, 1e-3)
    assert fmr_resolvable(100, 1e-2)


def binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("pairs", [2995, 5508, 10227, 40000])
def test_a_confident_threshold_accepts_only_what_the_pairs_show(pairs: int) -> None:
    impostor = np.linspace(0.3, 1.0, pairs)
    threshold = threshold_at_fmr(impostor, 1e-3, confidence=0.95)
    accepted = int(np.sum(impostor <= threshold))
    # Clopper-Pearson: with `accepted` false matches the 95% upper bound is still <= 1e-3,
    # with one more it is not.
    assert binomial_cdf(accepted, pairs, 1e-3) <= 0.05 < binomial_cdf(accepted + 1, pairs, 1e-3)
    assert threshold <= threshold_at_fmr(impostor, 1e-3)  # never looser than the estimate


def test_too_few_pairs_cannot_show_a_rate_and_say_how_many_it_takes() -> None:
    needed = impostors_needed(1e-3, 0.95)
    assert (1 - 1e-3) ** needed <= 0.05 < (1 - 1e-3) ** (needed - 1)
    with pytest.raises(ValueError, match=f"at least {needed} are needed"):
        threshold_at_fmr(np.linspace(0.3, 1.0, needed - 1), 1e-3, confidence=0.95)
    assert threshold_at_fmr(np.linspace(0.3, 1.0, needed), 1e-3, confidence=0.95) < 0.3


def synthetic(identities: int, photos: int, separation: float, seed: int = 0) -> Comparisons:
    """Random descriptors: each identity a centre, its photos near it."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, 16))
    x = np.repeat(centres, photos, axis=0) + rng.normal(size=(identities * photos, 16)) / separation
    image_identity = np.repeat(np.arange(identities), photos)
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    names = [f"{'a' if k % 2 else 'b'}__p{k}" for k in range(identities)]
    return pairwise_comparisons(d, image_identity, names)


def test_pairwise_counts_and_sources() -> None:
    c = synthetic(identities=6, photos=3, separation=3.0)
    assert int(c.genuine.sum()) == 6 * 3
    assert int((~c.genuine).sum()) == 18 * 17 // 2 - 18
    a = c.of_source("a")
    assert set(a.claimed) | set(a.probe) == {1, 3, 5}


def test_bootstrap_interval_contains_the_point_estimate() -> None:
    s = summarize(synthetic(identities=20, photos=4, separation=1.5), bootstrap_rounds=200)
    for iv in (s.auc, s.eer, s.fnmr_at[0].fnmr):
        assert iv.low <= iv.value <= iv.high
    assert s.auc.low < s.auc.high  # a real spread, not a degenerate interval
    assert s.genuine_count == 20 * 6
    assert s.impostor_count == 80 * 79 // 2 - 120
    assert s.fnmr_at[0].resolvable and s.fnmr_at[1].resolvable


def test_identity_folds_are_disjoint_complete_and_stratified() -> None:
    names = [f"s{k % 3}__p{k}" for k in range(31)]
    folds = identity_folds(names, 3, seed=1)
    joined = np.concatenate(folds)
    assert sorted(joined.tolist()) == list(range(31))
    for calibration, report in cross_validation(31, folds):
        assert np.intersect1d(calibration, report).size == 0
        assert calibration.size + report.size == 31
    for fold in folds:  # every source present in every fold
        assert {names[k].split("__")[0] for k in fold} == {"s0", "s1", "s2"}


def test_cross_validation_judges_each_fold_by_the_other() -> None:
    c = synthetic(identities=30, photos=3, separation=2.0, seed=3)
    folds = identity_folds(c.identities, 2)
    cv = cross_validate(lambda _: c, len(c.identities), folds, 1e-2)
    inside = sum(c.within(f).distance.size for f in folds)
    op = cv.operating()
    assert op.genuine_count + op.impostor_count == inside < c.distance.size
    assert len(cv.thresholds) == 2
    # Each fold's threshold is set on the other fold alone, and judges only its own pairs.
    for threshold, judged, other in zip(cv.thresholds, folds, reversed(folds), strict=True):
        cal = c.within(other)
        assert threshold == threshold_at_fmr(cal.distance[~cal.genuine], 1e-2)
        in_fold = np.isin(cv.report.claimed, judged)
        assert np.all(cv.applied[in_fold] == threshold)


def test_per_source_calibration_sets_a_threshold_per_source() -> None:
    c = synthetic(identities=40, photos=3, separation=2.0, seed=4)
    folds = identity_folds(c.identities, 2)
    cv = cross_validate(lambda _: c, len(c.identities), folds, 1e-2, per_source=True)
    assert len(cv.thresholds) == 4  # 2 folds x 2 sources
    sources = np.array(c.sources)
    for source in ("a", "b"):
        both, claimed = cv.source_masks(source)
        assert np.all(sources[cv.report.claimed[claimed]] == source)
        assert np.all(both <= claimed)
        assert len(set(cv.applied[claimed])) == 2  # one threshold per fold


def test_det_plot_is_a_png(tmp_path: Path) -> None:
    out = tmp_path / "det.png"
    write_det_plot({"all": synthetic(8, 3, 2.0)}, out, "synthetic")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scan_identity_folders_rejects_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        scan_identity_folders(tmp_path)
    (tmp_path / "x__a").mkdir()
    (tmp_path / "x__a" / "1.jpg").write_bytes(b"")
    (tmp_path / "x__a" / "notes.txt").write_text("")
    found = scan_identity_folders(tmp_path)
    assert [(f.identity, f.path.name, f.source) for f in found] == [("x__a", "1.jpg", "x")]


def tiny_set(variants: int) -> DescriptorSet:
    rng = np.random.default_rng(0)
    counts = [3, 4, 2]
    image_identity = np.repeat(np.arange(3), counts)
    centres = rng.normal(size=(3, 8))
    d = centres[image_identity] + 0.1 * rng.normal(size=(9, 8))
    v = d[:, None, :] + 0.1 * rng.normal(size=(9, variants, 8))
    return DescriptorSet(
        pack="t",
        identities=("s__a", "s__b", "s__c"),
        image_identity=image_identity,
        paths=tuple(f"{k}.jpg" for k in range(9)),
        descriptors=d,
        variants=v,
        failures=(),
    )


def with_landmarks(ds: DescriptorSet) -> DescriptorSet:
    return replace(ds, landmarks=np.arange(len(ds.paths) * 10.0).reshape(-1, 5, 2))


def test_at_most_keeps_photos_spread_over_each_identity() -> None:
    ds = with_landmarks(tiny_set(variants=1))  # identities with 3, 4 and 2 photos, in order
    two = ds.at_most(2)
    assert two.paths == ("0.jpg", "2.jpg", "3.jpg", "6.jpg", "7.jpg", "8.jpg")
    assert two.image_identity.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(two.descriptors, ds.descriptors[[0, 2, 3, 6, 7, 8]])
    assert np.array_equal(two.landmarks, ds.landmarks[[0, 2, 3, 6, 7, 8]])
    assert two.failures == ()  # left out, not failed
    assert ds.at_most(4).paths == ds.paths


def test_pooled_sets_keep_each_photo_with_its_person() -> None:
    ds = with_landmarks(tiny_set(variants=1))
    other = replace(ds.at_most(1), identities=("t__x", "t__y", "t__z"))
    both = DescriptorSet.pooled([ds, other])
    assert both.identities == ds.identities + other.identities
    assert [both.identities[i] for i in both.image_identity[9:]] == ["t__x", "t__y", "t__z"]
    assert np.array_equal(both.descriptors[9:], other.descriptors)
    with pytest.raises(ValueError, match="two collections"):
        DescriptorSet.pooled([ds, ds])


def test_scan_protocol_counts() -> None:
    ds = tiny_set(variants=2)
    # K=1, F=1, min 3 photos: identities a (3) and b (4) only.
    c = scan_comparisons(ds, ScanProtocol(enroll=1, frames=1, min_photos=3), MatchRules())
    assert int(c.genuine.sum()) == 3 * 2 + 4 * 3
    # each of a's 3 templates sees b's 4 scans, and each of b's 4 sees a's 3
    assert int((~c.genuine).sum()) == 3 * 4 + 4 * 3
    assert 2 not in set(c.claimed) | set(c.probe)
    # K=1 F=1 is symmetric: each ordered pair appears once in each direction
    single = ds.single_photo_comparisons(MatchRules().distance).within([0, 1])
    assert sorted(c.distance[c.genuine]) == pytest.approx(
        sorted(np.repeat(single.distance[single.genuine], 2))
    )


def test_scan_protocol_refuses_frames_it_cannot_simulate() -> None:
    ds = tiny_set(variants=0)
    with pytest.raises(ValueError, match="variants"):
        scan_comparisons(ds, ScanProtocol(enroll=1, frames=3, min_photos=3), MatchRules())


def test_descriptor_set_round_trips(tmp_path: Path) -> None:
    ds = tiny_set(variants=1)
    ds.save(tmp_path / "d.npz")
    back = DescriptorSet.load(tmp_path / "d.npz")
    assert back.identities == ds.identities and back.paths == ds.paths
    np.testing.assert_array_equal(back.variants, ds.variants)
    assert math.isclose(float(back.descriptors.sum()), float(ds.descriptors.sum()))
