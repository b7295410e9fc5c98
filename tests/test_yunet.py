"""The yunet-sface pack: YuNet's decoding against OpenCV's own, the frame-size policy (a 12 MP
photo, a tight 150x150 crop), and SFace's descriptors against OpenCV's FaceRecognizerSF."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image

from facesvc.config import QualitySettings, load_settings
from facesvc.domain import Decision, Gate, TrainingType
from facesvc.engine import VerifyCommand
from facesvc.models.model_cache import ModelCache
from facesvc.models.onnx_session import SessionSettings, create_session
from facesvc.models.opencv_zoo import SFACE, YUNET, cached_yunet, locate
from facesvc.models.pack import ModelPack
from facesvc.models.packs import load_pack
from facesvc.models.pipeline import FaceStatus
from facesvc.models.types import Box
from facesvc.models.yunet import (
    ScalePolicy,
    YunetDetector,
    non_maximum_suppression,
)
from facesvc.models.yunet_sface import MMOD_BOX, PACK_NAME, SCALE_POLICY
from tests.engine_support import (
    ADMIN,
    LMS,
    TENANTS,
    EngineKit,
    astronaut,
    default_pack,
    insightface_image,
    jpeg,
)


@pytest.fixture(scope="module")
def yunet(tmp_path_factory: pytest.TempPathFactory) -> YunetDetector:
    cache = ModelCache(tmp_path_factory.mktemp("cache"))
    return YunetDetector(create_session(cached_yunet(cache), SessionSettings(intra_threads=1)))


def opencv_detections(image: np.ndarray) -> np.ndarray:
    """OpenCV's FaceDetectorYN on the same model file: rows of (x, y, w, h, 10 points, score)."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "FaceDetectorYN"):
        pytest.skip("this OpenCV build has no FaceDetectorYN")
    height, width = image.shape[:2]
    detector = cv2.FaceDetectorYN.create(str(locate(YUNET)), "", (width, height), 0.9, 0.3, 5000)
    _, faces = detector.detect(np.ascontiguousarray(image[..., ::-1]))
    return np.zeros((0, 15), np.float32) if faces is None else np.asarray(faces)


@pytest.mark.parametrize("name", ["astronaut", "t1.jpg"])
def test_decoding_matches_opencv(yunet: YunetDetector, name: str) -> None:
    image = astronaut() if name == "astronaut" else insightface_image(name)
    boxes, scores, points = yunet.raw_detections(image)
    reference = opencv_detections(image)
    assert len(scores) == len(reference) >= 1
    order = np.argsort(-reference[:, 14])
    reference = reference[order]
    theirs = np.concatenate(
        [reference[:, :2], reference[:, :2] + reference[:, 2:4]], axis=1
    )  # x, y, w, h -> left, top, right, bottom
    np.testing.assert_allclose(boxes, theirs, atol=0.05)
    np.testing.assert_allclose(points.reshape(-1, 10), reference[:, 4:14], atol=0.05)
    np.testing.assert_allclose(scores, reference[:, 14], atol=1e-4)
    # points in ArcFace order: the eye on the image's left first, mouth corners likewise
    assert np.all(points[:, 0, 0] < points[:, 1, 0])
    assert np.all(points[:, 3, 0] < points[:, 4, 0])


def test_non_maximum_suppression_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 4]], np.float32)
    scores = np.array([0.8, 0.95, 0.9, 0.99], np.float32)
    # box 0 overlaps box 1 (IoU 0.68) and box 3 (0.4): both better, so it goes
    assert non_maximum_suppression(boxes, scores, 0.3).tolist() == [3, 1, 2]
    assert non_maximum_suppression(boxes, scores, 0.7).tolist() == [3, 1, 2, 0]


def test_scale_policy() -> None:
    policy = ScalePolicy(smallest_face_px=32, largest_face_px=300)
    assert policy.scale(480, 640, 80) == pytest.approx(0.4)  # an 80 px face becomes 32 px
    assert policy.scale(3000, 4000, 80) == pytest.approx(0.1)  # the shorter side at 300
    assert policy.scale(150, 150, 20) == 1.0  # never up
    with pytest.raises(ValueError):
        ScalePolicy(smallest_face_px=5)
    with pytest.raises(ValueError):
        ScalePolicy(tight_face_px=400)  # above largest_face_px


