"""Benchmark room: time several ONNX models against each other with ONNX Runtime.

Why it works this way: the machines onnxlr runs on are often shared and noisy,
so an absolute latency means little from one run to the next. What holds up is
a *ratio measured side by side in one process*. Every model gets its own ORT
session in this process, the same feeds, the same provider, thread count and
graph optimisation level; after a warm-up the sessions are run interleaved
(A, B, A, B, ...), so clock boost, throttling and noisy neighbours hit every
model alike, and each model's speed-up against the first is the median of the
per-round ratios ``t_first / t_model``. Medians (with p10/p90 for the spread)
are reported rather than means; a wide p10-p90 spread flags a busy machine.
See ``shared/BENCHMARKING.md`` for the rules this follows.

What is measured:

- latency: one ``session.run`` with NumPy feeds, wall time (``perf_counter``).
  With ``provider="cuda"`` the host-to-device and device-to-host copies are
  included (``run`` is synchronous), as a plain ORT user would see them.
- throughput: ``batch / median latency`` in samples per second.
- params: elements of the float initializers and ``Constant`` node tensors
  (subgraphs included).
- peak RSS: see :class:`onnxlr.machine.PeakRSS` for the method and its limits. It is host
  memory only; GPU memory is not counted.

This module checks the models and times them; what it found and how that is printed is
:mod:`onnxlr.bench_result`, the machine and memory probes are :mod:`onnxlr.machine` (all
re-exported here).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import external_data_helper

from onnxlr.bench_result import NOISY_SPREAD, SCHEMA, BenchResult, ModelBench  # noqa: F401
from onnxlr.errors import OnnxlrError
from onnxlr.graph import feedable_inputs
from onnxlr.io import load_model
from onnxlr.machine import PeakRSS, machine_description  # noqa: F401
from onnxlr.runtime import (LatencyStats, interleaved_latency, make_inputs,  # noqa: F401
                            make_session, providers_for, run, session_options)

logger = logging.getLogger(__name__)

__all__ = ["BenchResult", "ModelBench", "NOISY_SPREAD", "SCHEMA", "benchmark", "count_params"]

_FLOAT_TYPES = frozenset(
    v for k, v in onnx.TensorProto.DataType.items() if "FLOAT" in k or k == "DOUBLE")


# --- model facts --------------------------------------------------------------------------------

def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _elements(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1


def count_params(model: onnx.ModelProto) -> int:
    """Elements of float initializers and of float ``Constant`` node values (subgraphs included).

    Integer tensors (shapes, indices) are not weights and are not counted.
    """
    total = 0
    for g in _graphs(model.graph):
        total += sum(_elements(t) for t in g.initializer if t.data_type in _FLOAT_TYPES)
        total += sum(_elements(s.values) for s in g.sparse_initializer
                     if s.values.data_type in _FLOAT_TYPES)
        for node in g.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
                    total += _elements(attr.t)
                elif attr.name == "value_float":
                    total += 1
                elif attr.name == "value_floats":
                    total += len(attr.floats)
    return total


def _file_bytes(path: Path) -> int:
    """Size of the model file plus every external data file it names (each counted once)."""
    size = path.stat().st_size
    light = onnx.load_model(str(path), load_external_data=False)
    locations = {external_data_helper.ExternalDataInfo(t).location
                 for t in external_data_helper._get_all_tensors(light)
                 if external_data_helper.uses_external_data(t)}
    for loc in locations:  # load_model has already checked these locations are safe
        try:
            size += (path.parent / loc).stat().st_size
        except OSError:
            pass
    return size


@dataclass
class _Info:
    path: str
    params: int
    file_bytes: int
    inputs: list[tuple[str, int, tuple | None]]   # name, elem type, dims (int or str) or None


def _input_spec(model: onnx.ModelProto) -> list[tuple[str, int, tuple | None]]:
    spec = []
    for v in feedable_inputs(model):
        tt = v.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                         else (d.dim_param or "?") for d in tt.shape.dim)
        spec.append((v.name, tt.elem_type, dims))
    return spec


def _describe(path: str) -> tuple[onnx.ModelProto, _Info]:
    model = load_model(path)
    return model, _Info(path, count_params(model), _file_bytes(Path(path)), _input_spec(model))


def _format_spec(spec: list[tuple[str, int, tuple | None]]) -> str:
    def one(name, elem, dims):
        dtype = onnx.TensorProto.DataType.Name(elem).lower() if elem else "?"
        shape = "?" if dims is None else "[" + ",".join(map(str, dims)) + "]"
        return f"{name}: {dtype}{shape}"
    return ", ".join(one(*s) for s in spec) or "(none)"


def _check_same_inputs(first: _Info, other: _Info, feeds: dict[str, np.ndarray]) -> None:
    """Refuse a model whose inputs differ from the first one's (names, dtypes, fixed dims).

    A symbolic dim in either model matches anything: what matters is that the
    shared feeds (made from the first model) fit this model.
    """
    def fail(why: str) -> OnnxlrError:
        return OnnxlrError(f"models take different inputs, so they cannot be timed on the same "
                           f"feeds: {why}; {first.path} takes ({_format_spec(first.inputs)}), "
                           f"{other.path} takes ({_format_spec(other.inputs)})")
    names_a = [s[0] for s in first.inputs]
    names_b = [s[0] for s in other.inputs]
    if sorted(names_a) != sorted(names_b):
        raise fail("input names differ")
    spec_a = {s[0]: s for s in first.inputs}
    for name, elem, dims in other.inputs:
        if elem != spec_a[name][1]:
            raise fail(f"input {name!r} has a different dtype")
        if dims is None:
            continue
        shape = feeds[name].shape
        if len(dims) != len(shape):
            raise fail(f"input {name!r} has a different rank")
        for axis, (d, n) in enumerate(zip(dims, shape)):
            if isinstance(d, int) and d != n:
                raise fail(f"input {name!r} has a different size at axis {axis}")


def _effective_batch(feeds: dict[str, np.ndarray], batch: int) -> int:
    """The batch the feeds really carry.

    Fixed leading dims (in the model or from ``input_shapes``) win over
    ``batch``; when every feed has rank >= 2 and they share a leading dim, that
    dim is the batch. Otherwise (rank-0/1 inputs, disagreeing leading dims)
    ``batch`` is taken as given.
    """
    arrays = list(feeds.values())
    if arrays and all(a.ndim >= 2 for a in arrays):
        leading = {a.shape[0] for a in arrays}
        if len(leading) == 1:
            (d,) = leading
            if d != batch:
                logger.warning("the feeds' leading dim is %d, not --batch %d: throughput uses %d",
                               d, batch, d)
            return int(d)
    return batch


# --- the benchmark -----------------------------------------------------------------------------

def benchmark(paths: list[str], *, provider: str = "cpu", threads: int | None = None,
              batch: int = 1,
              input_shapes: dict | None = None, opt_level: str = "all", warmup: int = 10,
              iterations: int = 100, max_seconds: float | None = None, seed: int = 0,
              inputs: str | None = None) -> BenchResult:
    """Time models side by side in this process and compare them with the first.

    Args:
        paths: model files; the first is the reference for ``speedup``. The
            same file may be given twice (a sanity check: expect ~1.0x).
        provider: ``cpu``, ``cuda`` or ``tensorrt`` (see :func:`runtime.providers_for`).
        threads: intra-op threads for every session; ``None`` lets ORT choose
            (fix it for figures you want to compare across runs).
        batch: size of an unknown leading (batch) dim of the inputs.
        input_shapes: input name to shape (from :func:`runtime.parse_input_shapes`).
        opt_level: ORT graph optimisation level for every session.
        warmup: untimed runs per session before timing.
        iterations: timed rounds; each round runs every model once, in order.
        max_seconds: stop timing after this long (once at least 5 rounds are done).
        seed: seed of the random feeds.
        inputs: optional ``.npz`` with one array per input, used instead of random feeds.

    Returns:
        A :class:`BenchResult`, one :class:`ModelBench` per path in order.

    Raises:
        OnnxlrError: no paths, an unreadable model, models whose inputs differ,
            a bad setting, or ORT failing to load or run a model.
    """
    if not paths:
        raise OnnxlrError("no models to benchmark")
    if batch < 1:
        raise OnnxlrError(f"--batch must be at least 1, got {batch}")
    if iterations < 1:
        raise OnnxlrError(f"--iterations must be at least 1, got {iterations}")
    if warmup < 0:
        raise OnnxlrError(f"--warmup must not be negative, got {warmup}")
    paths = [os.fspath(p) for p in paths]
    # Validate the settings before the (possibly slow) model loading.
    providers_for(provider)
    session_options(threads, opt_level)

    infos: list[_Info] = []
    feeds: dict[str, np.ndarray] = {}
    for i, path in enumerate(paths):
        model, info = _describe(path)
        if i == 0:
            feeds = make_inputs(model, input_shapes, batch=batch, seed=seed, npz=inputs)
        else:
            _check_same_inputs(infos[0], info, feeds)
        infos.append(info)
        del model  # sessions load from the path: keep no copy of the weights in Python
    used_batch = _effective_batch(feeds, batch)

    meter = PeakRSS()
    sessions, peaks = [], []
    for path in paths:
        meter.start()
        session = make_session(path, provider=provider, threads=threads, opt_level=opt_level)
        run(session, feeds)  # the first run allocates ORT's arenas and plans memory
        peaks.append(meter.stop())
        sessions.append(session)
        logger.debug("session for %s ready (peak RSS growth %s MiB)", path, peaks[-1])

    try:
        timing = interleaved_latency(sessions, feeds, warmup=warmup, iterations=iterations,
                                     max_seconds=max_seconds)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise OnnxlrError(f"onnxruntime failed while timing: {str(exc).strip().splitlines()[0]}") \
            from None

    models = [ModelBench(path=info.path, params=info.params, file_bytes=info.file_bytes,
                         latency=stats, speedup=speedup,
                         throughput=used_batch / max(stats.median_ms / 1e3, 1e-12),
                         peak_rss_mb=peak)
              for info, stats, speedup, peak in zip(infos, timing.stats, timing.speedups, peaks)]
    notes = []
    if threads is None:
        notes.append("threads not fixed (ORT default): pass --threads for figures that "
                        "compare across runs")
    return BenchResult(models=models, provider=provider.lower(), threads=threads, batch=used_batch,
                       opt_level=opt_level, iterations=timing.stats[0].iterations,
                       machine=machine_description(provider),
                       rss_method=meter.method if any(p is not None for p in peaks) else None,
                       notes=notes)
