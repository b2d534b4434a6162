"""Channel pruning as search candidates, in the same ladders as the factorisations.

A layer whose input comes from one other layer through per-channel ops (a *channel chain*,
:mod:`onnxlr.passes.channel_chains`: Relu, BatchNorm, pools, GELU as Erf/Mul/Add, a bias Add, a
Flatten into a Gemm, …) can keep fewer of its input channels: the producer stops computing
the others, the consumer's weights are refit by least squares on what is left (He et al.,
ICCV 2017; for a transformer's FFN, MatMul → bias → GELU → MatMul, this is Kwon et al.
2022's neuron pruning with its least-squares refit). Each kept-channel count is a *prune
rung* on the consumer's ladder, next to its low-rank rungs; the planner picks at most one
rung per layer, so pruning and factorisation compete for every layer.

- **Timing**: the whole chain (producer → per-channel ops → consumer) is cut out and timed
  against the same chain with the first k channels kept (only shapes matter for time), on
  the producer's real input: the saving of the producer, of the ops between and of the
  consumer, measured, not counted.
- **Fit**: the consumer's input second moments (channel-major patch rows, F = C·K wide,
  bounded by :data:`onnxlr.passes.prune.MAX_FEATURES`) are captured in one run over the
  fitting samples for every candidate; LASSO picks the channels (one path for every count,
  :func:`entry_order`), least squares the weights, only for rungs measured faster.
- **Gated graph**: a prune rung is ``Gather(x, kept) → consumer'``: the consumer's output
  with the dropped channels gone is exactly what the pruned model computes, so the search
  scores what the user gets, whether its producer is the original layer or a factorised
  one (whose last stage then loses those rows: the same model); pruning both a layer's
  inputs and its outputs composes. The producer's saving is counted from the chain timed
  with the original producer, so beside a factorised producer it is an overestimate: the
  end-to-end timing of what is built decides.
- **Build**: after the factorisations, :func:`apply` rewrites each chosen chain in graph
  order with the fitted channels and weights.

(A little over 400 lines on purpose: the four steps above share the chain, its kept-channel
counts and its fits; split apart they would pass those through three more interfaces.)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr import runtime
from onnxlr.graph import NameScope, to_graph
from onnxlr.linalg.channel_select import (PatchStats, contribution_gram, dependent_channels,
                                          lasso_gram, refit)
from onnxlr.passes.channel_chains import (CANDIDATE_OPS, ChannelChain, _set_consumer,
                                          chain_into, consumer_weight, rewrite)
from onnxlr.passes.prune import MAX_FEATURES
from onnxlr.rank import round_rank
from onnxlr.records import Declined
from onnxlr.sites import find_site

logger = logging.getLogger(__name__)

PRUNE = "prune"
#: Fractions of a consumer's input channels a prune rung keeps, most first. Not 1/4: on the
#: digits CNN, rungs keeping a quarter passed the 256 held-out (training) samples without a
#: flip and lost 1.1-1.8 points on the test digits in three runs out of three; with 3/8 as
#: the floor, three runs lost 0.9 each.
KEEP_LEVELS = (0.75, 0.5, 0.375)
#: Calibration rows (positions) each consumer's statistics see.
MAX_ROWS = 8192
#: Memory for all candidates' statistics captured in one run (F² float64 each).
STATS_BYTES = 1 << 30


@dataclass(frozen=True)
class PruneFit:
    """The channels one prune rung keeps and the consumer's weights over them."""

    kept: np.ndarray            # sorted channel indices
    weight: np.ndarray          # (N, k, K) float64, as :func:`consumer_weight`
    bias_delta: np.ndarray | None
    error: float | None         # rel. L2 of the consumer's output on the fitting rows
    axis: int                   # the consumer input's channel axis
    group: int                  # K: consumer input values per channel
    layer: str = ""             # the consumer
    producer: str = ""          # the layer whose output channels go
    channels: int = 0           # C: the consumer's input channels before

    @property
    def neighbour(self) -> str:
        """The other layer this rung changes (its producer loses rows)."""
        return self.producer

    @property
    def kept_count(self) -> int:
        return len(self.kept)