def test_a_12_megapixel_photo_finds_the_face(yunet: YunetDetector) -> None:
    image = astronaut()  # 512x512, face about 90 px
    big = np.asarray(Image.fromarray(image).resize((4000, 4000), Image.Resampling.BILINEAR))
    (small_face,) = yunet.detect(image, 60)
    found = yunet.detect(big, 80)
    assert len(found) == 1
    ratio = 4000 / 512
    b, s = found[0].box, small_face.box
    assert b.height == pytest.approx(s.height * ratio, rel=0.1)
    assert (b.left + b.right) / 2 == pytest.approx((s.left + s.right) / 2 * ratio, rel=0.05)
    assert found[0].landmarks is not None and found[0].landmarks.shape == (5, 2)


def test_an_aligned_112px_chip_is_found_with_the_whole_margin(yunet: YunetDetector) -> None:
    chip = insightface_image("Tom_Hanks_54745.png")
    half_only = YunetDetector(yunet._session, policy=ScalePolicy(pad_fractions=(0.5,), full_side=0))
    assert half_only.detect(chip, 80) == []
    (found,) = yunet.detect(chip, 80)
    assert found.landmarks is not None
    assert np.all((found.landmarks > 0) & (found.landmarks < 112))


def test_a_tight_150px_crop_finds_the_face(yunet: YunetDetector) -> None:
    image = astronaut()
    (face,) = yunet.detect(image, 60)
    b = face.box
    cx, cy, side = (b.left + b.right) / 2, (b.top + b.bottom) / 2, b.height * 0.9
    crop = image[
        round(cy - side / 2) : round(cy + side / 2), round(cx - side / 2) : round(cx + side / 2)
    ]
    crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((150, 150)))
    (found,) = yunet.detect(crop, 80)
    assert found.box.height > 120 and found.landmarks is not None
    assert np.all((found.landmarks > 0) & (found.landmarks < 150))


def test_a_tight_crop_larger_than_the_tight_face_size_is_found_where_it_is(
    yunet: YunetDetector,
) -> None:
    """An aligned chip enlarged to 224x224, the face filling it: the padded search scales
    the frame to the policy's tight face size (160 px) before padding, and the box and
    points come back in the frame's own pixels, on the same face as in the 112x112 chip."""
    chip = insightface_image("Tom_Hanks_54745.png")
    big = np.asarray(Image.fromarray(chip).resize((224, 224), Image.Resampling.BILINEAR))
    first_only = replace(SCALE_POLICY, pad_fractions=(), full_side=0)
    assert YunetDetector(yunet._session, policy=first_only).detect(big, 80) == []
    detector = YunetDetector(yunet._session, policy=SCALE_POLICY)
    (in_chip,) = detector.detect(chip, 80)
    (in_big,) = detector.detect(big, 80)
    assert in_chip.landmarks is not None and in_big.landmarks is not None
    assert in_big.box.height == pytest.approx(in_chip.box.height * 2, rel=0.1)
    # The same five points, in the big frame's pixels: within 5% of its side (a wrong
    # offset or scale for the padding would put them 50 px or more away).
    assert np.abs(in_big.landmarks - in_chip.landmarks * 2).max() < 0.05 * 224


@pytest.mark.shared_data
def test_every_faceapi_crop_is_found_two_only_after_padding(
    yunet: YunetDetector, shared_data: Path
) -> None:
    """faceapi's 150x150 grayscale crops leave YuNet no context: two of the 40 are found
    only in a padded search, and then in the crop's own pixels."""
    from facesvc.commands.accuracy import read_photo

    no_retry = YunetDetector(yunet._session, policy=ScalePolicy(pad_fractions=(), full_side=0))
    needed_padding = []
    for path in sorted((shared_data / "faces").glob("faceapi__*/*.png")):
        image = read_photo(path)
        found = yunet.detect(image, 80)
        assert len(found) == 1, path.name
        if not no_retry.detect(image, 80):
            needed_padding.append(path.name)
            points = found[0].landmarks
            assert points is not None and np.all((points > 0) & (points < 150))
    assert needed_padding == ["stuart4.png", "stuart5.png"]


