"""The ONNX conversion of dlib's face-recognition ResNet gives dlib's own descriptors.

dlib (dlib-bin, test-only) finds the faces, their five landmarks and the aligned chips, and
computes the reference descriptors; the converted graph must agree within 1e-5 on every
real face.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import dlib
import numpy as np
import numpy.typing as npt
import pytest
import skimage.data
from PIL import Image, ImageOps

from facesvc.models.dlib.resnet import (
    CHIP_SIZE,
    DlibResnetEmbedder,
    cached_resnet,
    convert_resnet,
    resnet_dat_path,
)
from facesvc.models.model_cache import ModelCache
from facesvc.models.onnx_session import SessionSettings, create_session

MODELS = resnet_dat_path().parent
TOLERANCE = 1e-5
_INSIGHTFACE = importlib.util.find_spec("insightface")
# The optional insightface extra ships sample photos (t1.jpg: several faces); not imported.
INSIGHTFACE_IMAGES = (
    Path(_INSIGHTFACE.origin).parent / "data" / "images"
    if _INSIGHTFACE is not None and _INSIGHTFACE.origin is not None
    else None
)
SHARED_DATA = Path(
    os.environ.get("FACESVC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


@dataclass(frozen=True)
class Face:
    source: str
    image: npt.NDArray[np.uint8]
    landmarks: npt.NDArray[np.float32]  # (5, 2) as dlib's shape predictor returns them
    chip: npt.NDArray[np.uint8]  # dlib.get_face_chip(image, shape, 150, 0.25)
    reference: npt.NDArray[np.float64]  # dlib's descriptor of the chip


class DlibReference:
    """dlib's own detector, 5-point landmarks, chips and descriptors."""

    def __init__(self) -> None:
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(MODELS / "shape_predictor_5_face_landmarks.dat"))
        self.recogniser = dlib.face_recognition_model_v1(str(resnet_dat_path()))

    def faces(self, source: str, image: npt.NDArray[np.uint8]) -> list[Face]:
        upsample = 1 if max(image.shape[:2]) < 1000 else 0
        found = []
        for rect in self.detector(image, upsample):
            shape = self.predictor(image, rect)
            points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
            chip = np.asarray(dlib.get_face_chip(image, shape, CHIP_SIZE, 0.25))
            reference = np.array(self.recogniser.compute_face_descriptor(chip))
            found.append(Face(source, image, points, chip, reference))
        return found


def load_rgb(path: Path) -> npt.NDArray[np.uint8]:
    with Image.open(path) as img:
        return np.ascontiguousarray(ImageOps.exif_transpose(img).convert("RGB"))


@pytest.fixture(scope="module")
def reference() -> DlibReference:
    return DlibReference()


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> DlibResnetEmbedder:
    return DlibResnetEmbedder.load(ModelCache(tmp_path_factory.mktemp("models")), threads=1)


@pytest.fixture(scope="module")
def bundled_faces(reference: DlibReference) -> list[Face]:
    """Faces in the images that installed packages ship (no shared data needed)."""
    faces = reference.faces("skimage:astronaut", skimage.data.astronaut())
    if INSIGHTFACE_IMAGES is not None:
        for path in sorted(INSIGHTFACE_IMAGES.iterdir()):
            faces += reference.faces(f"insightface:{path.name}", load_rgb(path))
    return faces


def assert_matches_dlib(embedder: DlibResnetEmbedder, faces: list[Face]) -> float:
    ours = embedder.embed_raw(np.stack([f.chip for f in faces]))
    theirs = np.stack([f.reference for f in faces])
    worst = float(np.max(np.abs(ours - theirs)))
    assert worst <= TOLERANCE, f"max abs difference {worst:.3g} over {len(faces)} faces"
    return worst


