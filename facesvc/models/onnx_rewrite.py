"""Rewrites of third-party ONNX graphs, applied once at conversion time.

Each rewrite but the last keeps every weight as it is and computes the same function (up to
float rounding); it only changes how ONNX Runtime gets to run the graph:

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

One rewrite rounds weights, and is applied only where its accuracy was measured:

- ``gemm_as_int8``: a fully connected layer (``Gemm`` with constant weights) becomes ONNX
  Runtime's ``DynamicQuantizeMatMul``: the weights as 8-bit integers with one scale per
  output, the input quantized to 8 bits on every call. For one face a call such a layer is
  bound by reading its weights (SFace's: 128 x 50,176 floats, 26 MB), and a quarter of the
  bytes is most of the gain. The weights use 7 bits of the 8 ([-63, 63]): on a CPU without
  VNNI (AVX2) ONNX Runtime adds two products of the 8-bit input and a weight in 16 bits,
  which saturates at full range (an SFace descriptor then moved to cosine 0.9997 of the
  float graph's, against 0.99997 with 7 bits: docs/accuracy.md). The input's scale is
  taken over the whole call, so a graph so rewritten must keep a batch of 1: a face's
  descriptor may not depend on the faces beside it.
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
        added.append(numpy_helper.from_array(np.array(0.0, np.float32), zero))
        _replace_nodes(model, nodes, added)
    return model


def gemm_as_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (changed in place and returned) with every ``Gemm`` of constant 2-D weights,
    a constant 1-D bias, ``alpha = beta = 1`` and an untransposed input replaced by
    ``DynamicQuantizeMatMul`` (module doc); other Gemms are left as they are. Each output
    column's weights are scaled symmetrically into [-63, 63] (module doc: why 7 bits)."""
    weights = {init.name: init for init in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    for node in model.graph.node:
        weight = _quantizable_gemm(node, weights)
        if weight is None:
            nodes.append(node)
            continue
        scale = np.abs(weight).max(axis=0) / _WEIGHT_LIMIT
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        quantized = np.clip(np.round(weight / scale), -_WEIGHT_LIMIT, _WEIGHT_LIMIT)
        quantized = quantized.astype(np.int8)
        base = node.name or node.output[0]
        names = (f"{base}__int8_w", f"{base}__int8_scale", f"{base}__int8_zero")
        added += [
            numpy_helper.from_array(quantized, names[0]),
            numpy_helper.from_array(scale, names[1]),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), names[2]),
        ]
        nodes.append(
            helper.make_node(
                "DynamicQuantizeMatMul",
                [node.input[0], *names, node.input[2]],
                list(node.output),
                name=f"{base}__int8",
                domain=_MICROSOFT,
            )
        )
    if added:
        _replace_nodes(model, nodes, added)
        if all(o.domain != _MICROSOFT for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(_MICROSOFT, 1))
    return model


_MICROSOFT = "com.microsoft"
_WEIGHT_LIMIT = 63


def _replace_nodes(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], added: list[onnx.TensorProto]
) -> None:
    """Make ``nodes`` the graph's nodes with the ``added`` initializers, and drop every
    initializer no node reads any more (the weights a rewrite replaced)."""
    model.graph.initializer.extend(added)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for n in model.graph.node for name in n.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _quantizable_gemm(
    node: onnx.NodeProto, weights: Mapping[str, onnx.TensorProto]
) -> npt.NDArray[np.float32] | None:
    """The (K, N) float weights of a Gemm ``gemm_as_int8`` can rewrite, else None."""
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
        return None
    if attributes.get("transA", 0) != 0:
        return None
    weight, bias = weights.get(node.input[1]), weights.get(node.input[2])
    if weight is None or bias is None or len(weight.dims) != 2 or len(bias.dims) != 1:
        return None
    value = np.asarray(numpy_helper.to_array(weight), dtype=np.float32)
    value = value.T if attributes.get("transB", 0) else value
    return value if tuple(bias.dims) == (value.shape[1],) else None


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