def prunable(graph: gs.Graph, layers: list[str]) -> tuple[dict[str, ChannelChain], dict[str, str]]:
    """{consumer: its chain} for the layers whose input channels can go; {layer: why not}."""
    nodes = {n.name: n for n in graph.nodes}
    chains, why = {}, {}
    for name in layers:
        node = nodes.get(name)
        if node is None:
            continue
        chain = chain_into(node, graph)
        if isinstance(chain, str):
            why[name] = chain
        elif chain.channels * chain.group > MAX_FEATURES:
            why[name] = (f"{chain.channels * chain.group} input values per position, over the "
                         f"{MAX_FEATURES} the pruning statistics allow")
        elif node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            why[name] = "Gemm with transA"
        elif node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            why[name] = "grouped conv"
        else:
            chains[name] = chain
    return chains, why


def keep_counts(channels: int, levels=KEEP_LEVELS, multiple: int = 8) -> list[int]:
    """Kept-channel counts for the levels, rounded to ``multiple`` where the layer allows."""
    m = multiple if channels >= 2 * multiple else 1
    counts = [round_rank(max(1, math.ceil(f * channels)), m, channels) for f in levels]
    return [k for k in dict.fromkeys(counts) if 0 < k < channels]


def channel_axis(chain: ChannelChain) -> int:
    """Axis of the consumer's input that holds the channels (blocks of K after a Flatten)."""
    if chain.consumer.op == "Conv":
        return 1
    if chain.consumer.op == "Gemm":
        return 1
    return -1


def columns(kept: np.ndarray, group: int) -> np.ndarray:
    """Consumer input columns of the kept channels (channel-major blocks of ``group``)."""
    kept = np.asarray(kept, dtype=np.int64)
    return (kept[:, None] * group + np.arange(group)[None, :]).reshape(-1)


# --- timing -----------------------------------------------------------------------------------

def chain_graph(graph: gs.Graph, chain: ChannelChain) -> tuple[gs.Graph, str]:
    """A graph of the chain alone (producer → ops → consumer) and its input's name."""
    g = graph.copy()
    nodes = {n.name: n for n in g.nodes}
    members = [nodes[chain.producer.name]] + [nodes[n.name] for n in chain.nodes] + \
        [nodes[chain.consumer.name]]
    x = next(t for t in members[0].inputs if isinstance(t, gs.Variable) and t.name)
    y = members[-1].outputs[0]
    sub = gs.Graph(nodes=members, inputs=[x], outputs=[y], opset=g.opset,
                   import_domains=g.import_domains, name=f"chain {chain.consumer.name}")
    sub.cleanup(remove_unused_graph_inputs=False).toposort()
    return sub, x.name


def export(graph: gs.Graph, ir_version: int) -> onnx.ModelProto:
    """A chain's graph (cut out or rewritten) as a model ORT can time."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = ir_version
    return model


def chain_key(kind: str, section: str, nodes: list, feed: np.ndarray, keep: int, timer) -> str:
    """The timing-cache key of a chain's nodes (ops, attributes, weight shapes) at ``keep``
    on ``feed``'s shape, for this provider, thread count, ORT and timing protocol."""
    import onnxruntime
    parts = {section: [(n.op, sorted((k, repr(v)) for k, v in n.attrs.items()),
                        [list(t.shape) for t in n.inputs if isinstance(t, gs.Constant)])
                       for n in nodes],
             "input": [list(feed.shape), str(feed.dtype)], "keep": keep,
             "provider": timer.provider, "threads": timer.threads, "ort": onnxruntime.__version__,
             "protocol": runtime.TIMING_PROTOCOL}
    return f"{kind}:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def time_chain(timer, graph: gs.Graph, chain: ChannelChain, feed: np.ndarray,
               keeps: list[int], ir_version: int) -> dict[int, tuple[float, float]]:
    """{keep: (ms of the chain, ms with the first ``keep`` channels)} on the real input."""
    sub, x = chain_graph(graph, chain)
    base = runtime.make_session(export(sub, ir_version), provider=timer.provider,
                                threads=timer.threads)
    feeds = {x: feed}
    out, pending = {}, []
    for keep in keeps:
        key = chain_key("prune", "chain", [chain.producer, *chain.nodes, chain.consumer], feed,
                        keep, timer)
        cached = timer.timing_cache.get(key)
        if cached is not None:
            out[keep] = (cached[0], cached[1])
            continue
        g = sub.copy()
        c = chain_into(next(n for n in g.nodes if n.name == chain.consumer.name), g)
        if isinstance(c, str):
            continue
        rewrite(c, np.arange(keep), consumer_weight(c)[:, :keep], None, g, NameScope(g))
        pending.append((keep, key, runtime.make_session(export(g, ir_version),
                                                         provider=timer.provider,
                                                         threads=timer.threads)))
    if pending:
        # every count in the same interleaved rounds (the layer timer's budget per pair)
        timed = timer._time_group(base, [p[2] for p in pending], feeds)  # noqa: SLF001
        for (keep, key, _), cached in zip(pending, timed):
            timer.timing_cache.put(key, cached)
            out[keep] = (cached[0], cached[1])
    return out


