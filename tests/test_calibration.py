"""Calibration: threshold at a target FMR, provenance, round trip and start-up log lines."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from facesvc.accuracy.calibrate import calibrate
from facesvc.accuracy.evaluation import pairwise_comparisons
from facesvc.models.calibration import (
    Calibration,
    CalibrationData,
    CalibrationError,
    RatesAtThreshold,
    SourceRates,
    load_calibration,
    log_calibration_status,
)
from facesvc.models.matching import Distance
from tests.clocks import wib_at

pytestmark = pytest.mark.calendar


def two_source_pairs() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Source 'tight' packs its people close together (like NUAA), 'wide' spreads them."""
    rng = np.random.default_rng(7)
    names, rows, ids = [], [], []
    for k in range(40):
        source, spread = ("tight", 0.35) if k % 2 else ("wide", 1.0)
        names.append(f"{source}__p{k}")
        centre = rng.normal(size=32) * spread
        for _ in range(3):
            rows.append(centre + 0.15 * rng.normal(size=32))
            ids.append(k)
    return np.array(rows), np.array(ids), names


@pytest.fixture
def calibration() -> Calibration:
    x, ids, names = two_source_pairs()
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    pairs = pairwise_comparisons(d, ids, names)
    return calibrate(
        pairs,
        pack="test",
        pack_digest="sha256:abc",
        distance=Distance.L2,
        data=CalibrationData("synthetic", ("tight", "wide"), 40, 120, 1),
        target_fmr=1e-2,
        now=wib_at(10, 4, 5),
    )


def test_threshold_meets_the_target_on_its_own_pairs(calibration: Calibration) -> None:
    c = calibration
    assert c.overall.impostor_pairs == 120 * 119 // 2 - 120
    assert c.overall.genuine_pairs == 120
    assert c.overall.fmr <= 1e-2
    # the threshold is the largest one that does: one more impostor would exceed it
    assert c.overall.false_matches == int(1e-2 * c.overall.impostor_pairs)
    assert c.fmr_resolvable


def test_a_confident_calibration_accepts_fewer_impostors_and_says_so(
    calibration: Calibration, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x, ids, names = two_source_pairs()
    pairs = pairwise_comparisons(np.linalg.norm(x[:, None] - x[None], axis=2), ids, names)
    data = CalibrationData("synthetic", ("tight", "wide"), 40, 120, 1)
    shown = calibrate(
        pairs, pack="test", pack_digest="sha256:abc", distance=Distance.L2, data=data,
        target_fmr=1e-2, confidence=0.95,
    )  # fmt: skip
    assert shown.fmr_confidence == 0.95 and calibration.fmr_confidence is None
    assert shown.threshold < calibration.threshold
    assert 0 < shown.overall.false_matches < calibration.overall.false_matches
    path = tmp_path / "c.json"
    shown.save(path)
    assert load_calibration(path) == shown
    with caplog.at_level(logging.INFO):
        log_calibration_status(logging.getLogger("t"), "test", shown)
    assert "FMR <= 0.01 shown at 95% confidence" in caplog.records[0].getMessage()
    with pytest.raises(CalibrationError, match="at least 299 are needed"):
        calibrate(
            pairs.within(range(4)), pack="test", pack_digest="sha256:abc",
            distance=Distance.L2, data=data, target_fmr=1e-2, confidence=0.95,
        )  # fmt: skip


def test_records_without_a_confidence_load_as_point_estimates(
    calibration: Calibration, tmp_path: Path
) -> None:
    raw = json.loads(calibration.to_json())
    del raw["fmr_confidence"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw))
    assert load_calibration(path).fmr_confidence is None


def test_per_source_rates_show_the_uneven_population(calibration: Calibration) -> None:
    by = {s.source: s for s in calibration.per_source}
    assert set(by) == {"tight", "wide"}
    assert by["tight"].identities == 20
    assert by["tight"].rates.impostor_pairs == 60 * 59 // 2 - 60
    assert by["tight"].rates.fmr > by["wide"].rates.fmr
    assert calibration.skewed_sources() == ("tight",)


def test_a_source_is_called_uneven_only_when_its_pairs_show_it(
    calibration: Calibration, caplog: pytest.LogCaptureFixture
) -> None:
    """Above twice the overall FMR on a handful of false matches is logged as a question for
    more data; a warning needs pairs that show it at 95%."""
    few = SourceRates("few", 10, RatesAtThreshold(10, 631, 0, 2))  # 1.3 expected at 0.2%
    many = SourceRates("many", 10, RatesAtThreshold(10, 6310, 0, 30))  # 12.6 expected
    no_false_match = RatesAtThreshold(10, 10_000, 0, 0)
    uneven = replace(calibration, target_fmr=1e-3, overall=no_false_match, per_source=(few, many))
    assert uneven.skew_bound == pytest.approx(2e-3)
    assert few.rates.fmr > uneven.skew_bound and many.rates.fmr > uneven.skew_bound
    assert [(s.source, shown) for s, shown in uneven.sources_above_skew()] == [
        ("few", False),
        ("many", True),
    ]
    assert uneven.skewed_sources() == ("many",)
    with caplog.at_level(logging.INFO):
        log_calibration_status(logging.getLogger("t"), "test", uneven)
    levels = {
        r.getMessage().split("source ")[1].split()[0]: r.levelno
        for r in caplog.records
        if "source " in r.getMessage()
    }
    assert levels == {"'few'": logging.INFO, "'many'": logging.WARNING}


def test_round_trip(calibration: Calibration, tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    calibration.save(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == "facesvc-calibration/1"
    assert raw["distance"] == "l2"
    assert raw["per_source"][0]["fmr"] == calibration.per_source[0].rates.fmr
    back = load_calibration(path, pack="test", pack_digest="sha256:abc")
    assert back == calibration


def test_refuses_another_pack_or_version(calibration: Calibration, tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    calibration.save(path)
    with pytest.raises(CalibrationError, match="not 'other'"):
        load_calibration(path, pack="other")
    with pytest.raises(CalibrationError, match="re-run"):
        load_calibration(path, pack="test", pack_digest="sha256:def")
    with pytest.raises(CalibrationError, match="l2 distance, but the pack compares with cosine"):
        load_calibration(path, pack="test", distance=Distance.COSINE)


@pytest.mark.parametrize(
    "content",
    ["not json", json.dumps({"format": "x"}), json.dumps({"format": "facesvc-calibration/1"})],
)
def test_malformed_files_are_clear_errors(tmp_path: Path, content: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match="calibrate"):
        load_calibration(path)


def test_missing_file_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="facesvc calibrate"):
        load_calibration(tmp_path / "absent.json")


def test_uncalibrated_pack_is_logged_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        log_calibration_status(logging.getLogger("t"), "mypack", None)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert "UNCALIBRATED" in record.getMessage() and "mypack" in record.getMessage()


def test_calibrated_pack_logs_its_provenance_and_skew(
    calibration: Calibration, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        log_calibration_status(logging.getLogger("t"), "test", calibration)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages[0][0] == logging.INFO
    assert "sha256:abc" in messages[0][1] and f"{calibration.threshold:.6f}" in messages[0][1]
    assert any(level == logging.WARNING and "'tight'" in m for level, m in messages)
