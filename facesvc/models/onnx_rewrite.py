"""Weight-preserving rewrites of third-party ONNX graphs, applied once at conversion time.

Each rewrite keeps every weight as it is and computes the same function (up to float
rounding); it only changes how ONNX Runtime gets to run the graph:

- ``drop_initializer_inputs``: exporters of older opsets list every weight twice, as an
  initializer and as a graph input. ONNX Runtime must then treat the weights as values a
  caller could override, which stops it from folding them into the operators (constant
  folding, Conv+BatchNormalization fusion, pre-packed weights). Removing them from the
  inputs makes them constants again.
- ``prelu_as_relu``: ``PRelu(x, a) = max(x, 0) + a * min(x, 0)``, written as ``Relu(x) +
  a * Min(x, 0)``. ONNX Runtime's CPU PRelu with a per-channel slope broadcasts slowly and
  blocks the fusion of the preceding convolution; the four elementwise operators do not.
  With ``per_channel_as_conv`` a per-channel slope of a 4-D activation is applied by 1x1
  depthwise convolutions instead (``min(x, 0) = -relu(-x)``: one with weight -1 and a
  fused Relu, one with weight -a), which ONNX Runtime keeps in its blocked NCHWc layout:
  the elementwise form made it convert every activation out of that layout and back
  (14% of SFace's time) and cost another 20% in the four operators.
- ``free_axes``: replaces fixed sizes of input and output axes (a batch of 1, an input of
  640x640 that the network does not need) by symbolic ones, and forgets the intermediate
  shapes the exporter recorded for the fixed sizes (ONNX Runtime re-infers them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper


def drop_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (changed in place and returned) without graph inputs that are initializers."""
    weights = {init.name for init in model.graph.initializer}
    kept = [value for value in model.graph.input if value.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def prelu_as_relu(model: onnx.ModelProto, per_channel_as_conv: bool = False) -> onnx.ModelProto:
    """``model`` (changed in place and returned) with every PRelu node replaced by
    ``Relu(x) + slope * Min(x, 0)``, the same slope tensor feeding the multiplication (with
    ``per_channel_as_conv``, a (C, 1, 1) slope by the depthwise form of the module doc)."""
    zero = _unique_name(model, "prelu_rewrite_zero")
    weights = {init.name: init for init in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        x, slope = node.input
        (y,) = node.output
        base = node.name or y
        positive, negative, scaled = f"{y}__pos", f"{y}__neg", f"{y}__neg_scaled"
        per_channel = _per_channel(weights.get(slope))
        if per_channel_as_conv and per_channel is not None:
            channels = per_channel.size
            flip, times = f"{y}__flip_w", f"{y}__slope_w"
            added += [
                numpy_helper.from_array(np.full((channels, 1, 1, 1), -1.0, np.float32), flip),
                numpy_helper.from_array((-per_channel).reshape(channels, 1, 1, 1), times),
            ]
            depthwise: dict[str, Any] = {"group": channels, "kernel_shape": [1, 1]}
            nodes += [
                helper.make_node("Relu", [x], [positive], name=f"{base}__relu"),
                helper.make_node(
                    "Conv", [x, flip], [f"{y}__flip"], name=f"{base}__flip", **depthwise
                ),
                helper.make_node("Relu", [f"{y}__flip"], [negative], name=f"{base}__negrelu"),
                helper.make_node(
                    "Conv", [negative, times], [scaled], name=f"{base}__times", **depthwise
                ),
                helper.make_node("Add", [positive, scaled], [y], name=f"{base}__add"),
            ]
            rewritten += 1
            continue
        nodes += [
            helper.make_node("Relu", [x], [positive], name=f"{base}__relu"),
            helper.make_node("Min", [x, zero], [negative], name=f"{base}__min"),
            helper.make_node("Mul", [negative, slope], [scaled], name=f"{base}__mul"),
            helper.make_node("Add", [positive, scaled], [y], name=f"{base}__add"),
        ]
        rewritten += 1
    if rewritten:
        model.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), zero))
        model.graph.initializer.extend(added)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        used = {name for n in model.graph.node for name in n.input}
        kept = [init for init in model.graph.initializer if init.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return model


def _per_channel(tensor: onnx.TensorProto | None) -> npt.NDArray[np.float32] | None:
    """The (C,) slope of a constant (C, 1, 1) PRelu slope, else None."""
    if tensor is None:
        return None
    value = numpy_helper.to_array(tensor)
    if value.ndim != 3 or value.shape[1:] != (1, 1):
        return None
    return np.asarray(value.reshape(-1), dtype=np.float32)


def free_axes(
    model: onnx.ModelProto,
    inputs: Mapping[str, Mapping[int, str]],
    outputs: Mapping[str, Mapping[int, str]],
) -> onnx.ModelProto:
    """``model`` (changed in place and returned) with the listed axes of its inputs and
    outputs made symbolic, e.g. inputs ``{"input": {2: "H", 3: "W"}}``; the intermediate
    shapes the exporter recorded for the fixed sizes are dropped (re-inferred at load)."""
    values = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    for name, named_axes in [*inputs.items(), *outputs.items()]:
        if name not in values:
            raise ValueError(f"the model has no input or output {name!r}")
        dims = values[name].type.tensor_type.shape.dim
        for axis, symbol in named_axes.items():
            if not 0 <= axis < len(dims):
                raise ValueError(f"{name!r} has {len(dims)} axes, not an axis {axis}")
            dims[axis].dim_param = symbol  # replaces dim_value (a oneof)
    del model.graph.value_info[:]
    return model


def _unique_name(model: onnx.ModelProto, stem: str) -> str:
    taken = {init.name for init in model.graph.initializer}
    taken |= {out for node in model.graph.node for out in node.output}
    taken |= {value.name for value in model.graph.input}
    name, k = stem, 0
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    return name
