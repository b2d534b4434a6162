"""Time one layer alone: the original node against its factorised chain, at its real input.

FLOPs are not speed (PITFALLS 1, 7): a Tucker chain with odd ranks, or a 1×1
conv ORT runs poorly, can be slower than the layer it replaces. So each
candidate is measured where it will run: the layer is cut out of the model
into a one-node model whose input is the activation the layer really sees
(captured from a run of the whole model), the same layer is factorised at the
candidate ranks by the same pass that rewrites the model, and the two run side
by side in ONNX Runtime (A B A B interleaved, median of per-round ratios).
The same captured input gives the layer's own output error, so every
candidate has (ranks, MACs, weight error, local output error, latency).

Timings depend on shapes, attributes, ranks, runtime and threads, not on the
weight values, so they are cached on disk under that key: repeated runs (and
the rank search of a budget) re-time nothing they have timed before.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr import runtime
from onnxlr.passes.factorize import Factorize, FactorizeConfig
from onnxlr.records import FACTORISED

logger = logging.getLogger(__name__)


def default_cache_path() -> Path:
    """``$ONNXLR_CACHE_DIR/latency.json``, else ``~/.cache/onnxlr/latency.json``."""
    root = os.environ.get("ONNXLR_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onnxlr"
    return Path(root) / "latency.json"


class TimingCache:
    """A JSON file of {key: [ms_before, ms_after, speedup]}; None keeps it in memory only."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.data: dict[str, list[float]] = {}
        if self.path and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self.data = {k: v for k, v in loaded.items()
                                 if isinstance(v, list) and len(v) == 3}
            except (OSError, ValueError):
                logger.warning("ignoring unreadable latency cache %s", self.path)

    def get(self, key: str) -> list[float] | None:
        return self.data.get(key)

    def put(self, key: str, value: list[float]) -> None:
        self.data[key] = value

    def save(self) -> None:
        """Write atomically; a cache that cannot be written is not an error (only slower)."""
        if not self.path:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".latency-", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.data, fh)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("could not write latency cache %s: %s", self.path, exc)


@dataclass
class Trial:
    """One candidate for one layer, measured alone."""

    ranks: tuple[int, ...]
    macs: int = 0
    macs_before: int = 0                 # the layer's, counted on the same (real) input shape
    weight_error: float | None = None
    local_error: float | None = None     # rel. L2 of the layer's output on its real input
    ms_before: float | None = None
    ms_after: float | None = None
    reason: str = ""                     # why it could not be built, if it could not

    @property
    def speedup(self) -> float | None:
        if self.ms_before and self.ms_after:
            return self.ms_before / self.ms_after
        return None

    def to_dict(self, chosen: bool = False) -> dict:
        return {"ranks": list(self.ranks), "macs": self.macs, "weight_error": self.weight_error,
                "local_error": self.local_error, "latency_ms": self.ms_after,
                "latency_before_ms": self.ms_before, "speedup": self.speedup, "chosen": chosen}


def layer_inputs(node: gs.Node) -> list[gs.Variable]:
    """The node's non-constant inputs: what must be captured to run it alone."""
    return [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]


def capture(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str], *,
            provider: str = "cpu") -> dict[str, np.ndarray]:
    """Values of the named tensors on ``feeds``: graph inputs from the feeds, the rest by
    exposing them as extra outputs of one ORT run."""
    return capture_batches(model, [feeds], names, provider=provider)[0]


def capture_batches(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]],
                    names: list[str], *, provider: str = "cpu") -> list[dict[str, np.ndarray]]:
    """:func:`capture` for each batch, with one exposed model and one session for all."""
    wanted = [n for n in dict.fromkeys(names) if not all(n in b for b in batches)]
    session = None
    if wanted:
        probe = copy.deepcopy(model)
        have = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in have)
        session = runtime.make_session(probe, provider=provider)
    out = []
    for feeds in batches:
        got = runtime.run(session, feeds) if session is not None else {}
        out.append({n: feeds[n] if n in feeds else got[n] for n in names})
    return out


def layer_nodes_and_inputs(model: onnx.ModelProto, names: list[str], feeds, *,
                           provider: str = "cpu") -> tuple[gs.Graph, dict, dict]:
    """The model's graph, its nodes by name, and the captured inputs of the named layers:
    what timing layers alone (latency acceptance, budgets) starts from."""
    from onnxlr.graph import to_graph

    graph = to_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    wanted = [t.name for name in names if name in nodes for t in layer_inputs(nodes[name])]
    return graph, nodes, capture(model, feeds, wanted, provider=provider)


