"""InsightFace models (SCRFD detector, ArcFace recogniser) behind facesvc's model protocols.

The models load through the ``insightface`` package (the optional extra
``facesvc[insightface]``) from a directory the operator provides: nothing is
downloaded. InsightFace's published weights (buffalo_l and the rest) are licensed for
NON-COMMERCIAL RESEARCH ONLY, so these packs are opt-in and every load says so.

InsightFace works on OpenCV's BGR images; facesvc's images are RGB. The adapters
here convert at the boundary so that insightface's own preprocessing (which swaps
BGR back to RGB) feeds the networks the same tensors as in insightface itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from facesvc.models.types import Box, Detection, Points, RGBImage, unit_descriptors

NON_COMMERCIAL_WARNING = (
    "InsightFace model weights (buffalo_l, antelopev2 and the other published packs) are "
    "licensed for NON-COMMERCIAL RESEARCH USE ONLY; running them in a paid or public "
    "service needs a commercial licence from InsightFace"
)


class InsightFaceUnavailable(RuntimeError):
    """The optional ``insightface`` package is not installed."""


def _model_zoo() -> Any:
    try:
        from insightface import model_zoo
    except ImportError as e:
        raise InsightFaceUnavailable(
            "this pack needs the optional insightface package: pip install 'facesvc[insightface]'"
        ) from e
    return model_zoo


def load_insightface_model(path: Path, task: str, threads: int) -> Any:
    """An insightface model object for the ONNX file at ``path``, checked to be a ``task``
    model ("detection" or "recognition") by insightface's own routing on its shapes."""
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist; check the pack's model dir")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = _model_zoo().get_model(
        str(path), providers=["CPUExecutionProvider"], sess_options=options
    )
    found = getattr(model, "taskname", None)
    if found != task:
        raise ValueError(
            f"{path.name} is not an insightface {task} model (insightface sees: {found}); "
            "check which file the pack names for which role"
        )
    return model


class ScrfdDetector:
    """:class:`facesvc.models.types.FaceDetector` over insightface's SCRFD.

    Detections carry SCRFD's five keypoints (left eye, right eye, nose tip, left and right
    mouth corner) as ``landmarks``, so the pack needs no separate landmark model.
    ``input_size`` (width, height) is the network input the image is letterboxed into.
    """

    def __init__(self, model: Any, input_size: tuple[int, int], score_threshold: float) -> None:
        self._model = model
        self._input_size = input_size
        self._threshold = score_threshold

    def detect(self, image: RGBImage, min_face_px: int) -> list[Detection]:
        bgr = np.ascontiguousarray(image[..., ::-1])
        boxes, kps = self._model.detect(
            bgr, input_size=self._input_size, det_thresh=self._threshold
        )
        found = []
        for k in range(boxes.shape[0]):
            x1, y1, x2, y2, score = (float(v) for v in boxes[k])
            if y2 - y1 < min_face_px:
                continue
            points = None if kps is None else np.asarray(kps[k], dtype=np.float32)
            found.append(Detection(Box(x1, y1, x2, y2), score, points))
        found.sort(key=lambda d: -d.score)
        return found


class ArcFaceEmbedder:
    """:class:`facesvc.models.types.Embedder` over insightface's ArcFaceONNX.

    ``align`` is insightface's ``norm_crop`` (the ArcFace five-point template);
    ``embed`` runs insightface's ``get_feat``, whose mean/std are the ones insightface
    infers for the model file.
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        self.chip_size = int(model.input_size[0])
        self.dim = int(model.output_shape[-1])

    def align(self, image: RGBImage, landmarks: Points) -> RGBImage:
        from insightface.utils import face_align

        chip = face_align.norm_crop(
            image, landmark=np.asarray(landmarks), image_size=self.chip_size
        )
        return np.asarray(chip, dtype=np.uint8)

    def embed_raw(self, chips: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """(N, dim) float32 descriptors as the model outputs them, for (N, S, S, 3) RGB chips."""
        bgr = [np.ascontiguousarray(c[..., ::-1]) for c in chips]
        return np.asarray(self._model.get_feat(bgr), dtype=np.float32).reshape(len(chips), -1)

    def embed(self, chips: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        return unit_descriptors(self.embed_raw(chips))


def warn_non_commercial(logger: logging.Logger, pack: str) -> None:
    logger.warning("model pack %r: %s", pack, NON_COMMERCIAL_WARNING)