# --- statistics and fits ----------------------------------------------------------------------

def capture_stats(model: onnx.ModelProto, chains: dict[str, ChannelChain],
                  batches: list[dict], *, provider: str = "cpu", seed: int = 0
                  ) -> dict[str, PatchStats]:
    """Second moments of every chain's consumer input, over the fitting batches (one run of
    the model per batch for as many chains as :data:`STATS_BYTES` allows together)."""
    from onnxlr.activations import site_rows
    from onnxlr.calib import expose

    samples = sum(int(next(iter(b.values())).shape[0]) for b in batches) or 1
    per_sample = max(1, math.ceil(MAX_ROWS / samples))
    names = list(chains)
    stats: dict[str, PatchStats] = {}
    while names:
        group, used = [], 0
        for name in list(names):
            f = chains[name].channels * chains[name].group
            if group and used + 8 * f * f > STATS_BYTES:
                break
            group.append(name)
            used += 8 * f * f
            names.remove(name)
        tensors = {name: chains[name].tensors[-1].name for name in group}
        session = runtime.make_session(expose(model, list(tensors.values())), provider=provider)
        sites = {name: find_site(chains[name].consumer) for name in group}
        for name in group:
            stats[name] = PatchStats(chains[name].channels, chains[name].group)
        for b, feeds in enumerate(batches):
            got = runtime.run(session, feeds)
            for name in group:
                x = feeds.get(tensors[name], got.get(tensors[name]))
                rows = site_rows(sites[name], np.asarray(x), max_positions=per_sample,
                                 rng=np.random.default_rng([seed, b]))
                stats[name].add(rows)
    return stats


#: λ shrinks by this factor per step of the one LASSO path behind every keep count.
PATH_SHRINK = 0.8
#: FISTA tolerance on that path (an order of entry needs less than an exact support).
PATH_TOL = 1e-6


def entry_order(stats: PatchStats, weight: np.ndarray, up_to: int) -> np.ndarray:
    """Channels in the order they enter He et al.'s LASSO path (walked down from λ_max until
    ``up_to`` are in), zero and linearly dependent ones last: they go first, at no cost.

    Why one path for every rung: :func:`onnxlr.linalg.channel_select.select_channels`
    bisects λ for one exact count; a ladder needs several counts of the same layer, and on
    a 1024-neuron FFN four bisected paths took minutes. The counts' supports differ only where the path is not monotone;
    each count's weights are still refit by least squares on its own channels.
    """
    independent, dependent, zero = dependent_channels(stats.channel_gram())
    cand = np.sort(independent)
    w_fit, _, _ = refit(stats, weight, cand)
    g, b = contribution_gram(stats, w_fit, cand, weight)
    entered = np.full(len(cand), np.inf)
    lam_max = float(np.max(np.abs(b))) if len(b) else 0.0
    lam, beta, step = lam_max, np.zeros(len(cand)), 0
    while lam_max > 0 and np.count_nonzero(np.isfinite(entered)) < min(up_to, len(cand)):
        lam *= PATH_SHRINK
        step += 1
        beta = lasso_gram(g, b, lam, beta, tol=PATH_TOL)
        entered[(beta != 0) & ~np.isfinite(entered)] = step
        if lam < 1e-12 * lam_max:
            break
    strength = np.abs(beta) * np.sqrt(np.maximum(np.diag(g), 0.0))
    order = cand[np.lexsort((-strength, entered))]
    return np.concatenate([order, np.asarray(dependent, int), np.asarray(zero, int)])


