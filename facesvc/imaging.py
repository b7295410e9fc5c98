"""Safe decoding of untrusted image bytes into RGB arrays.

Every frame a caller sends passes through ``decode_image`` before any model sees it. The
checks run cheapest first and before the expensive step they protect:

1. the encoded size (``DecodeLimits.max_bytes``);
2. the container format, identified from the bytes, never from a name or a MIME type
   (JPEG, PNG, WebP; a multi-picture JPEG from a phone camera counts as JPEG);
3. the pixel count from the header, before a single pixel is decoded: Pillow opens lazily,
   so a 100-megapixel PNG of a few kilobytes (a decompression bomb) is refused here
   without allocating its pixels;
4. the decoding budget (``DecodeLimits.max_decoded_pixels``), also from the header: a JPEG
   above it is decoded at 1/2, 1/4 or 1/8 scale (libjpeg scales while it decodes, so the full
   picture is never made); a PNG or WebP above it is refused, since neither can be decoded
   at a smaller scale and a flat 24 MP PNG of 80 KB otherwise costs seconds and gigabytes;
5. animation: a still photo is expected, so animated PNG/WebP is refused;
6. the decode itself, with truncated or corrupt data an error rather than a grey-padded
   picture (Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay off);
7. the EXIF orientation, so a portrait phone photo comes out upright;
8. conversion to 8-bit RGB: palette and grey images expanded, transparency composited on
   white, 16-bit grey scaled (not clipped) to 8 bits, CMYK converted.

Every refusal is an ``ImageRejected`` whose message says what was wrong and what to send.

``fit_pixels`` then scales a decoded frame down to what face detection may look at: the
detector's cost grows with the pixels it is given, whatever the detector.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError

from facesvc.errors import InvalidRequest

_MIB = 1 << 20
# Our format names and Pillow's openers for them (Pillow's JPEG opener also returns the
# multi-picture "MPO" JPEGs many phones write).
_OPENERS = {"JPEG": "JPEG", "PNG": "PNG", "WebP": "WEBP"}
_SIXTEEN_BIT_GREY = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}


RGBImage = npt.NDArray[np.uint8]
"""(H, W, 3) uint8 RGB, C-contiguous: what ``decode_image`` makes and every model takes."""


class ImageRejected(InvalidRequest):
    """The bytes are not an acceptable image; the message says why and what to send."""

    code = "IMAGE_REJECTED"


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What ``decode_image`` accepts.

    ``max_bytes``: encoded size in bytes (8 MiB: a 12 MP phone JPEG is 3-6 MB).
    ``max_pixels``: width * height in the header (25 MP: above any phone or webcam frame a
    scan needs); a larger image is refused unread.
    ``max_decoded_pixels``: the most pixels one image is decoded into (2048x2048 = 4.2 MP:
    12 MB as RGB, a 2560x1600 screenshot; a flat PNG of that size decodes in about 40 ms).
    A JPEG above it is decoded at the weakest of 1/2, 1/4, 1/8 that fits; a PNG or a WebP
    above it is refused, and a progressive JPEG above half of it, since their decoders make
    (or keep) the whole picture whatever the output size.
    ``formats``: accepted formats, among "JPEG", "PNG", "WebP".
    ``jpeg_reduce_to_side``: None reduces JPEGs only to fit ``max_decoded_pixels``. When
    set, a JPEG whose longer side is at least twice this is decoded at 1/2, 1/4 or 1/8
    scale, the strongest reduction that keeps its longer side at least this long: libjpeg
    scales while it decodes, so a 4000x3000 phone photo comes out 2000x1500 (at 1280) in
    about a fifth of the CPU time of a full decode (measured 50 ms against 270 ms). The
    pixels differ from a full decode followed by a resize, and faces shrink with the image:
    set it only where the faces that matter stay above the detector's smallest size at the
    reduced scale.
    """

    max_bytes: int = 8 * _MIB
    max_pixels: int = 25_000_000
    max_decoded_pixels: int = 2048 * 2048
    formats: frozenset[str] = field(default_factory=lambda: frozenset({"JPEG", "PNG", "WebP"}))
    jpeg_reduce_to_side: int | None = None

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.max_decoded_pixels <= 0:
            raise ValueError("max_bytes, max_pixels and max_decoded_pixels must be positive")
        if self.jpeg_reduce_to_side is not None and self.jpeg_reduce_to_side <= 0:
            raise ValueError("jpeg_reduce_to_side must be positive (or None)")
        unknown = self.formats - _OPENERS.keys()
        if unknown:
            raise ValueError(f"unsupported formats {sorted(unknown)}; known: JPEG, PNG, WebP")