@pytest.mark.skipif(INSIGHTFACE_IMAGES is None, reason="the insightface extra is not installed")
def test_bundled_images_give_enough_faces(bundled_faces: list[Face]) -> None:
    # astronaut: 1; t1.jpg: several; Tom Hanks: 1. Fewer means the equivalence test is weak.
    assert len(bundled_faces) >= 8
    assert {f.source for f in bundled_faces} >= {
        "skimage:astronaut",
        "insightface:t1.jpg",
        "insightface:Tom_Hanks_54745.png",
    }


def test_descriptors_match_dlib_on_bundled_faces(
    embedder: DlibResnetEmbedder, bundled_faces: list[Face]
) -> None:
    assert_matches_dlib(embedder, bundled_faces)


@pytest.mark.shared_data
def test_descriptors_match_dlib_on_shared_face_photos(
    embedder: DlibResnetEmbedder, reference: DlibReference
) -> None:
    faces_dir = SHARED_DATA / "faces"
    if not faces_dir.is_dir():
        pytest.skip(f"shared data not found at {faces_dir} (set FACESVC_SHARED_DATA)")
    # One photo of each press-photo identity and of a few webcam subjects (faceapi crops are
    # too tight for dlib's detector).
    folders = sorted(
        d
        for d in faces_dir.iterdir()
        if d.is_dir()
        and (
            d.name.startswith("face_recognition")
            or (d.name.startswith("nuaa__") and d.name <= "nuaa__client0004")
        )
    )
    faces: list[Face] = []
    for folder in folders:
        first = min(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        faces += reference.faces(f"shared:{folder.name}/{first.name}", load_rgb(first))
    assert len(faces) >= 8
    assert_matches_dlib(embedder, faces)


def test_align_then_embed_matches_dlib_from_the_full_image(
    embedder: DlibResnetEmbedder, bundled_faces: list[Face]
) -> None:
    for face in bundled_faces:
        chip = embedder.align(face.image, face.landmarks)
        assert chip.shape == (CHIP_SIZE, CHIP_SIZE, 3) and chip.dtype == np.uint8
        np.testing.assert_array_equal(chip, face.chip, err_msg=face.source)


def test_batch_of_eight_equals_eight_single_calls(
    embedder: DlibResnetEmbedder, bundled_faces: list[Face]
) -> None:
    chips = np.stack([f.chip for f in (bundled_faces * 8)[:8]])
    batched = embedder.embed_raw(chips)
    singles = np.concatenate([embedder.embed_raw(chip[None]) for chip in chips])
    np.testing.assert_allclose(batched, singles, rtol=0, atol=1e-6)


def test_embed_is_the_unit_length_raw_descriptor(
    embedder: DlibResnetEmbedder, bundled_faces: list[Face]
) -> None:
    chips = np.stack([f.chip for f in bundled_faces[:3]])
    unit = embedder.embed(chips)
    raw = embedder.embed_raw(chips)
    assert unit.shape == (3, 128) and unit.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit * np.linalg.norm(raw, axis=1, keepdims=True), raw, atol=1e-6)
    assert embedder.embed(np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)).shape == (0, 128)


def test_wrong_chip_shape_is_refused(embedder: DlibResnetEmbedder) -> None:
    with pytest.raises(ValueError, match="150, 150, 3"):
        embedder.embed(np.zeros((1, 112, 112, 3), np.uint8))


def test_conversion_is_deterministic() -> None:
    first = hashlib.sha256(convert_resnet(resnet_dat_path())).hexdigest()
    second = hashlib.sha256(convert_resnet(resnet_dat_path())).hexdigest()
    assert first == second


def test_corrupted_cached_model_is_rebuilt_and_still_correct(
    tmp_path: Path, bundled_faces: list[Face]
) -> None:
    cache = ModelCache(tmp_path)
    path = cached_resnet(cache)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a truncated file, as a crash mid-copy leaves
    assert cached_resnet(cache) == path
    assert path.read_bytes() == good
    session = create_session(path, SessionSettings(intra_threads=1))
    assert_matches_dlib(DlibResnetEmbedder(session), bundled_faces[:2])