def test_the_box_for_dlibs_landmarks_moves_up_a_little() -> None:
    moved = MMOD_BOX.apply(Box(100, 100, 200, 300))
    assert moved.height == pytest.approx(200 * 1.005)
    assert (moved.top + moved.bottom) / 2 == pytest.approx(200 - 0.022 * 200)


def test_default_pack_is_yunet_sface_and_describes_a_real_face(model_pack: ModelPack) -> None:
    assert model_pack.name == PACK_NAME
    assert model_pack.tag.startswith("yunet-sface@sha256:")
    assert model_pack.calibration is not None and model_pack.calibration.centre is None
    assert model_pack.frontal is not None and model_pack.turned_threshold is not None
    pipeline = model_pack.pipeline(QualitySettings())
    analysis = pipeline.analyze(astronaut())
    assert analysis.status is FaceStatus.OK, analysis.reason
    assert analysis.quality is not None
    assert abs(analysis.quality.pose.pitch) < 15 and abs(analysis.quality.pose.yaw) < 15
    assert analysis.chip is not None and analysis.chip.shape == (112, 112, 3)
    descriptor = pipeline.embed([analysis.chip])
    assert descriptor.shape == (1, 128)
    assert np.linalg.norm(descriptor) == pytest.approx(1.0, abs=1e-5)


_THREADS = {"models.threads": 1, "models.lone_threads": 2}


def test_lone_scans_get_a_wider_sface_session_with_the_same_descriptors() -> None:
    """With more lone threads than threads the pack holds a second SFace session; it
    describes a face as the first does (only the split of each layer's work differs)."""
    chip = default_pack().pipeline(QualitySettings()).analyze(astronaut()).chip
    assert chip is not None
    one = _THREADS | {"models.lone_threads": 1}
    narrow = load_pack(load_settings(env={}, overrides=one).models)
    assert narrow.lone_embedder is None
    pack = load_pack(load_settings(env={}, overrides=_THREADS).models)
    assert pack.lone_embedder is not None and pack.lone_embedder is not pack.embedder
    assert pack.tag == narrow.tag
    pipeline = pack.pipeline(QualitySettings())
    np.testing.assert_allclose(
        pipeline.embed_alone([chip]), pipeline.embed([chip]), rtol=0, atol=1e-5
    )


def test_sface_descriptor_matches_opencvs_recogniser(model_pack: ModelPack) -> None:
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "FaceRecognizerSF"):
        pytest.skip("this OpenCV build has no FaceRecognizerSF")
    image = astronaut()
    (face,) = model_pack.detector.detect(image, 60)
    assert face.landmarks is not None
    chip = model_pack.embedder.align(image, face.landmarks)
    theirs = cv2.FaceRecognizerSF.create(str(locate(SFACE)), "")
    row = np.array([face.box.left, face.box.top, face.box.width, face.box.height], np.float32)
    row = np.concatenate([row, face.landmarks.ravel(), [face.score]]).astype(np.float32)
    their_chip = theirs.alignCrop(np.ascontiguousarray(image[..., ::-1]), row)[..., ::-1]
    assert np.abs(chip.astype(int) - their_chip.astype(int)).max() <= 1
    their_feature = theirs.feature(np.ascontiguousarray(chip[..., ::-1])).ravel()
    ours = model_pack.embedder.embed(chip[None])[0]
    cosine = float(ours @ their_feature / np.linalg.norm(their_feature))
    # OpenCV runs the float graph; ours has a last layer on 7-bit weights, which kept every
    # photo's descriptor within cosine 0.99997 of the float one (docs/accuracy.md). A wrong
    # channel order or alignment moves a descriptor by far more.
    assert cosine > 0.9999


