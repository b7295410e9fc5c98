"""SFace (OpenCV Zoo, 2021dec) as an Embedder: the generic ONNX recogniser with SFace's contract.

SFace takes a 112x112 RGB chip aligned on the ArcFace five-point template (OpenCV's
``FaceRecognizerSF.alignCrop`` uses the same five destination points) as raw pixel values
in NCHW: the graph subtracts 127.5 and multiplies by 1/128 itself. It returns a 128-d
descriptor, compared by cosine. Recognised by its signature: one input ``data``
[N, 3, 112, 112], one output ``fc1`` [N, 128].

It runs one chip a call: the converted graph keeps the released batch of 1 (its quantized
fully connected layer quantizes its input per call, facesvc.models.opencv_zoo), so the embedder
splits the micro-batcher's batches; before that layer was quantized, a batch of 8 on the
freed batch axis took 20 ms a face on this 2-core machine against 16 ms one at a time
(benchmarks/test_bench_embed.py).
"""

from __future__ import annotations

from typing import Any

from facesvc.models.alignment import ARCFACE_TEMPLATE_112
from facesvc.models.onnx_embedder import (
    ColourOrder,
    InputSpec,
    Layout,
    ModelContractError,
    OnnxEmbedder,
)

SFACE_INPUT = InputSpec(
    size=112, layout=Layout.NCHW, colour=ColourOrder.RGB, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
)
"""Pixels as they are: the normalisation is inside the graph."""
SFACE_DIM = 128


def sface_embedder(session: Any) -> OnnxEmbedder:
    """The Embedder for an SFace session; refuses a model with another signature."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != ["data"] or [o.name for o in outputs] != ["fc1"]:
        raise ModelContractError(
            "not an SFace recogniser: expected input 'data' and output 'fc1', got "
            f"{[i.name for i in inputs]} and {[o.name for o in outputs]}"
        )
    return OnnxEmbedder(session, SFACE_INPUT, ARCFACE_TEMPLATE_112, SFACE_DIM)
