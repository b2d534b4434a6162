"""Per-layer time inside the whole model, from ONNX Runtime's own profiler.

ORT's profiler (``SessionOptions.enable_profiling``) writes a Chrome-trace JSON
file with one ``cat: "Node"`` event per kernel run, named
``<node name>_kernel_time``, with ``args.op_name`` and ``dur`` in µs. The node
names are those of the graph ORT *executes*, after its own optimisations, so
they are mapped back to the model's nodes before being summed per layer:

- ``fused <node>`` (Conv/Gemm + activation fusion) → ``<node>``;
- ``<tensor>_nchwc`` (the CPU provider's NCHWc layout, which also fuses a
  Conv with the BatchNormalization/Relu after it) → the node producing
  ``<tensor>``, walked up to the nearest node whose op is in ``op_name``
  (``r1_nchwc`` with op Conv: Relu ← BatchNormalization ← Conv);
- ``<node>/MatMulAddFusion`` and other suffixes → the longest node name that
  is a prefix of it (ending at a separator);
- ``_token_N`` uniqueness suffixes are dropped when nothing matches without.

A node then belongs to a layer when it *is* the layer (the original node) or
is named ``<layer>/<method>/<part>`` (onnxlr's :class:`~onnxlr.graph.NameScope`
convention; the methods come from the ``onnxlr.layers`` metadata), so the
factorised parts of one layer count together. Everything else (activations,
pooling, layout reorders) is summed under :data:`OTHER`.

Per run, the kernel times of each layer are summed; the figure reported is the
median over the timed runs (warm-up runs dropped). ``compare_profiles`` runs
the original and the result interleaved (A, B, A, B, …), as
``runtime.interleaved_latency`` does, so machine drift hits both alike.
Profiled times include ORT's per-node profiling overhead: compare layers with
each other and before with after, not with un-profiled end-to-end timings.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import re
import tempfile
from typing import Iterable

import numpy as np
import onnx

from onnxlr import runtime, sites
from onnxlr.errors import OnnxlrError

logger = logging.getLogger(__name__)

__all__ = ["OTHER", "LAYER_OPS", "attribute_events", "compare_profiles", "layer_names",
           "profile_layers"]

#: Key under which time spent outside every layer is reported.
OTHER = "(other)"
#: Ops that count as layers when no layer list is given (onnxlr's candidate ops).
LAYER_OPS = sites.LAYER_OPS
_SEPARATORS = "/_.:- "
_TOKEN = re.compile(r"_token_\d+$")


def layer_names(model: onnx.ModelProto) -> dict[str, str | None]:
    """Layers of a model: ``{layer: method or None}``.

    The layers onnxlr factorised (``onnxlr.layers`` metadata, with their method)
    plus every Conv/Gemm/MatMul node still in the graph under its own name.
    """
    layers: dict[str, str | None] = {}
    for prop in model.metadata_props:
        if prop.key == "onnxlr.layers":
            try:
                meta = json.loads(prop.value)
            except ValueError:
                raise OnnxlrError("metadata onnxlr.layers is not valid JSON") from None
            if isinstance(meta, dict):
                layers.update({str(k): (v.get("method") if isinstance(v, dict) else None)
                               for k, v in meta.items()})
    parts = tuple(f"{k}/{m}/" for k, m in layers.items() if m)  # the factorised chains' nodes
    for node in model.graph.node:
        if (node.op_type in LAYER_OPS and node.domain in ("", "ai.onnx") and node.name
                and not node.name.startswith(parts)):
            layers.setdefault(node.name, None)
    return layers


class _Attributor:
    """Maps executed (ORT) node names to the model's layers."""

    def __init__(self, model: onnx.ModelProto, layers: dict[str, str | None]):
        self.nodes = {n.name: n for n in model.graph.node if n.name}
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.layers = layers
        self._names_desc = sorted(self.nodes, key=len, reverse=True)
        self._layers_desc = sorted(layers, key=len, reverse=True)
        self._cache: dict[tuple[str, str], str] = {}

    def __call__(self, executed: str, op_name: str) -> str:
        key = (executed, op_name)
        if key not in self._cache:
            node = self._node(executed, op_name)
            self._cache[key] = OTHER if node is None else self._layer(node.name)
        return self._cache[key]

    def _node(self, name: str, op_name: str) -> onnx.NodeProto | None:
        if name.startswith("fused "):
            name = name[len("fused "):]
        for candidate in (name, _TOKEN.sub("", name)):
            if candidate in self.nodes:
                return self.nodes[candidate]
            if candidate.endswith("_nchwc") and candidate[:-6] in self.producer:
                return self._walk_up(self.producer[candidate[:-6]], op_name)
        for known in self._names_desc:  # e.g. "fc2/MatMulAddFusion" → "fc2"
            if name.startswith(known) and name[len(known)] in _SEPARATORS:
                return self.nodes[known]
        return None

    def _walk_up(self, start: onnx.NodeProto, op_name: str, steps: int = 4) -> onnx.NodeProto:
        """The nearest node at or above ``start`` whose op is part of the fused ``op_name``."""
        frontier, seen = [start], set()
        for _ in range(steps + 1):
            for node in frontier:
                if node.op_type and node.op_type in op_name:
                    return node
            nxt = []
            for node in frontier:
                for t in node.input:
                    p = self.producer.get(t)
                    if p is not None and id(p) not in seen:
                        seen.add(id(p))
                        nxt.append(p)
            frontier = nxt
        return start

    def _layer(self, node_name: str) -> str:
        if node_name in self.layers:
            return node_name
        for layer in self._layers_desc:
            method = self.layers[layer]
            prefix = f"{layer}/{method}/" if method else f"{layer}/"
            if node_name.startswith(prefix):
                return layer
        return OTHER