async def test_a_12mp_enrollment_and_a_tight_crop_scan_are_the_same_person(
    engine_kit: EngineKit,
) -> None:
    """Through the engine: a 12 MP phone photo (the face far over YuNet's 300 px) enrolls,
    and a 150x150 crop of the face (no margin around it) is matched against it."""
    image = astronaut()
    scene = np.zeros((512, 683, 3), np.uint8)  # 4:3, the face undistorted
    scene[:, 85:597] = image
    phone = np.asarray(Image.fromarray(scene).resize((4000, 3000), Image.Resampling.BILINEAR))
    enrolled = await engine_kit.engine.enroll(
        "p-12mp", [jpeg(phone)], replace=False, caller=ADMIN, tenants=TENANTS
    )
    assert enrolled.enrolled, enrolled.reason
    # decoded at half size (server.jpeg_reduce_to_side), then fitted to
    # server.max_analyze_pixels before any face work
    assert enrolled.images[0].width_px * enrolled.images[0].height_px <= 460_800
    crop = np.asarray(Image.fromarray(image[55:185, 160:290]).resize((150, 150)))
    outcome = await engine_kit.engine.verify(
        VerifyCommand(
            participant_id="p-12mp",
            training_id="t-1",
            training_type=TrainingType.SPL,
            gate=Gate.SESSION,
            session_id="s-1",
            frames=[jpeg(crop)],
            caller=LMS,
        )
    )
    assert outcome.decision is Decision.VERIFIED, outcome.reason


@pytest.mark.shared_data
def test_crops_set_in_a_flat_frame_are_searched_again_larger(
    yunet: YunetDetector, shared_data: Path
) -> None:
    """faceapi's crops pasted into a grey 640x480 frame (as benchmarks.load sends them): at
    the first search's scale (an 80 px face made 32 px) YuNet sees no context around four
    of them; the second search, at the frame's own size, finds them."""
    from facesvc.commands.accuracy import read_photo

    def framed(path: Path) -> np.ndarray:
        frame = np.full((480, 640, 3), 96, np.uint8)
        frame[165:315, 245:395] = read_photo(path)
        return frame

    first_only = YunetDetector(
        yunet._session, policy=ScalePolicy(smallest_face_px=32, full_side=0, pad_fractions=())
    )
    larger = YunetDetector(yunet._session, policy=ScalePolicy(smallest_face_px=32))
    crops = sorted((shared_data / "faces").glob("faceapi__*/*.png"))
    missed = [p.name for p in crops if not first_only.detect(framed(p), 80)]
    assert {"bernadette2.png", "howard5.png", "penny3.png"} <= set(missed)
    still = [p.name for p in crops if not larger.detect(framed(p), 80)]
    assert len(still) <= 1 < len(missed)


class _RecordingSession:
    """A YuNet session that records the (height, width) of every picture it searches."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.searched: list[tuple[int, int]] = []

    def get_inputs(self) -> Any:
        return self._session.get_inputs()

    def get_outputs(self) -> Any:
        return self._session.get_outputs()

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> Any:
        (tensor,) = feed.values()
        self.searched.append(tensor.shape[2:])
        return self._session.run(outputs, feed)


def test_a_large_plain_framed_picture_is_searched_at_full_size_before_padding(
    yunet: YunetDetector,
) -> None:
    """Module doc of facesvc.models.yunet: where the first search found nothing in a 640x480
    frame with a one-colour border, the frame at its own size is searched next, before any
    padded search; in a 640x480 photo (its edges not one colour) and in a 150x150 crop,
    after both padded ones. Faceless pictures, so every search runs."""
    session = _RecordingSession(yunet._session)
    detector = YunetDetector(session, policy=SCALE_POLICY)
    photo = np.asarray(
        Image.fromarray(skimage.data.coffee()).resize((640, 480), Image.Resampling.BILINEAR)
    )
    plain = np.full((480, 640, 3), 96, np.uint8)
    plain[140:340, 220:420] = photo[140:340, 220:420]  # the photo's middle on a grey canvas
    for picture, at in ((plain, 1), (photo, 3)):
        session.searched.clear()
        assert detector.detect(picture, 80) == []
        assert len(session.searched) == 4 and session.searched[at] == (480, 640)
    session.searched.clear()
    assert detector.detect(np.full((150, 150, 3), 96, np.uint8), 80) == []
    # The crop at its own size: 150 px padded to YuNet's multiple of 32.
    assert len(session.searched) == 4 and session.searched[3] == (160, 160)