def fits_for(chain: ChannelChain, stats: PatchStats, keeps: list[int]) -> dict[int, PruneFit]:
    """{keep: fit} for every count from one LASSO path (:func:`entry_order`)."""
    weight = consumer_weight(chain)
    order = entry_order(stats, weight, max(keeps))
    out = {}
    for k in keeps:
        kept = np.sort(order[:k]).astype(np.int64)
        w, delta, error = refit(stats, weight, kept)
        out[k] = PruneFit(kept, w, delta, error, channel_axis(chain), chain.group,
                          chain.consumer.name, chain.producer.name, chain.channels)
    return out


# --- the gated graph's candidate, and the final rewrite -----------------------------------------

class PruneBuilder:
    """Builds a prune rung in the gated graph: ``Gather(x, kept columns) → consumer'``
    (the interface of :class:`onnxlr.methods.base.Method`'s ``build``)."""

    name = PRUNE

    def __init__(self, chains: dict[str, ChannelChain]):
        self.chains = chains

    def build(self, graph: gs.Graph, site, fitted: PruneFit, names: NameScope) -> None:
        clone = site.node
        x = clone.inputs[0]
        # a conv's input holds channels on axis 1 (K is its kernel); a matrix product's input
        # holds K columns per channel after a Flatten
        index = fitted.kept if clone.op == "Conv" else columns(fitted.kept, fitted.group)
        idx = gs.Constant(names(f"{clone.name}/kept"), np.asarray(index, dtype=np.int64))
        picked = gs.Variable(names(f"{clone.name}/kept_input"), dtype=x.dtype)
        graph.nodes.append(gs.Node("Gather", names(f"{clone.name}/keep"),
                                   {"axis": fitted.axis}, [x, idx], [picked]))
        clone.inputs[0] = picked
        _set_consumer(replace(self.chains[fitted.layer], consumer=clone), fitted.weight,
                      fitted.bias_delta, graph, names)


def apply(graph: gs.Graph, fits: dict[str, PruneFit]) -> dict[str, str]:
    """Rewrite every chosen chain (in graph order); {layer: why not} for any that no longer
    traces (which the caller turns into a decline)."""
    graph.toposort()
    names = NameScope(graph)
    failed = {}
    for node in [n for n in graph.nodes if n.name in fits]:
        chain = chain_into(node, graph)
        if isinstance(chain, str):
            failed[node.name] = chain
            continue
        f = fits[node.name]
        rewrite(chain, f.kept, f.weight, f.bias_delta, graph, names)
    graph.cleanup().toposort()
    return failed