def attribute_events(events: list[dict], model: onnx.ModelProto,
                     layers: dict[str, str | None] | None = None,
                     skip_runs: int = 0) -> dict[str, list[float]]:
    """Per-layer kernel time of each run (ms) from a parsed ORT trace.

    Args:
        events: the trace (``json.load`` of the file ``end_profiling`` returns).
        model: the model the session ran (its node names and tensors).
        layers: ``{layer: method}``; default :func:`layer_names` of ``model``.
        skip_runs: leading runs to drop (warm-up).

    Returns:
        ``{layer: [ms per run]}`` for every layer and :data:`OTHER`; a layer with
        no kernel in a run counts 0 for it.
    """
    layers = layer_names(model) if layers is None else layers
    who = _Attributor(model, layers)
    runs = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    starts = [s for s, _ in runs]
    per_run = np.zeros((len(runs), len(layers) + 1))
    column = {name: i for i, name in enumerate(list(layers) + [OTHER])}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e.get("ts", -1)) - 1
        if i < 0 or e["ts"] > runs[i][1]:
            continue  # a kernel outside any run (e.g. during initialisation)
        layer = who(name[: -len("_kernel_time")], str(e.get("args", {}).get("op_name", "")))
        per_run[i, column[layer]] += e.get("dur", 0) / 1e3
    per_run = per_run[skip_runs:]
    return {name: per_run[:, i].tolist() for name, i in column.items()}


