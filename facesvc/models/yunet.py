"""YuNet (OpenCV Zoo, 2023mar) as a FaceDetector: its pre- and post-processing in numpy.

The network is recognised by its signature, as insightface's model_zoo recognises models:
one input [1, 3, H, W] (BGR pixel values 0-255, H and W multiples of 32, no mean or scale)
and twelve outputs, ``cls_S``, ``obj_S``, ``bbox_S`` and ``kps_S`` for the strides S = 8,
16 and 32, one row per cell of the stride's grid (row-major). For the cell in row r and
column c of stride S:

- score = sqrt(clip(cls, 0, 1) * clip(obj, 0, 1));
- box centre = ((c + bbox[0]) * S, (r + bbox[1]) * S), size = (exp(bbox[2]) * S,
  exp(bbox[3]) * S);
- five points = ((c + kps[2k]) * S, (r + kps[2k + 1]) * S): the eye on the image's left,
  the other eye, the nose tip, the mouth corner on the image's left, the other one; the
  ArcFace five-point order that SFace is aligned with.

Faces scoring at least ``score_threshold`` (0.9: at 0.5 the tight crops' extra detections
bring bad landmarks) are kept after non-maximum suppression (IoU 0.3), as OpenCV's
FaceDetectorYN does; ``tests/test_yunet.py`` checks the decoding against OpenCV's own
implementation where OpenCV is installed.

YuNet finds faces of about 10 to 300 pixels. A frame is therefore resized first
(``ScalePolicy``): down until the smallest face looked for is ``smallest_face_px`` and
the frame's shorter side at most ``largest_face_px``, never up. When nothing is found:

- a face that fills its image (a tight crop such as a 150x150 ID-style photo) leaves the
  network no context: the frame is scaled so that its own shorter side (the face's size,
  in a tight crop) is at most ``tight_face_px``, padded on every side with its edge
  pixels, by half its longer side and then by all of it, and searched again. Scaling comes
  before padding, so the padded picture is never made at the frame's own size: a 640x480
  frame without a face cost about 200 ms when its padded copies were built at full size
  and searched with the face at 300 px, and costs about 30 ms so (docs/benchmarks.md).
  Both margins are needed: of the 150x150 faceapi crops in
  ../shared/data/faces, stuart5.png scores 0.906 with the half margin and below 0.9 with
  the whole one; insightface's 112x112 Tom_Hanks_54745.png (an aligned chip) the other
  way round;
- a face cut out tightly and set in a flat background (a 150x150 crop pasted into a
  640x480 frame, as benchmarks.load sends faceapi's) is not helped by padding: it is
  searched at up to ``full_side`` pixels on the frame's longer side (640: a webcam frame at
  its own size), where four of faceapi's 40 crops score 0.9 only.

Which of the two retries comes first depends on the frame. The padded searches come first,
as a face cut off by the frame's edges needs them: a tight crop found without the padding's
context is found with worse points (4 of 80 genuine faceapi pairs lost at FMR 1e-3 when the
full-size search came first), and so is a webcam face enlarged past the frame (48 of the 288
genuine FSA-Net challenges of docs/accuracy.md were refused when the full-size search came
first in every frame larger than a tight crop). A frame whose border is one colour has no
face cut off at its edges, and padding it with its edge pixels only adds more of that
colour. When such a frame is also larger than a tight crop (the padded search would show it
smaller than the first search did: with the default pack and quality settings, a shorter
side over 400 px), a face the first search missed is a small one without context, which the
full-size search finds, so it comes first. faceapi's crops in grey frames then cost two
searches instead of four (11 ms of detection instead of 31 on this 2-core machine). Of the
421 photos of ../shared/data/faces and the pose collection, as shot and set in 640x480
frames, the order changes the detection of 5 (turned faces set in frames) and of none as
shot (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from facesvc.models.onnx_embedder import ModelContractError
from facesvc.models.types import Box, Detection, RGBImage

STRIDES = (8, 16, 32)
OUTPUTS = tuple(f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES)
_WIDTHS = {"cls": 1, "obj": 1, "bbox": 4, "kps": 10}

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    """How a frame is resized before detection (module doc).

    ``smallest_face_px``: the smallest face looked for (``min_face_px``) is scaled to about
    this many pixels. ``largest_face_px``: the frame's shorter side is scaled to at most
    this, so that a face filling the frame stays within what YuNet finds.
    ``tight_face_px``: in the padded searches, the frame's shorter side (the face, when it
    fills the frame) is scaled to at most this. ``pad_fractions``: the margins added on
    every side, as shares of the scaled frame's longer side, for the searches after a first
    one that found nothing (empty: no retry). ``full_side``: the longer side, in pixels, of
    the last search (0: none).
    """

    smallest_face_px: float = 40.0
    largest_face_px: float = 300.0
    tight_face_px: float = 160.0
    pad_fractions: tuple[float, ...] = (0.5, 1.0)
    full_side: int = 640

    def __post_init__(self) -> None:
        if not 10.0 <= self.smallest_face_px <= self.largest_face_px:
            raise ValueError("need 10 <= smallest_face_px <= largest_face_px")
        if not 10.0 <= self.tight_face_px <= self.largest_face_px:
            raise ValueError("need 10 <= tight_face_px <= largest_face_px")
        if any(p <= 0 for p in self.pad_fractions):
            raise ValueError("pad_fractions must be > 0")

    def scale(self, height: int, width: int, min_face_px: int) -> float:
        """The factor (at most 1) a (height, width) frame is resized by."""
        return min(
            1.0,
            self.smallest_face_px / max(min_face_px, 1),
            self.largest_face_px / max(min(height, width), 1),
        )


def _check_signature(session: Any) -> tuple[str, list[str]]:
    inputs = session.get_inputs()
    names = [o.name for o in session.get_outputs()]
    if len(inputs) != 1 or sorted(names) != sorted(OUTPUTS):
        raise ModelContractError(
            f"not a YuNet detector: expected one input and outputs {', '.join(OUTPUTS)}, "
            f"got {len(inputs)} input(s) and {names}"
        )
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1] != 3:
        raise ModelContractError(f"YuNet's input must be [1, 3, H, W], the model has {shape}")
    return inputs[0].name, names


class YunetDetector:
    """:class:`facesvc.models.types.FaceDetector` over a YuNet ONNX Runtime session.

    Detections carry YuNet's five points (ArcFace order) as ``landmarks``; ``box`` and the
    points are in the caller's image pixels.
    """

    def __init__(
        self,
        session: Any,
        *,
        score_threshold: float = 0.9,
        nms_iou: float = 0.3,
        policy: ScalePolicy | None = None,
    ) -> None:
        self._input, self._outputs = _check_signature(session)
        self._session = session
        self._threshold = score_threshold
        self._nms_iou = nms_iou
        self.policy = policy or ScalePolicy()

    def detect(self, image: RGBImage, min_face_px: int) -> list[Detection]:
        """Faces at least ``min_face_px`` in size (the geometric mean of the box's sides, as
        the quality gates measure it), best score first (module doc for the search)."""
        height, width = image.shape[:2]
        first = self.policy.scale(height, width, min_face_px)
        found = self._search(image, min_face_px, first)
        # A face that fills the frame: scale so that the frame's own size (the face's) lands
        # within YuNet's range whatever the smallest face looked for, and pad.
        tight = min(1.0, self.policy.tight_face_px / max(min(height, width), 1))
        padded = [(tight, fraction) for fraction in self.policy.pad_fractions]
        # A tight face in a flat frame: the frame larger.
        larger = min(1.0, self.policy.full_side / max(height, width, 1))
        full = [(larger, 0.0)] if larger > first else []
        # Module doc: which of the two comes first.
        full_first = tight < first and _flat_border(image)
        for scale, fraction in full + padded if full_first else padded + full:
            if found:
                break
            found = self._search(image, min_face_px, scale, fraction)
        return found

    def _search(
        self, image: RGBImage, min_face_px: int, scale: float, pad_fraction: float = 0.0
    ) -> list[Detection]:
        """YuNet on ``image`` resized by ``scale`` and then padded on every side with its
        edge pixels by ``pad_fraction`` of its (resized) longer side; detections in the
        caller's pixels."""
        height, width = image.shape[:2]
        small = image
        if scale < 1.0:
            size = (max(round(width * scale), 1), max(round(height * scale), 1))
            small = np.asarray(
                Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8
            )
        # Back to the caller's pixels: each axis by its own resize ratio.
        sx, sy = width / small.shape[1], height / small.shape[0]
        pad = round(max(small.shape[:2]) * pad_fraction)
        if pad:
            small = np.pad(small, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        boxes, scores, points = self.raw_detections(small)
        boxes = (boxes - np.float32(pad)) * np.array([sx, sy, sx, sy], np.float32)
        points = (points - np.float32(pad)) * np.array([sx, sy], np.float32)
        found = [
            Detection(Box(*(float(v) for v in boxes[k])), float(scores[k]), points[k])
            for k in range(len(scores))
            if math.sqrt(max(boxes[k, 2] - boxes[k, 0], 0) * max(boxes[k, 3] - boxes[k, 1], 0))
            >= min_face_px
        ]
        found.sort(key=lambda d: -d.score)
        return found

    def raw_detections(self, image: RGBImage) -> tuple[FloatArray, FloatArray, FloatArray]:
        """YuNet on ``image`` as it is (no resize, no retry): (K, 4) boxes (left, top, right,
        bottom), (K,) scores and (K, 5, 2) points in its pixels, after the score threshold
        and non-maximum suppression, best first."""
        tensor, padded_w = _tensor(image)
        results = self._session.run(self._outputs, {self._input: tensor})
        out = dict(zip(self._outputs, results, strict=True))
        boxes, scores, points = [], [], []
        for stride in STRIDES:
            cols = padded_w // stride
            cls = _rows(out, "cls", stride)[:, 0]
            obj = _rows(out, "obj", stride)[:, 0]
            score = np.sqrt(np.clip(cls, 0.0, 1.0) * np.clip(obj, 0.0, 1.0))
            keep = np.flatnonzero(score >= self._threshold)
            if keep.size == 0:
                continue
            row, col = np.divmod(keep, cols)
            b = _rows(out, "bbox", stride)[keep]
            k = _rows(out, "kps", stride)[keep]
            cx, cy = (col + b[:, 0]) * stride, (row + b[:, 1]) * stride
            w, h = np.exp(b[:, 2]) * stride, np.exp(b[:, 3]) * stride
            boxes.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1))
            scores.append(score[keep])
            xs = (k[:, 0::2] + col[:, None]) * stride
            ys = (k[:, 1::2] + row[:, None]) * stride
            points.append(np.stack([xs, ys], axis=2))
        if not scores:
            empty = np.zeros(0, np.float32)
            return empty.reshape(0, 4), empty, empty.reshape(0, 5, 2)
        all_boxes = np.concatenate(boxes).astype(np.float32)
        all_scores = np.concatenate(scores).astype(np.float32)
        all_points = np.concatenate(points).astype(np.float32)
        kept = non_maximum_suppression(all_boxes, all_scores, self._nms_iou)
        return all_boxes[kept], all_scores[kept], all_points[kept]


