"""The one place that creates ONNX Runtime sessions, so every model runs with the same settings.

Each session runs on the CPU provider with ``intra_threads`` threads for one operator,
one inter-op thread and sequential execution: concurrency comes from the micro-batcher
and worker processes, not from ONNX Runtime spreading one call over the machine. Memory
patterns are off: they are kept per input shape, and frames come in any size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """How a model's session runs.

    ``intra_threads``: threads for one operator (>= 1). ``denormal_as_zero``: flush denormal
    floats to zero (the FAS model is pathologically slow without it). ``optimize``: apply all
    of ONNX Runtime's graph optimisations (off only to debug a graph). ``spin``: let idle
    intra-op threads busy-wait for the next operator (a little lower latency on an idle
    machine, but on a shared one or beside other workers it burns the cores the other
    requests need, so it is off by default).
    """

    intra_threads: int = 1
    denormal_as_zero: bool = False
    optimize: bool = True
    spin: bool = False

    def __post_init__(self) -> None:
        if self.intra_threads < 1:
            raise ValueError(f"intra_threads must be >= 1, got {self.intra_threads}")


def create_session(model: Path | bytes, settings: SessionSettings) -> ort.InferenceSession:
    """An ``InferenceSession`` for the ONNX file at ``model`` (or its serialized bytes)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Memory patterns are planned and kept per input shape, in the arena, for the process's
    # life: after frames of 40 sizes a caller chose, the pipeline kept 48 MB more with them
    # than without (98 against 50 MB), and a webcam scan ran no faster with them.
    options.enable_mem_pattern = False
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if settings.optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if not settings.spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if settings.denormal_as_zero:
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