def _structure(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(os.fspath(model), load_external_data=False)
    except Exception as exc:  # protobuf/IO errors: the file is not a readable model
        raise OnnxlrError(f"cannot read model {os.fspath(model)}: {exc}") from None


def _session(model, structure: onnx.ModelProto, prefix: str, provider: str,
             threads: int | None, opt_level: str):
    """An ORT session with profiling on (``runtime.make_session`` takes no options object)."""
    opts = runtime.session_options(threads, opt_level)
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    providers = runtime.providers_for(provider)
    what = f"model {structure.graph.name or '(unnamed)'!r}"
    if isinstance(model, onnx.ModelProto):
        try:
            source = model.SerializeToString()
        except ValueError:
            raise OnnxlrError(f"{what} is over 2 GB: profile it from a path") from None
    else:
        source = os.fspath(model)
    try:
        return runtime._ort().InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as exc:
        if not runtime._is_ort_error(exc):
            raise
        raise OnnxlrError(f"onnxruntime cannot load {what} for profiling: "
                          f"{runtime._ort_message(exc)}") from None


def _trace(session) -> list[dict]:
    path = session.end_profiling()
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise OnnxlrError(f"cannot read the ORT profile {path}: {exc}") from None
    finally:
        if path:
            try:
                os.remove(path)
            except OSError:
                pass


def _profiles(models: list, feeds: dict, layers: list[dict[str, str | None] | None], *,
              provider: str, threads: int | None, iterations: int, warmup: int,
              opt_level: str) -> list[dict[str, float]]:
    """Profile models interleaved; per model ``{layer: median ms}``."""
    if iterations < 1:
        raise OnnxlrError(f"iterations must be at least 1, got {iterations}")
    structures = [_structure(m) for m in models]
    with tempfile.TemporaryDirectory(prefix="onnxlr-profile-") as tmp:
        sessions = [_session(m, s, os.path.join(tmp, f"model{i}"), provider, threads, opt_level)
                    for i, (m, s) in enumerate(zip(models, structures))]
        for _ in range(warmup):
            for s in sessions:
                runtime.run(s, feeds)
        for _ in range(iterations):
            for s in sessions:
                runtime.run(s, feeds)
        traces = [_trace(s) for s in sessions]
    out = []
    for trace, structure, lay in zip(traces, structures, layers):
        runs = attribute_events(trace, structure, lay, skip_runs=warmup)
        out.append({name: float(np.median(ms)) if ms else 0.0 for name, ms in runs.items()})
        logger.debug("profiled %s: %d runs", structure.graph.name, len(next(iter(runs.values()))))
    return out


def profile_layers(model: onnx.ModelProto | str | os.PathLike, feeds: dict, provider: str = "cpu",
                   threads: int | None = None, iterations: int = 20, *, warmup: int = 3,
                   layers: Iterable[str] | None = None,
                   opt_level: str = "all") -> dict[str, float]:
    """Median time per layer (ms) inside one model, from ORT profiling.

    Args:
        model: a ModelProto or a path (a path for models with external data).
        feeds: input name → array (e.g. ``runtime.make_inputs``).
        provider: ``cpu``, ``cuda`` or ``tensorrt`` (see ``runtime.providers_for``).
        threads: intra-op threads; ``None`` lets ORT choose.
        iterations: timed runs; the median per layer is reported.
        warmup: untimed runs first.
        layers: the layer names to report; default :func:`layer_names`.
        opt_level: ORT graph optimisation level (``all`` is what deployments run).

    Returns:
        ``{layer: ms}`` for every layer, plus :data:`OTHER` for the remaining ops.
    """
    structure = _structure(model)
    lay = _layer_map(structure, layers)
    return _profiles([model], feeds, [lay], provider=provider, threads=threads,
                     iterations=iterations, warmup=warmup, opt_level=opt_level)[0]


def _layer_map(structure: onnx.ModelProto, names: Iterable[str] | None) -> dict[str, str | None]:
    known = layer_names(structure)
    if names is None:
        return known
    return {n: known.get(n) for n in names}


def compare_profiles(original: onnx.ModelProto | str | os.PathLike,
                     result: onnx.ModelProto | str | os.PathLike, feeds: dict, *,
                     provider: str = "cpu", threads: int | None = None, iterations: int = 20,
                     warmup: int = 3, layers: Iterable[str] | dict[str, str | None] | None = None,
                     opt_level: str = "all") -> dict[str, dict[str, float]]:
    """Each layer's time inside the original and inside the result, profiled interleaved.

    Args:
        original, result: the models (ModelProto or path); the result's
            ``onnxlr.layers`` metadata says which nodes belong to which layer.
        feeds: inputs both models take.
        layers: layer names to report (e.g. ``[r.name for r in report.records]``);
            default: the union of both models' :func:`layer_names`. A dict
            ``{layer: method}`` also says how each layer's nodes are named
            (``<layer>/<method>/…``), for a result not yet carrying the metadata.
        provider, threads, iterations, warmup, opt_level: as :func:`profile_layers`.

    Returns:
        ``{layer: {"before_ms", "after_ms"}}`` for every layer, plus :data:`OTHER`.
    """
    s_orig, s_res = _structure(original), _structure(result)
    known = {**layer_names(s_orig), **layer_names(s_res)}
    names = list(known) if layers is None else list(dict.fromkeys(layers))
    given = layers if isinstance(layers, dict) else {}
    lay = {n: given.get(n) or known.get(n) for n in names}
    before, after = _profiles([original, result], feeds, [lay, lay], provider=provider,
                              threads=threads, iterations=iterations, warmup=warmup,
                              opt_level=opt_level)
    return {n: {"before_ms": before[n], "after_ms": after[n]} for n in list(lay) + [OTHER]}