def decode_image(data: bytes, limits: DecodeLimits) -> RGBImage:
    """Decode ``data`` to an upright (H, W, 3) uint8 RGB array, or raise ``ImageRejected``.

    Raises ``RuntimeError`` if Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` has been turned
    on in this process: truncated uploads would then decode silently.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images would be accepted; "
            "turn it off"
        )
    accepted = ", ".join(sorted(limits.formats))
    if not data:
        raise ImageRejected(f"the image is empty: send a {accepted} photo")
    if len(data) > limits.max_bytes:
        raise ImageRejected(
            f"image is {len(data) / _MIB:.1f} MiB; the limit is {limits.max_bytes / _MIB:.1f} "
            "MiB: send a smaller or more compressed photo"
        )
    pillow_formats = [_OPENERS[name] for name in sorted(limits.formats)]
    try:
        with Image.open(io.BytesIO(data), formats=pillow_formats) as image:
            _check_header(image, limits)
            _fit_decoding_budget(image, limits)
            return _to_rgb(_load_upright(image))
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected(
            f"the data is not a {accepted} image: send a photo in one of those formats"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"{exc}: send a smaller photo") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        # Pillow reports truncated and corrupt data with these, depending on the codec.
        raise ImageRejected(
            f"the image data is truncated or corrupt ({exc}): send the complete file again"
        ) from None


def _check_header(image: Image.Image, limits: DecodeLimits) -> None:
    """Refuse by what the header declares, before any pixel is decoded."""
    width, height = image.size
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageRejected(
            f"image is {width}x{height} = {pixels / 1e6:.0f} MP; the limit is "
            f"{limits.max_pixels / 1e6:.0f} MP: send a smaller photo"
        )
    if pixels == 0:
        raise ImageRejected(f"image is {width}x{height}: send a real photo")
    # A multi-picture JPEG holds the photo and a preview: its first frame is the photo.
    if getattr(image, "is_animated", False) and image.format != "MPO":
        raise ImageRejected("animated images are not accepted: send a single still photo")


_JPEG_SCALES = (1, 2, 4, 8)
"""The reductions libjpeg applies while decoding (its DCT scaling)."""


def _fit_decoding_budget(image: Image.Image, limits: DecodeLimits) -> None:
    """Before ``image`` is loaded: make its decode fit ``limits.max_decoded_pixels``, or
    refuse it. A JPEG is decoded at the weakest reduction that fits the budget, or the
    strongest that keeps its longer side at least ``jpeg_reduce_to_side``, whichever
    reduces more; other formats decode at full size only, so above the budget they are
    refused before a single pixel is decoded."""
    width, height = image.size
    budget = limits.max_decoded_pixels
    if not isinstance(image, JpegImagePlugin.JpegImageFile):
        if width * height > budget:
            raise ImageRejected(
                f"image is {width}x{height} = {width * height / 1e6:.1f} MP; a {image.format} "
                f"image may have at most {budget / 1e6:.1f} MP: send a smaller picture, or "
                "a JPEG"
            )
        return
    if image.info.get("progressive") and width * height > budget // 2:
        # libjpeg decodes every scan of a progressive JPEG and keeps all its coefficients
        # until the last, at any output scale: each pixel costs about twice a baseline one
        # (a 25 MP one took 150 MB and three times a webcam scan's CPU), so half the budget.
        raise ImageRejected(
            f"image is a progressive JPEG of {width}x{height} = {width * height / 1e6:.1f} MP; "
            f"a progressive JPEG may have at most {budget // 2 / 1e6:.1f} MP: send a smaller "
            "picture, or a standard (baseline) JPEG as cameras write them"
        )
    scale = next((s for s in _JPEG_SCALES if -(-width // s) * -(-height // s) <= budget), None)
    if scale is None:
        raise ImageRejected(
            f"image is {width}x{height} = {width * height / 1e6:.0f} MP, more than "
            f"{_JPEG_SCALES[-1]}x{_JPEG_SCALES[-1]} times the {budget / 1e6:.1f} MP this "
            "service decodes: send a smaller photo"
        )
    side = limits.jpeg_reduce_to_side
    if side is not None:
        longer = max(width, height)
        scale = max(scale, max(s for s in _JPEG_SCALES if longer // s >= side or s == 1))
    if scale == 1:
        return
    # Pillow picks the strongest reduction s with both sides at least size // s: asking for
    # exactly width // scale by height // scale gives ``scale`` (never a stronger one).
    image.draft(None, (max(1, width // scale), max(1, height // scale)))
    if image.size[0] * image.size[1] > budget:
        raise ImageRejected(
            f"image is {width}x{height}: it cannot be decoded within {budget / 1e6:.1f} MP; "
            "send a smaller photo"
        )


def fit_pixels(image: RGBImage, max_pixels: int) -> RGBImage:
    """``image`` scaled down, keeping its proportions, to at most ``max_pixels`` pixels
    (unchanged when it has no more). Box-averaged first by an integer factor, then bilinear:
    about 20 ms from 4 MP, and the face detector's cost falls with the pixels."""
    if max_pixels <= 0:
        raise ValueError("max_pixels must be positive")
    height, width = image.shape[:2]
    if width * height <= max_pixels:
        return image
    factor = (max_pixels / (width * height)) ** 0.5
    size = (max(1, int(width * factor)), max(1, int(height * factor)))
    small = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.ascontiguousarray(np.asarray(small, dtype=np.uint8))


def _load_upright(image: Image.Image) -> Image.Image:
    """Decode the first frame and apply its EXIF orientation."""
    image.load()
    # In place: otherwise an upright photo (nearly every frame) is copied for nothing.
    ImageOps.exif_transpose(image, in_place=True)
    return image


def _to_rgb(image: Image.Image) -> RGBImage:
    """(H, W, 3) uint8 RGB from any mode Pillow decodes JPEG, PNG or WebP into."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_GREY:
        # Pillow's own conversion to "L" clips 16-bit values at 255; scale instead.
        wide = np.asarray(image, dtype=np.int64)
        grey = np.clip((wide * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in _WITH_ALPHA:
        # A transparent background is shown as white by every viewer a person checks with.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    # Pillow's convert copies even an RGB image to RGB: skip it for the usual JPEG.
    rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)