def _flat_border(image: RGBImage, tolerance: int = 8) -> bool:
    """Whether the outermost rows and columns of ``image`` are one colour, within
    ``tolerance`` grey levels in every channel (a photo set on a plain canvas)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return bool((np.ptp(border, axis=0) <= tolerance).all())


def _tensor(image: RGBImage) -> tuple[FloatArray, int]:
    """The network input for an (H, W, 3) RGB image: BGR, NCHW, zero-padded at the bottom
    and right to multiples of 32; and the padded width."""
    height, width = image.shape[:2]
    padded_h, padded_w = (math.ceil(height / 32) * 32, math.ceil(width / 32) * 32)
    tensor = np.zeros((1, 3, padded_h, padded_w), np.float32)
    tensor[0, :, :height, :width] = image[..., ::-1].transpose(2, 0, 1)
    return tensor, padded_w


def _rows(out: dict[str, Any], kind: str, stride: int) -> FloatArray:
    rows = np.asarray(out[f"{kind}_{stride}"], dtype=np.float32)
    return rows.reshape(-1, _WIDTHS[kind])


def non_maximum_suppression(
    boxes: FloatArray, scores: FloatArray, iou_limit: float
) -> npt.NDArray[np.intp]:
    """Indices of the boxes kept, best score first: each box is dropped when it overlaps a
    better-scoring kept one by more than ``iou_limit`` (intersection over union)."""
    order = np.argsort(-scores, kind="stable")
    left, top, right, bottom = boxes.T
    area = np.maximum(right - left, 0) * np.maximum(bottom - top, 0)
    kept: list[int] = []
    while order.size:
        best, rest = int(order[0]), order[1:]
        kept.append(best)
        w = np.minimum(right[best], right[rest]) - np.maximum(left[best], left[rest])
        h = np.minimum(bottom[best], bottom[rest]) - np.maximum(top[best], top[rest])
        inter = np.maximum(w, 0) * np.maximum(h, 0)
        union = area[best] + area[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
        order = rest[iou <= iou_limit]
    return np.array(kept, dtype=np.intp)
