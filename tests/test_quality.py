"""Quality gates and the one-face rule, on real faces through the real dlib pack: a blurred
face fails sharpness, a dark frame fails exposure, two faces are MULTIPLE_FACES and a small
face fails size, each with a reason that says what to do."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from facesvc.config import QualitySettings
from facesvc.models.alignment import ARCFACE_TEMPLATE_112
from facesvc.models.dlib.mmod import MMODFaceDetector
from facesvc.models.dlib.resnet import DlibResnetEmbedder
from facesvc.models.dlib.shape_predictor import ShapePredictorLandmarks
from facesvc.models.model_cache import ModelCache
from facesvc.models.pipeline import FacePipeline, FaceStatus
from facesvc.models.quality import (
    Check,
    FaceChoice,
    LandmarkLayout,
    QualityReport,
    assess_quality,
    exposure,
    head_pose,
    pose_issues,
    profile_yaw,
    select_face,
    sharpness,
)
from facesvc.models.types import Box, Detection, RGBImage

LANDMARKS_5 = (
    Path(str(importlib.resources.files("face_recognition_models") / "models"))
    / "shape_predictor_5_face_landmarks.dat"
)
LIMITS = QualitySettings()


@pytest.fixture(scope="module")
def models(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[MMODFaceDetector, ShapePredictorLandmarks, DlibResnetEmbedder]:
    cache = ModelCache(tmp_path_factory.mktemp("models"))
    return (
        MMODFaceDetector.load(cache, threads=2),
        ShapePredictorLandmarks.load(LANDMARKS_5),
        DlibResnetEmbedder.load(cache, threads=1),
    )


@pytest.fixture(scope="module")
def pipeline(
    models: tuple[MMODFaceDetector, ShapePredictorLandmarks, DlibResnetEmbedder],
) -> FacePipeline:
    return FacePipeline(*models, LIMITS)


@pytest.fixture(scope="module")
def astronaut() -> RGBImage:
    data = pytest.importorskip("skimage.data")
    image: RGBImage = np.ascontiguousarray(data.astronaut(), dtype=np.uint8)
    return image


def _checks(report: QualityReport | None) -> set[Check]:
    assert report is not None
    return {issue.check for issue in report.issues}


def test_sharp_frontal_face_is_ok(pipeline: FacePipeline, astronaut: RGBImage) -> None:
    analysis = pipeline.analyze(astronaut)
    assert analysis.status is FaceStatus.OK, analysis.reason
    assert analysis.faces == 1 and analysis.reasons == () and analysis.reason == ""
    assert analysis.chip is not None and analysis.chip.shape == (150, 150, 3)
    assert analysis.landmarks is not None and analysis.landmarks.shape == (5, 2)
    assert analysis.quality is not None and analysis.quality.passed
    assert analysis.quality.sharpness >= LIMITS.min_sharpness
    descriptors = pipeline.embed([analysis.chip, analysis.chip])
    assert descriptors.shape == (2, 128) and descriptors.dtype == np.float32
    assert np.allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)
    assert pipeline.embed([]).shape == (0, 128)


def test_blurred_face_fails_sharpness(pipeline: FacePipeline, astronaut: RGBImage) -> None:
    blurred = np.asarray(Image.fromarray(astronaut).filter(ImageFilter.GaussianBlur(3)))
    analysis = pipeline.analyze(blurred)
    assert analysis.status is FaceStatus.LOW_QUALITY
    assert _checks(analysis.quality) == {Check.SHARPNESS}
    assert "blurred" in analysis.reason and "hold still" in analysis.reason
    assert not analysis.only_pose_failed


def test_dark_image_fails_exposure(pipeline: FacePipeline, astronaut: RGBImage) -> None:
    dark = (astronaut.astype(np.float64) * 0.15).astype(np.uint8)
    analysis = pipeline.analyze(dark)
    assert analysis.status is FaceStatus.LOW_QUALITY
    assert Check.BRIGHTNESS in _checks(analysis.quality)
    # Measured at a standard contrast, a dim but focused face is dark, not blurred.
    assert Check.SHARPNESS not in _checks(analysis.quality)
    assert "too dark" in analysis.reason and "more light" in analysis.reason


def test_two_faces_side_by_side_are_multiple_faces(
    pipeline: FacePipeline, astronaut: RGBImage
) -> None:
    pair = np.ascontiguousarray(np.hstack([astronaut, astronaut[:, ::-1]]))
    analysis = pipeline.analyze(pair)
    assert analysis.status is FaceStatus.MULTIPLE_FACES
    assert analysis.faces >= 2 and analysis.detection is not None
    assert "more than one face" in analysis.reason


def test_small_face_fails_size(
    models: tuple[MMODFaceDetector, ShapePredictorLandmarks, DlibResnetEmbedder],
    astronaut: RGBImage,
) -> None:
    """Looking for faces down to 40 px finds a 46 px face and asks the person to come
    closer; with the default search (down to 80 px) the frame has no face."""
    small = np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.Resampling.BILINEAR))
    searching = QualitySettings(min_detect_px=40)
    analysis = FacePipeline(*models, searching).analyze(small)
    assert analysis.status is FaceStatus.LOW_QUALITY
    assert analysis.quality is not None
    assert searching.min_detect_px <= analysis.quality.face_px < searching.min_face_px
    assert _checks(analysis.quality) == {Check.FACE_SIZE}
    assert "come closer" in analysis.reason
    default = FacePipeline(*models, LIMITS).analyze(small)
    assert default.status is FaceStatus.NO_FACE and "close enough" in default.reason


def test_empty_frame_has_no_face(pipeline: FacePipeline) -> None:
    analysis = pipeline.analyze(np.full((240, 320, 3), 128, dtype=np.uint8))
    assert analysis.status is FaceStatus.NO_FACE and analysis.detection is None
    assert analysis.faces == 0 and "no face" in analysis.reason


def _det(left: float, side: float, score: float = 1.0) -> Detection:
    return Detection(Box(left, 0, left + side, side), score)


def test_one_face_rule() -> None:
    assert select_face([], LIMITS).choice is FaceChoice.NO_FACE
    one = select_face([_det(0, 200)], LIMITS)
    assert (one.choice, one.index) == (FaceChoice.ONE, 0)
    # The largest face is chosen; a face of at least half its area and usable size counts.
    two = select_face([_det(0, 120), _det(300, 150)], LIMITS)
    assert (two.choice, two.index) == (FaceChoice.MULTIPLE_FACES, 1)
    # Smaller than half the area (140**2 / 200**2 = 0.49): a bystander, ignored.
    assert select_face([_det(0, 200), _det(300, 140)], LIMITS).choice is FaceChoice.ONE
    # Comparable in area but below the usable size: ignored too.
    assert select_face([_det(0, 70), _det(300, 70)], LIMITS).choice is FaceChoice.ONE


def test_head_pose_signs_follow_the_image() -> None:
    """A synthetic frontal face gives zero angles; moving the nose right turns yaw positive;
    tilting the eye line clockwise turns roll positive; mirroring flips yaw."""
    frontal = np.array([[130, 100], [110, 100], [50, 100], [70, 100], [90, 146]], np.float32)
    pose = head_pose(frontal, LandmarkLayout.DLIB_5)
    assert abs(pose.yaw) < 1 and abs(pose.roll) < 1 and abs(pose.pitch) < 3
    turned = frontal.copy()
    turned[4, 0] += 20
    assert head_pose(turned, LandmarkLayout.DLIB_5).yaw > 15
    mirrored = turned.copy()
    mirrored[:, 0] = 180 - mirrored[:, 0]
    assert head_pose(mirrored, LandmarkLayout.DLIB_5).yaw < -15
    tilted = frontal.copy()
    tilted[:2, 1] += 20  # the eye on the image right drops: clockwise
    assert head_pose(tilted, LandmarkLayout.DLIB_5).roll > 10
    with pytest.raises(ValueError, match=r"\(68, 2\)"):
        head_pose(frontal, LandmarkLayout.DLIB_68)


def test_head_pose_of_the_arcface_template_is_frontal() -> None:
    """SCRFD packs give ArcFace's five points (eyes, nose tip, mouth corners) instead."""
    pose = head_pose(ARCFACE_TEMPLATE_112, LandmarkLayout.ARCFACE_5)
    assert abs(pose.yaw) < 1 and abs(pose.pitch) < 1 and abs(pose.roll) < 1
    turned = ARCFACE_TEMPLATE_112.copy()
    turned[2, 0] -= 8  # nose tip towards the image left
    assert head_pose(turned, LandmarkLayout.ARCFACE_5).yaw < -15


