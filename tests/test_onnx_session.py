"""Every model's ONNX Runtime session is configured the same way, from one settings object."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from facesvc.models.onnx_session import SessionSettings, create_session


def relu_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_session_runs_on_cpu_with_the_requested_threads() -> None:
    session = create_session(relu_model(), SessionSettings(intra_threads=2, denormal_as_zero=True))
    assert session.get_providers() == ["CPUExecutionProvider"]
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"
    (y,) = session.run(None, {"x": np.array([[-1.0, 2.0]], dtype=np.float32)})
    np.testing.assert_array_equal(y, [[0.0, 2.0]])


def test_zero_threads_is_refused() -> None:
    with pytest.raises(ValueError, match="intra_threads"):
        SessionSettings(intra_threads=0)


def test_no_memory_pattern_is_kept_per_input_shape() -> None:
    # Patterns are kept per shape for the session's life; frames come in any size (issue
    # 18.1: memory must come back after large frames). Runs of new shapes still work.
    session = create_session(relu_model(), SessionSettings())
    assert session.get_session_options().enable_mem_pattern is False
    for rows in (1, 7, 300):
        (y,) = session.run(None, {"x": np.full((rows, 2), -1.0, dtype=np.float32)})
        assert y.shape == (rows, 2) and not y.any()