def isolate(node: gs.Node, values: dict[str, np.ndarray], opsets: dict[str, int],
            ir_version: int) -> tuple[gs.Graph, dict[str, np.ndarray]]:
    """A one-node graph computing ``node`` on fresh inputs shaped like the captured ones."""
    inputs, feeds, new_inputs = [], {}, []
    for tensor in node.inputs:
        if isinstance(tensor, gs.Variable) and tensor.name:
            value = values[tensor.name]
            var = gs.Variable(tensor.name, dtype=value.dtype, shape=list(value.shape))
            new_inputs.append(var)
            feeds[tensor.name] = value
            inputs.append(var)
        elif isinstance(tensor, gs.Constant):
            # a new tensor object around the same (read-only) array: the original's consumers
            # must not make the weight look shared in the one-node graph
            inputs.append(gs.Constant(tensor.name, tensor.values))
        else:
            inputs.append(tensor)  # an empty optional input
    # a later output nothing reads (an LSTM's final states beside its sequence) stays off:
    # as a graph output it would look used, and the layer is timed as the model runs it
    outputs = [gs.Variable(t.name, dtype=t.dtype) if i == 0 or t.outputs else gs.Variable.empty()
               for i, t in enumerate(node.outputs)]
    clone = gs.Node(node.op, node.name, dict(node.attrs), inputs, outputs, domain=node.domain)
    graph = gs.Graph(nodes=[clone], inputs=new_inputs, outputs=[t for t in outputs if t.name],
                     opset=opsets.get("", 17), name=f"isolated {node.name}")
    graph.import_domains = [onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
    model = gs.export_onnx(graph)
    model.ir_version = ir_version
    # output shapes give the layer its output positions (MACs), as in the whole model
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = gs.import_onnx(inferred)
    graph._onnxlr_ir_version = ir_version  # noqa: SLF001 (read back by _export)
    return graph, feeds


def _export(graph: gs.Graph) -> onnx.ModelProto:
    model = gs.export_onnx(graph)
    model.ir_version = getattr(graph, "_onnxlr_ir_version", model.ir_version)
    return model


def _key(node: gs.Node, feeds: dict[str, np.ndarray], method: str, ranks, provider: str,
         threads: int | None) -> str:
    """What a timing depends on: op, attributes, weight and input shapes, ranks, runtime."""
    import onnxruntime  # the runtime version is part of what was measured

    parts = {
        "op": node.op, "attrs": {k: repr(v) for k, v in sorted(node.attrs.items())},
        "consts": [list(t.shape) if isinstance(t, gs.Constant) else None for t in node.inputs],
        "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(feeds.items())},
        "method": method, "ranks": list(ranks), "provider": provider, "threads": threads,
        "ort": onnxruntime.__version__, "protocol": runtime.TIMING_PROTOCOL,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class _Isolated:
    """One layer cut out (:func:`isolate`), and its baseline session once one is needed."""

    graph: gs.Graph
    feeds: dict[str, np.ndarray]
    session: object = None
    reference: dict[str, np.ndarray] | None = None


@dataclass
class LayerTimer:
    """Builds and times candidates for single layers; shares the factor and timing caches."""

    config: FactorizeConfig
    opsets: dict[str, int]
    ir_version: int
    factor_cache: dict = field(default_factory=dict)
    timing_cache: TimingCache = field(default_factory=lambda: TimingCache(None))
    provider: str = "cpu"
    threads: int | None = None
    seconds_per_pair: float = 1.0

    #: The last layer isolated, with the node and the arrays it was captured on (held, so
    #: that their ids in the key stay theirs). A search asks for a layer's cheapest rung first and for its
    #: other rungs next: the second call reuses the one-node graph and the baseline session.
    _last: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def trials(self, node: gs.Node, values: dict[str, np.ndarray], method: str,
               candidates: list[tuple[int, ...]]) -> list[Trial]:
        """Each candidate ranks built and timed against the original, on the captured input."""
        alone = self._isolate(node, values)
        out = []
        pending: list[tuple[Trial, object, str]] = []   # timed together below
        for ranks in dict.fromkeys(tuple(int(r) for r in c) for c in candidates):
            trial = Trial(ranks)
            built, record = self._factorised(node, alone.graph, ranks, method)
            if record.status != FACTORISED:
                trial.reason = record.reason
                out.append(trial)
                continue
            trial.macs, trial.weight_error = record.macs_after, record.weight_error
            trial.macs_before = record.macs_before
            if alone.session is None:
                alone.session = runtime.make_session(_export(alone.graph), provider=self.provider,
                                                     threads=self.threads)
                alone.reference = runtime.run(alone.session, alone.feeds)
            session = runtime.make_session(built, provider=self.provider, threads=self.threads)
            got = runtime.run(session, alone.feeds)
            trial.local_error = runtime.compare_outputs(alone.reference, got).worst_rel_l2
            key = _key(node, alone.feeds, method, ranks, self.provider, self.threads)
            cached = self.timing_cache.get(key)
            if cached is None:
                pending.append((trial, session, key))
            else:
                trial.ms_before, trial.ms_after = cached[0], cached[1]
            out.append(trial)
        if pending:
            timed = self._time_group(alone.session, [p[1] for p in pending], alone.feeds)
            for (trial, _, key), cached in zip(pending, timed):
                self.timing_cache.put(key, cached)
                trial.ms_before, trial.ms_after = cached[0], cached[1]
        return out

    def _isolate(self, node: gs.Node, values: dict[str, np.ndarray]) -> _Isolated:
        """The layer alone; the last call's when it was for the same layer on the same arrays."""
        held = [node, *(values[t.name] for t in layer_inputs(node))]
        key = tuple(id(x) for x in held)
        if self._last is not None and self._last[0] == key:
            return self._last[2]
        graph, feeds = isolate(node, values, self.opsets, self.ir_version)
        self._last = (key, held, _Isolated(graph, feeds))
        return self._last[2]

    def _factorised(self, node: gs.Node, isolated: gs.Graph, ranks, method: str | None = None):
        """The isolated layer factorised at ``ranks`` (on a copy: the isolated graph is kept
        for the next candidate), as a model, or None; and its record."""
        graph = isolated.copy()
        graph._onnxlr_ir_version = isolated._onnxlr_ir_version  # noqa: SLF001 (see isolate)
        config = dataclasses.replace(self.config, include=[node.name], exclude=[], layer_ranks=[],
                                     forced_ranks={node.name: ranks}, rank_scale={},
                                     forced_methods={node.name: method} if method else {})
        result = Factorize(config, cache=self.factor_cache)(graph)
        record = result.records[0]
        return (_export(graph) if record.status == FACTORISED else None), record

    def _time_group(self, base, candidates: list, feeds) -> list[list[float]]:
        """[ms_before, ms_after, speedup] per candidate, all timed in the same interleaved
        rounds (base, c1, c2, …): the base runs once per round instead of once per pair, so
        k candidates cost about (k + 1) / 2 pairs' time at the same rounds per candidate."""
        if len(candidates) == 1:
            return [self._time(base, candidates[0], feeds)]
        sessions = [base, *candidates]
        budget = self.seconds_per_pair * (len(candidates) + 1) / 2
        rounds = runtime.rounds_within(sessions, feeds, budget, least=15)
        timed = runtime.interleaved_latency(sessions, feeds, warmup=2, iterations=rounds,
                                            max_seconds=budget * 3)
        before = timed.stats[0].median_ms
        return [[before, st.median_ms, sp] for st, sp in zip(timed.stats[1:], timed.speedups[1:])]

    def _time(self, base, candidate, feeds) -> list[float]:
        """[ms_before, ms_after, speedup]: enough interleaved rounds for ~seconds_per_pair."""
        rounds = runtime.rounds_within([base, candidate], feeds, self.seconds_per_pair, least=15)
        timed = runtime.interleaved_latency([base, candidate], feeds, warmup=2, iterations=rounds,
                                            max_seconds=self.seconds_per_pair * 3)
        before, after = timed.stats[0].median_ms, timed.stats[1].median_ms
        return [before, after, timed.speedups[1]]


def rank_variants(ranks: tuple[int, ...], full: tuple[int, ...],
                  multiples: tuple[int, ...] = (8, 16)) -> list[tuple[int, ...]]:
    """The ranks and the same ranks rounded up to each multiple (capped at full):
    never less accurate, often faster (PITFALLS 7)."""
    out = [tuple(ranks)]
    for m in multiples:
        out.append(tuple(min(f, -(-r // m) * m) for r, f in zip(ranks, full)))
    return list(dict.fromkeys(out))


def pick_fastest(trials: list[Trial]) -> Trial | None:
    """The candidate with the highest measured speed-up; ties go to the more accurate."""
    timed = [t for t in trials if t.speedup is not None]
    if not timed:
        return None
    return max(timed, key=lambda t: (round(t.speedup, 2), -(t.local_error or 0.0)))
