"""Capturing a model's intermediate activations on a calibration set, one batch at a time.

Data-aware compression needs what each layer actually sees: the chosen intermediate tensors
are exposed as extra graph outputs and the set is run through ONNX Runtime batch by batch;
a reducer can take each batch and drop it, so that memory holds one batch.

API (others code against it; add, do not break):

``capture(model, calibration, tensors, *, provider="cpu", max_positions=None,
seed=0, progress=None, reducer=None) -> dict[str, np.ndarray]``
    Runs ORT once per batch with ``tensors`` (intermediate tensor names or
    graph inputs/outputs) exposed as outputs (their value_info from shape
    inference when available). Without ``reducer`` it returns each tensor's
    batches concatenated on axis 0. With ``max_positions`` every tensor of rank
    ≥ 3 becomes a (rows, features) matrix of at most ``max_positions`` random
    positions per sample (seeded; all positions, in order, when there are
    fewer): channel-first (N, C, *spatial) → features = C, unless the tensor is
    a MatMul operand/result, which is channel-last (N, ..., K) → features = K.
    Tensors with the same shape get the same positions in a batch, so a
    stride-1 conv's input and output rows correspond. With ``reducer`` (a
    callable ``reducer(name, array)``, e.g. :class:`GramReducer`) nothing is
    held: each batch is handed over and dropped; the result is
    ``{name: reducer.result(name)}`` when the reducer has ``result``, else {}.
    ``progress(done_samples, total_samples, "calibration")`` after each batch.

``GramReducer`` accumulates, per tensor, the float64 second moment E[x xᵀ],
the mean and the row count of (rows, features) matrices (a tensor of rank > 2
is read channel-last: rows = all leading axes) and returns :class:`LayerStats`.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx

from onnxlr.calib.loading import load_calibration
from onnxlr.errors import OnnxlrError
from onnxlr.linalg.whiten import LayerStats

__all__ = ["GramReducer", "capture", "expose"]


def expose(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with the named intermediate tensors added as graph outputs.

    Types come from shape inference when it succeeds (a bare name otherwise, which ORT
    accepts). Graph inputs are not exposed (their values are the feeds).

    Raises:
        OnnxlrError: a name that no node produces and that is no graph input.
    """
    from onnxlr.graph import infer_shapes

    produced = {o for n in model.graph.node for o in n.output if o}
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    unknown = [t for t in tensors if t not in produced and t not in inputs]
    if unknown:
        inits = {t.name for t in model.graph.initializer}
        what = "is a constant initializer" if unknown[0] in inits else "is not in the graph"
        raise OnnxlrError(f"cannot capture tensor {unknown[0]!r}: it {what}")
    wanted = [t for t in dict.fromkeys(tensors) if t not in outputs and t not in inputs]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    if not wanted:
        return exposed
    # a model onnxlr exported already carries its inferred shapes: infer only what is missing
    known = {v.name: v for v in model.graph.value_info if _typed(v)}
    if any(name not in known for name in wanted):
        known = {v.name: v for v in infer_shapes(model).graph.value_info}
    for name in wanted:
        vi = known.get(name)
        exposed.graph.output.append(vi if vi is not None else onnx.ValueInfoProto(name=name))
    return exposed


def _typed(vi: onnx.ValueInfoProto) -> bool:
    """A tensor value_info with an element type and a shape."""
    tt = vi.type.tensor_type
    return vi.type.HasField("tensor_type") and bool(tt.elem_type) and tt.HasField("shape")


def _channel_last(model: onnx.ModelProto) -> set[str]:
    """Tensors read channel-last when subsampled: MatMul left operands and results."""
    out = set()
    for n in model.graph.node:
        if n.op_type == "MatMul":
            out.add(n.input[0])
            out.update(n.output)
    return out


def _subsample(arr: np.ndarray, channel_last: bool, max_positions: int,
               rng: np.random.Generator) -> np.ndarray:
    """(N, C, *sp) or (N, ..., K) → (rows, features) with ≤ max_positions rows per sample."""
    if arr.ndim < 3:
        return arr
    if channel_last:
        flat = arr.reshape(arr.shape[0], -1, arr.shape[-1])
    else:
        flat = arr.reshape(arr.shape[0], arr.shape[1], -1).transpose(0, 2, 1)
    n, p, c = flat.shape
    if p <= max_positions:
        return flat.reshape(n * p, c)
    idx = np.stack([rng.choice(p, size=max_positions, replace=False) for _ in range(n)])
    return np.take_along_axis(flat, idx[:, :, None], axis=1).reshape(n * max_positions, c)


def capture(model: onnx.ModelProto, calibration: Any, tensors: list[str], *,
            provider: str = "cpu", max_positions: int | None = None, seed: int = 0,
            progress: Callable[[int, int, str], None] | None = None,
            reducer: Callable[[str, np.ndarray], None] | None = None) -> dict[str, np.ndarray]:
    """Run the calibration set through ``model`` and collect the named tensors.

    See the module docstring for the shapes returned and the reducer protocol.

    Raises:
        OnnxlrError: an unknown tensor name, bad calibration data, or ORT failing to run.
    """
    from onnxlr import runtime  # lazy: imports onnxruntime

    if max_positions is not None and max_positions < 1:
        raise OnnxlrError(f"invalid max_positions {max_positions}: must be >= 1")
    calib = load_calibration(calibration, model)
    tensors = list(dict.fromkeys(tensors))
    session = runtime.make_session(expose(model, tensors), provider=provider)
    last = _channel_last(model)
    held: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    done, total = 0, calib.num_samples
    for b, feeds in enumerate(calib):
        outputs = runtime.run(session, feeds)
        for name in tensors:
            arr = feeds[name] if name in feeds else outputs[name]
            if max_positions is not None:
                # seeded by batch and shape: tensors of equal shape get equal positions
                rng = np.random.default_rng([seed, b, *arr.shape])
                arr = _subsample(arr, name in last, max_positions, rng)
            if reducer is not None:
                reducer(name, arr)
            else:
                held[name].append(arr)
        done += next(iter(feeds.values())).shape[0]
        if progress:
            progress(done, total, "calibration")
    if reducer is not None:
        result = getattr(reducer, "result", None)
        return {t: result(t) for t in tensors} if result else {}
    return {t: np.concatenate(v) if len(v) > 1 else v[0] for t, v in held.items() if v}


class GramReducer:
    """Running float64 E[x xᵀ], mean and count per tensor: a :func:`capture` reducer.

    Rows of a (rows, features) matrix are samples; an array of rank > 2 is read
    channel-last (use ``max_positions`` to get channel-first maps as rows).
    """

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._gram: dict[str, np.ndarray] = {}
        self._count: dict[str, int] = {}

    def __call__(self, name: str, array: np.ndarray) -> None:
        x = np.asarray(array, dtype=np.float64)
        x = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
        if name not in self._gram:
            d = x.shape[1]
            self._sum[name], self._gram[name], self._count[name] = np.zeros(d), np.zeros((d, d)), 0
        self._sum[name] += x.sum(axis=0)
        self._gram[name] += x.T @ x
        self._count[name] += x.shape[0]

    def result(self, name: str) -> LayerStats:
        n = self._count.get(name, 0)
        if n == 0:
            raise OnnxlrError(f"no calibration rows were captured for tensor {name!r}")
        return LayerStats(gram=self._gram[name] / n, mean=self._sum[name] / n, count=n)
