"""dlib's serialization primitives decode hand-built bytes, and both shipped DNN files parse
completely into the layer records their architectures call for."""

from __future__ import annotations

import importlib.resources
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from facesvc.models.dlib.format import (
    Affine,
    AvgPool,
    Con,
    DlibFormatError,
    DlibReader,
    Fc,
    InputRGBImagePyramid,
    InputRGBImageSized,
    LossMetric,
    LossMmod,
    MaxPool,
    Relu,
    load_network,
    parse_network,
)

MODELS = Path(str(importlib.resources.files("face_recognition_models") / "models"))


def test_integers_use_a_size_byte_with_sign_bit_and_little_endian_magnitude() -> None:
    r = DlibReader(bytes([0x01, 0x00, 0x01, 0x96, 0x81, 0x11, 0x02, 0x80, 0x12, 0x82, 0x34, 0x12]))
    assert [r.read_int() for _ in range(5)] == [0, 150, -17, 4736, -0x1234]
    assert r.remaining == 0


def test_unsigned_integers_reject_a_sign_bit() -> None:
    with pytest.raises(DlibFormatError):
        DlibReader(bytes([0x81, 0x05])).read_uint()


def test_integer_wider_than_its_type_is_rejected() -> None:
    with pytest.raises(DlibFormatError):
        DlibReader(bytes([0x03, 1, 2, 3])).read_int(max_bytes=2)


def test_floats_are_mantissa_times_two_to_the_exponent() -> None:
    # 0.04f as dlib writes it (the ResNet's loss_metric margin): 0xa3d70a * 2**-28.
    r = DlibReader(bytes([0x03, 0x0A, 0xD7, 0xA3, 0x81, 0x1C]))
    assert r.read_float() == pytest.approx(0.04, rel=1e-7)
    # -1.5 = -3 * 2**-1, then the special exponents for +inf, -inf and nan.
    r = DlibReader(
        bytes([0x81, 0x03, 0x81, 0x01])
        + bytes([0x01, 0x00, 0x02, 0x00, 0x7D])
        + bytes([0x01, 0x00, 0x02, 0x01, 0x7D])
        + bytes([0x01, 0x00, 0x02, 0x02, 0x7D])
    )
    assert r.read_float() == -1.5
    assert r.read_float() == math.inf
    assert r.read_float() == -math.inf
    assert math.isnan(r.read_float())


def test_strings_bools_and_vectors() -> None:
    data = (
        bytes([0x01, 0x05])
        + b"relu_"
        + b"10"
        + bytes([0x01, 0x03, 0x01, 0x07, 0x81, 0x02, 0x01, 0x00])
    )
    r = DlibReader(data)
    assert r.read_string() == "relu_"
    assert r.read_bool() is True
    assert r.read_bool() is False
    assert r.read_vector(lambda rr: rr.read_int()) == [7, -2, 0]
    assert r.remaining == 0


def test_bool_must_be_an_ascii_digit() -> None:
    with pytest.raises(DlibFormatError):
        DlibReader(b"\x01").read_bool()


def test_matrix_with_negated_sizes_is_row_major() -> None:
    one, two, three = ([0x01, v, 0x01, 0x00] for v in (1, 2, 3))
    data = bytes([0x81, 0x01, 0x81, 0x03, *one, *two, *three])
    assert DlibReader(data).read_matrix().tolist() == [[1.0, 2.0, 3.0]]


def test_tensor_version_2_holds_raw_float32_after_its_sizes() -> None:
    values = np.arange(6, dtype=np.float32) - 2.5
    header = bytes([0x01, 0x02, 0x01, 0x01, 0x01, 0x02, 0x01, 0x03, 0x01, 0x01])
    tensor = DlibReader(header + values.astype("<f4").tobytes()).read_tensor()
    assert tensor.shape == (1, 2, 3, 1)
    assert tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor.reshape(-1), values)


@pytest.mark.parametrize(
    ("data", "read"),
    [
        (bytes([0x02, 0x01]), DlibReader.read_int),
        (bytes([0x01, 0x09]) + b"relu", DlibReader.read_string),
        (bytes([0x01, 0x02] + [0x01, 0x01] * 3 + [0x01, 0x02]) + b"\0" * 7, DlibReader.read_tensor),
        (b"", DlibReader.read_float),
    ],
)
def test_truncated_streams_raise(data: bytes, read: Callable[[DlibReader], object]) -> None:
    with pytest.raises(DlibFormatError, match="truncated"):
        read(DlibReader(data))


def test_resnet_file_parses_into_the_face_recognition_architecture() -> None:
    net = load_network(MODELS / "dlib_face_recognition_resnet_model_v1.dat")
    assert isinstance(net.loss, LossMetric)
    assert net.loss.dist_thresh == pytest.approx(0.6)
    assert isinstance(net.input, InputRGBImageSized)
    assert (net.input.nr, net.input.nc) == (150, 150)
    counts = Counter(type(layer).__name__ for layer in net.layers)
    assert counts == {
        "Con": 29,
        "Affine": 29,
        "Relu": 29,
        "TagOrSkip": 22,
        "AddPrev": 14,
        "AvgPool": 5,
        "MaxPool": 1,
        "Fc": 1,
    }
    first = net.layers[0]
    assert isinstance(first, Con)
    assert first.weights.shape == (32, 3, 7, 7)
    assert (first.stride_y, first.padding_y) == (2, 0)
    assert isinstance(net.layers[3], MaxPool)
    assert isinstance(net.layers[-2], AvgPool) and net.layers[-2].nr == 0  # avg_pool_everything
    fc = net.layers[-1]
    assert isinstance(fc, Fc)
    assert fc.weights.shape == (256, 128) and fc.bias is None
    assert all(a.mode == "conv" for a in net.layers if isinstance(a, Affine))


def test_mmod_file_parses_with_its_loss_options() -> None:
    net = load_network(MODELS / "mmod_human_face_detector.dat")
    assert isinstance(net.input, InputRGBImagePyramid)
    assert isinstance(net.loss, LossMmod)
    options = net.loss.options
    assert [(w.width, w.height) for w in options.detector_windows] == [(80, 80)]
    assert options.overlaps_nms.iou_thresh == pytest.approx(0.33827, abs=1e-5)
    assert options.overlaps_nms.percent_covered_thresh == 1.0
    assert options.overlaps_ignore.iou_thresh == 0.5
    assert options.assume_image_pyramid == 1
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds == ["Con", "Affine", "Relu"] * 6 + ["Con"]
    cons = [layer for layer in net.layers if isinstance(layer, Con)]
    assert [c.num_filters for c in cons] == [16, 32, 32, 45, 45, 45, 1]
    assert [c.stride_y for c in cons] == [2, 2, 2, 1, 1, 1, 1]
    assert isinstance(net.layers[2], Relu)
    # The file stores batch-norm statistics; they come back as dlib's equivalent affine.
    affine = net.layers[1]
    assert isinstance(affine, Affine) and affine.gamma.shape == (16,)
    assert np.all(np.isfinite(affine.gamma)) and np.all(np.isfinite(affine.beta))


def test_truncated_network_file_is_rejected() -> None:
    data = (MODELS / "mmod_human_face_detector.dat").read_bytes()
    with pytest.raises(DlibFormatError, match="truncated"):
        parse_network(data[: len(data) - 10])


def test_trailing_bytes_after_a_network_are_rejected() -> None:
    data = (MODELS / "mmod_human_face_detector.dat").read_bytes()
    with pytest.raises(DlibFormatError, match="unexpected bytes"):
        parse_network(data + b"\x00")
