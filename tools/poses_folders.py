"""Lay ../shared/data/poses out as identity folders for ``facesvc calibrate --turned``.

``facesvc calibrate --turned DIR`` and ``facesvc eval --turned DIR`` read a folder of
identity folders (``<source>__<person>/<photo>``), each person photographed frontal and
with the head turned; the pose of every photo is measured, not labelled. This script
builds such a folder from the shared pose collection without copying a photo into the
repository:

- photos are linked (symlinks) under ``poses__<identity>`` (the manifest's identity
  column; the AFLW2000 photos, one person each, get one folder per photo);
- clips are decoded and every ``--every``-th frame written as PNG (GIF with Pillow, MP4
  with OpenCV when it is installed, else skipped with a note);
- left out: the two-person Intel clip (every frame has two faces) and the frames of the
  FSA-Net demo from 120 on, where a hand covers half the face (SOURCES.md).

    python tools/poses_folders.py ../shared/data/poses /tmp/poses-folders
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from PIL import Image, ImageSequence

SKIP_CLIPS = {"clip__intel_head_pose_female_and_male_roll"}
LAST_FRAME = {"clip__fsanet_webcam_demo": 119}


def identity_folder(row: dict[str, str]) -> str:
    identity = row["identity"]
    if identity.startswith("("):  # one person per photo
        identity = Path(row["file"]).stem
    return f"poses__{identity}"


def clip_frames(path: Path, every: int, last: int | None) -> list[Image.Image]:
    if path.suffix.lower() == ".gif":
        with Image.open(path) as clip:
            frames = [f.convert("RGB") for f in ImageSequence.Iterator(clip)]
    else:
        try:
            import cv2
        except ImportError:
            print(f"skipped {path.name}: decoding MP4 needs OpenCV", file=sys.stderr)
            return []
        capture = cv2.VideoCapture(str(path))
        frames = []
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(Image.fromarray(bgr[..., ::-1]))
        capture.release()
    if last is not None:
        frames = frames[: last + 1]
    return frames[::every]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("poses", type=Path, help="the shared poses folder (with manifest.csv)")
    parser.add_argument("out", type=Path, help="where to build the identity folders")
    parser.add_argument("--every", type=int, default=8, help="keep every n-th clip frame")
    args = parser.parse_args(argv)
    with (args.poses / "manifest.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    photos = clips = 0
    for row in rows:
        source = args.poses / row["file"]
        folder = source.parent.name
        target_dir = args.out / identity_folder(row)
        if row["format"] in ("JPEG", "PNG"):
            target_dir.mkdir(parents=True, exist_ok=True)
            link = target_dir / f"{folder}__{source.name}"
            if not link.exists():
                link.symlink_to(source.resolve())
            photos += 1
        elif row["format"] == "GIF" or row["format"].startswith("MP4"):
            if folder in SKIP_CLIPS:
                continue
            target_dir.mkdir(parents=True, exist_ok=True)
            for k, frame in enumerate(clip_frames(source, args.every, LAST_FRAME.get(folder))):
                frame.save(target_dir / f"{folder}__{source.stem}_{k * args.every:04d}.png")
                clips += 1
    print(f"{photos} photos linked, {clips} clip frames written under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