def _arcface_turned(nose_shift: float) -> np.ndarray:
    """ArcFace's five template points with the nose tip moved sideways (112 px chip)."""
    points = ARCFACE_TEMPLATE_112.astype(np.float32).copy()
    points[2, 0] += nose_shift
    return points


def test_the_profile_gate_reads_the_detectors_own_points() -> None:
    """The pack's landmarks say frontal; the detector's five points decide the profile."""
    frontal = head_pose(ARCFACE_TEMPLATE_112, LandmarkLayout.ARCFACE_5)
    assert profile_yaw(None) is None
    assert profile_yaw(_arcface_turned(0)) == pytest.approx(0, abs=1)
    side = float(profile_yaw(_arcface_turned(25)) or 0)
    assert side > LIMITS.max_profile_yaw_deg  # the nose tip past the eye: a profile
    mild = float(profile_yaw(_arcface_turned(-12)) or 0)
    assert -LIMITS.max_profile_yaw_deg < mild < -LIMITS.max_abs_yaw_deg  # turned, no profile
    assert pose_issues(frontal, None, LIMITS) == ()
    assert pose_issues(frontal, mild, LIMITS) == ()
    (issue,) = pose_issues(frontal, side, LIMITS)
    assert issue.check is Check.YAW and "in profile" in issue.reason
    # A turn the pack's landmarks see is reported once, as theirs.
    turned = type(frontal)(frontal.yaw + 40, frontal.pitch, frontal.roll)
    (issue,) = pose_issues(turned, side, LIMITS)
    assert issue.check is Check.YAW and "in profile" not in issue.reason


