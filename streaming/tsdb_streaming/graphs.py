"""ONNX Runtime sessions for an export's graphs, checked against the metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import onnxruntime as ort

from .errors import StreamingError


def session_options(intra_op_num_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_num_threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def open_graph(path: Path, opts: ort.SessionOptions, providers: Sequence[str], names: Sequence[str],
               fixed: dict[str, Sequence], what: str) -> ort.InferenceSession:
    """A session on ``path`` whose inputs are ``names`` (in order) and whose inputs in
    ``fixed`` have those shapes (``None``: a dynamic axis)."""
    try:
        sess = ort.InferenceSession(str(path), opts, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types for a damaged graph
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StreamingError(f"{path}: onnxruntime cannot load this graph ({first}); re-export the model") from None
    got = {i.name: i.shape for i in sess.get_inputs()}
    if list(got) != list(names):
        raise StreamingError(f"{what}: graph inputs {list(got)} differ from the metadata {list(names)}")
    for name, shape in fixed.items():
        actual = got[name]
        if len(actual) != len(shape) or any(s is not None and a != s for a, s in zip(actual, shape)):
            raise StreamingError(f"{what}: input {name} has shape {actual}, metadata implies {list(shape)}")
    return sess


__all__ = ["open_graph", "session_options"]
