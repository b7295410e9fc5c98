"""Any ONNX face recogniser as an Embedder, described by its input contract.

An ArcFace-class model takes an aligned square chip (e.g. 112x112 from the ArcFace
five-point template), scaled as ``(pixel - mean) / std`` per channel, in a stated
channel order and memory layout, and returns one descriptor per chip. ``InputSpec``
states that contract; ``OnnxEmbedder`` checks it against the model's declared input
and output shapes when it is built, so a wrong manifest fails at start-up with the
model's real shape in the message, never with a wrong descriptor at run time.

A model exported with a fixed batch size (often 1) is found by its declared batch axis
at load and is run that many chips at a time (the last call padded), so the batcher's
batches of any size reach it in calls it accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from facesvc.models.alignment import ARCFACE_TEMPLATE_112, warp_to_template
from facesvc.models.types import Points, RGBImage, unit_descriptors

FloatArray = npt.NDArray[np.float32]


class Layout(StrEnum):
    NCHW = "NCHW"
    NHWC = "NHWC"


class ColourOrder(StrEnum):
    RGB = "RGB"
    BGR = "BGR"


ALIGNMENT_TEMPLATES: dict[str, tuple[Points, int]] = {
    "arcface_112": (ARCFACE_TEMPLATE_112, 112),
}
"""Named five-point templates: (5, 2) chip pixels (left eye, right eye, nose tip, left
and right mouth corner, image left first) and the chip side they are defined for."""


class ModelContractError(ValueError):
    """A model file does not have the inputs or outputs its manifest describes."""


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What a recogniser expects as input.

    ``size``: chip side in pixels (chips are square). ``mean`` and ``std`` are per
    channel, in the model's channel order (``colour``), on 0..255 pixel values.
    """

    size: int
    layout: Layout
    colour: ColourOrder
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"input size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ValueError("mean and std need 3 values each and std must not be 0")

    def tensor(self, chips: npt.NDArray[np.uint8]) -> FloatArray:
        """The model input for (N, size, size, 3) uint8 RGB chips: float32 in ``layout``."""
        if chips.ndim != 4 or chips.shape[1:] != (self.size, self.size, 3):
            raise ValueError(
                f"chips must be (N, {self.size}, {self.size}, 3) uint8 RGB, got {chips.shape}"
            )
        x: FloatArray = chips.astype(np.float32)
        if self.colour is ColourOrder.BGR:
            x = x[..., ::-1]
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        x = np.asarray((x - mean) / std, dtype=np.float32)
        if self.layout is Layout.NCHW:
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float32)

    def expected_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) or (H, W, C) part of the input shape after the batch axis."""
        if self.layout is Layout.NCHW:
            return (3, self.size, self.size)
        return (self.size, self.size, 3)


def _fixed(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class OnnxEmbedder:
    """An :class:`facesvc.models.types.Embedder` over an ONNX Runtime session.

    ``template`` (5, 2) chip pixels is where the five landmarks given to ``align`` go.
    """

    def __init__(
        self,
        session: Any,
        spec: InputSpec,
        template: Points,
        output_size: int,
    ) -> None:
        inputs = session.get_inputs()
        outputs = session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelContractError(
                f"a recogniser needs one input and an output, the model has {len(inputs)} "
                f"input(s) and {len(outputs)} output(s)"
            )
        shape = list(inputs[0].shape)
        declared = tuple(_fixed(d) for d in shape[1:])
        wanted = spec.expected_shape()
        if len(shape) != 4 or any(
            d is not None and d != w for d, w in zip(declared, wanted, strict=False)
        ):
            raise ModelContractError(
                f"the manifest describes input {inputs[0].name!r} as [N, "
                f"{', '.join(map(str, wanted))}] ({spec.layout.value}), but the model declares "
                f"{shape}: fix input_size/layout in the manifest"
            )
        out_shape = list(outputs[0].shape)
        if len(out_shape) != 2 or _fixed(out_shape[1]) not in (None, output_size):
            raise ModelContractError(
                f"the manifest says output_size {output_size}, but output {outputs[0].name!r} "
                f"is {out_shape}: fix output_size in the manifest"
            )
        if template.shape != (5, 2):
            raise ValueError(f"alignment template must be (5, 2), got {template.shape}")
        self._session = session
        self._input = inputs[0].name
        self._output = outputs[0].name
        self.fixed_batch = _fixed(shape[0])
        """The batch size the model was exported with, or None when its batch axis is free."""
        self._spec = spec
        self._template = template
        self.dim = output_size
        self.chip_size = spec.size

    def align(self, image: RGBImage, landmarks: Points) -> RGBImage:
        """The (size, size, 3) chip with the five ``landmarks`` (image pixels) on the template."""
        return warp_to_template(image, landmarks, self._template, self.chip_size)

    def embed_raw(self, chips: npt.NDArray[np.uint8]) -> FloatArray:
        """(N, dim) float32 descriptors as the model outputs them."""
        tensor = self._spec.tensor(chips)
        if self.fixed_batch is None:
            return self._run(tensor, len(chips))
        step = self.fixed_batch
        parts = []
        for start in range(0, len(chips), step):
            part = tensor[start : start + step]
            count = len(part)
            if count < step:
                filler = np.zeros((step - count, *part.shape[1:]), np.float32)
                part = np.concatenate([part, filler])
            parts.append(self._run(part, len(part))[:count])
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def _run(self, tensor: FloatArray, count: int) -> FloatArray:
        out = self._session.run([self._output], {self._input: tensor})[0]
        result = np.asarray(out, dtype=np.float32).reshape(count, -1)
        if result.shape[1] != self.dim:
            raise ModelContractError(
                f"the model returned {result.shape[1]}-d descriptors, the manifest says {self.dim}"
            )
        return result

    def embed(self, chips: npt.NDArray[np.uint8]) -> FloatArray:
        """(N, dim) float32 L2-normalised descriptors for (N, size, size, 3) uint8 RGB chips."""
        return unit_descriptors(self.embed_raw(chips))
