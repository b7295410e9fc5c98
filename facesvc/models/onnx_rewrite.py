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
- ``free_axes``: replaces fixed sizes of input and output axes (a batch of 1, an input of
  640x640 that the network does not need) by symbolic ones, and forgets the intermediate
  shapes the exporter recorded for the fixed sizes (ONNX Runtime re-infers them).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper


def drop_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (changed in place and returned) without graph inputs that are initializers."""
    weights = {init.name for init in model.graph.initializer}
    kept = [value for value in model.graph.input if value.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def prelu_as_relu(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (changed in place and returned) with every PRelu node replaced by
    ``Relu(x) + slope * Min(x, 0)``, the same slope tensor feeding the multiplication."""
    zero = _unique_name(model, "prelu_rewrite_zero")
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        x, slope = node.input
        (y,) = node.output
        base = node.name or y
        positive, negative, scaled = f"{y}__pos", f"{y}__neg", f"{y}__neg_scaled"
        nodes += [
            helper.make_node("Relu", [x], [positive], name=f"{base}__relu"),
            helper.make_node("Min", [x, zero], [negative], name=f"{base}__min"),
            helper.make_node("Mul", [negative, slope], [scaled], name=f"{base}__mul"),
            helper.make_node("Add", [positive, scaled], [y], name=f"{base}__add"),
        ]
        rewritten += 1
    if rewritten:
        model.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), zero))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


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