def add_prune_rungs(build, ladders: list, empty: dict[str, str], feeds: dict, timer,
                    batches: list[dict], *, multiple: int = 8, progress=None
                    ) -> tuple[dict[str, ChannelChain], dict[tuple[str, int], PruneFit], dict]:
    """Prune rungs on the ladders of every prunable layer the settings select (a new ladder
    where the layer had none); returns the chains, the fits by (layer, keep) and an account."""
    from onnxlr.budget import selected_layers
    from onnxlr.latency import capture
    from onnxlr.search.ladders import MIN_MAC_SHARE, MIN_RUNG_SPEEDUP, Ladder, Rung
    from onnxlr.search.gated import Option

    records = selected_layers(build)
    total = sum(r.macs_before for r in records) or 1
    graph = to_graph(build.prepared)
    chains, why = prunable(graph, [r.name for r in records])
    costs = layer_costs(graph)
    account = {"chains": len(chains), "not_prunable": why, "timed": {}, "fitted": 0}
    for name in list(chains):
        share = (costs[name][1] + (costs.get(chains[name].producer.name) or (0, 0))[1]) / total
        if share < MIN_MAC_SHARE:
            del chains[name]
    if not chains:
        return {}, {}, account
    x_names = {name: next(t.name for t in c.producer.inputs if isinstance(t, gs.Variable)
                          and t.name) for name, c in chains.items()}
    values = capture(build.prepared, feeds, list(x_names.values()), provider=timer.provider)
    timed: dict[str, list[tuple[int, float, float]]] = {}
    for i, (name, chain) in enumerate(chains.items()):
        if progress:
            progress(i, len(chains), f"timing pruned {name}")
        keeps = keep_counts(chain.channels, multiple=multiple)
        if not keeps:
            continue
        feed = values[x_names[name]]
        cheapest = time_chain(timer, graph, chain, feed, keeps[-1:], build.prepared.ir_version)
        if not cheapest or cheapest[keeps[-1]][0] / cheapest[keeps[-1]][1] < MIN_RUNG_SPEEDUP:
            account["timed"][name] = "its fewest channels measured no faster"
            continue
        got = {**time_chain(timer, graph, chain, feed, keeps[:-1], build.prepared.ir_version),
               **cheapest}
        fast = [(k, a, b) for k, (a, b) in got.items() if a / b >= MIN_RUNG_SPEEDUP]
        account["timed"][name] = {str(k): a / b for k, (a, b) in got.items()}
        if fast:
            timed[name] = fast
    timer.timing_cache.save()
    fits: dict[tuple[str, int], PruneFit] = {}
    if not timed or not batches:
        return chains, fits, account
    stats = capture_stats(build.prepared, {n: chains[n] for n in timed}, batches,
                          provider=timer.provider)
    by = {lad.layer: lad for lad in ladders}
    for name, rows in timed.items():
        chain = chains[name]
        params, macs = costs[name]
        producer_macs = (costs.get(chain.producer.name) or (0, 0))[1]
        lad = by.get(name)
        if lad is None:
            lad = Ladder(name, PRUNE, macs, params, 0.0)
        rungs = []
        try:
            fitted = fits_for(chain, stats[name], [k for k, _, _ in rows])
        except (np.linalg.LinAlgError, ValueError) as exc:
            lad.dropped.append(f"prune: the fit failed ({exc})")
            fitted = {}
        for k, ms_a, ms_b in rows:
            if k not in fitted:
                continue
            f = fits[(name, k)] = fitted[k]
            rungs.append(Rung(Option(PRUNE, (k,)), int(round(lad.macs_before * k / chain.channels)),
                              None, f.error, ms_a, ms_b, scope="chain", neighbour=chain.producer.name,
                              neighbour_macs=int(producer_macs * (chain.channels - k)
                                                 / chain.channels)))
        account["fitted"] += len(rungs)
        if not rungs:
            continue
        lad.chain = chain.describe()
        place_rungs(lad, rungs, ladders, by, empty)
    return chains, fits, account


def place_rungs(lad, rungs: list, ladders: list, by: dict, empty: dict[str, str]) -> None:
    """Chain rungs onto a layer's ladder, Pareto-filtered with the rungs it has (the beaten
    ones said in ``dropped``); a new ladder (timed by its chain) joins the search's ladders."""
    from onnxlr.search.ladders import pareto
    merged = pareto(lad.rungs + rungs)
    lad.dropped += [f"{r.option.method} {r.option.ranks}: beaten on speed and error by "
                    f"another candidate" for r in lad.rungs + rungs if r not in merged]
    lad.rungs = merged
    if lad.layer not in by:
        lad.ms_before = float(np.median([r.ms_before for r in rungs]))
        ladders.append(lad)
        by[lad.layer] = lad
        empty.pop(lad.layer, None)


def layer_costs(graph: gs.Graph) -> dict[str, tuple[int, int]]:
    """{layer: (params, MACs)} of every node that is a layer, in one pass over the graph."""
    out = {}
    for node in graph.nodes:
        if node.op in CANDIDATE_OPS and not node.domain:
            site = find_site(node, graph)
            if not isinstance(site, Declined):
                out[node.name] = (site.params, site.macs)
    return out


__all__ = ["KEEP_LEVELS", "PRUNE", "PruneBuilder", "PruneFit", "add_prune_rungs", "apply",
           "capture_stats", "chain_graph", "chain_key", "columns", "entry_order", "export",
           "fits_for", "keep_counts", "layer_costs", "place_rungs", "prunable", "time_chain"]
