"""Where the kiosk's pictures come from: a camera (OpenCV, optional) or image files.

A :class:`Camera` is a stream of RGB frames; the scan flow reads the QR code from it and then
takes the face frames from it. Frames live in memory only: they are encoded to JPEG in a
buffer for Verify (:func:`encode_frame`) and never written to disk, by this module or any
other part of the kiosk (a face picture on a shared venue PC would outlive the scan).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from facesvc.imaging import DecodeLimits, ImageRejected, decode_image
from facesvc.models.types import RGBImage

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
"""File names the folder source picks up (the formats the service accepts)."""


class CameraError(RuntimeError):
    """The camera cannot deliver frames; the message says what to check."""


class Camera(Protocol):
    """A source of frames. ``grab`` returns the next (H, W, 3) uint8 RGB frame, or None when
    the source has no more (a file list at its end; a live camera never ends)."""

    def grab(self) -> RGBImage | None: ...

    def close(self) -> None: ...


class StillFrames:
    """Frames given in memory, in order (tests, and callers that decode pictures themselves)."""

    def __init__(self, frames: Iterable[RGBImage]) -> None:
        self._frames = list(frames)
        self._next = 0

    def grab(self) -> RGBImage | None:
        """The next frame, or None after the last."""
        if self._next >= len(self._frames):
            return None
        frame = self._frames[self._next]
        self._next += 1
        return frame

    def close(self) -> None:
        self._frames.clear()


class ImageFiles:
    """Frames read from image files in order (headless use): first the pass's QR picture,
    then the face pictures of the scan. Decoded with the service's own safe decoder
    (size and pixel limits, EXIF orientation)."""

    def __init__(self, paths: Sequence[Path], limits: DecodeLimits | None = None) -> None:
        self._paths = list(paths)
        self._limits = limits or DecodeLimits()
        self._next = 0

    @classmethod
    def from_folder(cls, folder: Path) -> ImageFiles:
        """Every image file in ``folder``, in name order."""
        if not folder.is_dir():
            raise CameraError(f"{folder} is not a folder of images")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return cls(paths)

    def grab(self) -> RGBImage | None:
        """The next file's pixels, or None after the last; raises :class:`CameraError` for a
        file that cannot be read or is not an acceptable image."""
        if self._next >= len(self._paths):
            return None
        path = self._paths[self._next]
        self._next += 1
        try:
            return decode_image(path.read_bytes(), self._limits)
        except (OSError, ImageRejected) as exc:
            raise CameraError(f"cannot use {path}: {exc}") from exc

    def close(self) -> None:
        self._next = len(self._paths)


class OpenCVCamera:
    """A live camera through OpenCV's ``VideoCapture`` (device ``index``).

    OpenCV is optional (the ``kiosk`` extra does not force a build of it, since insightface
    and the venue's OS may each bring their own); this class is the only user and says so
    when it is missing.
    """

    def __init__(self, index: int = 0) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise CameraError(
                "a live camera needs OpenCV: pip install opencv-python-headless, "
                "or give image files instead"
            ) from exc
        self._cv2: Any = cv2
        self._capture: Any = cv2.VideoCapture(index)
        if not self._capture.isOpened():
            raise CameraError(f"camera {index} cannot be opened: is it connected and free?")
        # Face frames are taken after a pause (a head turn, a step closer): a deep driver
        # queue would hand back what the camera saw before it. Not every backend honours it.
        self._capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def grab(self) -> RGBImage:
        """The newest frame as RGB; raises :class:`CameraError` when the camera stops."""
        ok, frame = self._capture.read()
        if not ok or frame is None:
            raise CameraError("the camera stopped delivering frames: check its cable")
        rgb: RGBImage = np.ascontiguousarray(self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB))
        return rgb

    def close(self) -> None:
        self._capture.release()


def encode_frame(frame: RGBImage, *, quality: int = 90) -> bytes:
    """``frame`` as JPEG bytes, encoded in memory (never through a file)."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