def test_a_detection_with_profile_points_fails_the_yaw_check(
    pipeline: FacePipeline, astronaut: RGBImage
) -> None:
    """assess_quality hands the detection's own points to the profile gate: the same
    frontal face, landmarks and chip fail YAW once the detector's points show a profile."""
    analysis = pipeline.analyze(astronaut)
    assert analysis.detection is not None and analysis.landmarks is not None
    assert analysis.chip is not None and analysis.detection.landmarks is None  # MMOD
    box = analysis.detection.box
    scale = (box.right - box.left) / 112
    points = _arcface_turned(25) * scale + np.array([box.left, box.top], np.float32)
    for detector_points, passed in ((None, True), (points, False)):
        detection = Detection(box, analysis.detection.score, detector_points)
        report = assess_quality(
            astronaut, detection, analysis.landmarks, pipeline.layout, analysis.chip, LIMITS
        )
        assert report.passed is passed
        assert _checks(report) == (set() if passed else {Check.YAW})


def test_sharpness_needs_detail_not_contrast() -> None:
    rng = np.random.default_rng(0)
    detail = rng.normal(128, 40, (60, 60))
    assert sharpness(np.full((60, 60), 128.0)) == 0
    assert sharpness(detail) > 100 * LIMITS.min_sharpness
    # A dimmer copy of the same detail measures the same.
    assert sharpness(detail * 0.3) == pytest.approx(sharpness(detail), rel=1e-6)


def test_exposure_reads_the_inner_face_and_counts_the_off_frame_part_as_clipped() -> None:
    image = np.full((200, 200, 3), 120, dtype=np.uint8)
    image[:, :60] = 255  # a white wall left of the face
    mean, clipped = exposure(image, Box(50, 50, 150, 150))  # inner face: x 75-125, y 75-125
    assert mean == pytest.approx(120) and clipped == 0
    mean, clipped = exposure(image, Box(150, 50, 250, 150))  # half the inner face off the frame
    assert mean == pytest.approx(120) and clipped == pytest.approx(0.5)
    assert exposure(image, Box(-100, 50, -10, 150)) == (0.0, 1.0)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        QualitySettings(min_detect_px=100, min_face_px=80)
    with pytest.raises(ValueError):
        QualitySettings(min_brightness=200, max_brightness=100)
