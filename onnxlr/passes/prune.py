"""Channel pruning (He et al., ICCV 2017, arXiv 1707.06168) on channel chains
(:mod:`onnxlr.passes.channel_chains`: what a chain is, which channels can go, the rewrite).

:class:`ChannelPass` runs one unit per chain in graph order: choose the channels
to keep, compute the consumer's new weights, rewrite. :class:`PrunePass` is He et
al.'s recipe: the unit is the *consumer* (``--rank 0.5`` keeps half its input
channels), channels by LASSO on its sampled input, weights by least squares
(:mod:`onnxlr.linalg.channel_select`). Following the paper, each unit sees the
input of the model pruned so far and aims at the original model's output of the
layer ("sequential"), so errors do not pile up. Data comes from
:func:`onnxlr.calib.capture` with a reducer that keeps only second moments.

Without calibration data channel pruning declines every layer with that reason:
fitting on random inputs would be fitting noise, and fitting on the verification
inputs would make the reported error in-sample. (Data-free channel removal is
``--method thin``, :mod:`onnxlr.passes.thin`.)

Counts in the records: a unit changes two layers. Each record's "after" is its
own layer's real cost; a layer changed only by a neighbour's unit (the first
conv, whose outputs its consumer's unit pruned) keeps before = after = its new
cost, and the work it saved is added to the "before" of the unit that did it,
so report totals are exact and no record goes negative.

(A little over 400 lines: the pass's bookkeeping — plan, counts, apply, statistics
beside the pruned model, neighbour accounting — is one job; the chains themselves live in
:mod:`onnxlr.passes.channel_chains`.)
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.errors import OnnxlrError
from onnxlr.graph import NameScope
from onnxlr.linalg.channel_select import PatchStats, norm_select, refit, select_channels
from onnxlr.passes.channel_chains import (  # noqa: F401 (re-exported: the old home of chains)
    BINARY, CANDIDATE_OPS, LINEAR, PER_CHANNEL_PARAMS, POOLS, UNARY, ChannelChain, _constant_input,
    _set_consumer, chain_into, consumer_weight, producer_rows, rewrite, trace_chain)
from onnxlr.passes.base import Pass, PassResult
from onnxlr.rank import FixedRank, RankSelector, RatioRank, round_rank
from onnxlr.records import PRUNED, Declined, LayerRecord
from onnxlr.sites import find_site

logger = logging.getLogger(__name__)

#: default number of calibration rows (positions) each unit's least squares sees
MAX_ROWS = 8192
#: consumer inputs (C·K values per row) above this are declined: the statistics are F×F
#: float64 (F = 8192: 0.5 GB); above half of it a unit fits on the original model's input
#: alone, not beside the pruned model's (that Gram is 2F × 2F)
MAX_FEATURES = 8192


# --- calibration rows ------------------------------------------------------------------------------

class _StatsReducer:
    """A :func:`onnxlr.calib.capture` reducer: each batch of a consumer's input becomes rows
    (:func:`onnxlr.activations.site_rows`: conv patches at seeded positions), accumulated into
    :class:`PatchStats`. ``pairs`` maps the pruned model's tensor to the original's, captured in
    the same run; both are sampled with the same seed, so their rows are the same positions."""

    def __init__(self, sites: dict, channels: int, group: int, per_sample: int, seed: int,
                 pairs: dict[str, str] | None = None):
        self.sites, self.per_sample, self.seed = sites, per_sample, seed
        self.pairs = pairs or {}
        self.originals = set(self.pairs.values())
        self.held: dict[str, np.ndarray] = {}
        self.batches: dict[str, int] = {}
        self.stats = {name: PatchStats(channels, group) for name in sites}

    def _rows(self, name: str, x: np.ndarray, batch: int) -> np.ndarray:
        from onnxlr.activations import site_rows
        return site_rows(self.sites[name], x, max_positions=self.per_sample,
                         rng=np.random.default_rng([self.seed, batch]))

    def __call__(self, name: str, x: np.ndarray) -> None:
        if name in self.originals:
            self.held[name] = x
            return
        b = self.batches[name] = self.batches.get(name, -1) + 1
        orig = self.held.pop(self.pairs[name]) if name in self.pairs else None
        self.stats[name].add(self._rows(name, x, b),
                             None if orig is None else self._rows(name, orig, b))


# --- the pass -----------------------------------------------------------------------------------

def kept_count(selector: RankSelector, channels: int, multiple: int = 1) -> int | str:
    """Channels to keep under a rank rule: a fraction of C or a count; other rules decline."""
    if isinstance(selector, (FixedRank, RatioRank)):
        k = int(selector.select(np.ones(channels), channels, channels))
        return round_rank(max(k, 1), multiple, channels)
    return (f"rank rule '{selector.spec}' gives no channel count: use a fraction "
            f"(--rank 0.5 keeps half the channels) or a count (--rank 32)")


@dataclass
class _Unit:
    record: LayerRecord
    chain: ChannelChain
    keep: int


class ChannelPass(Pass):
    """Remove channels between layers, one unit per channel chain (see the module docstring).

    Args:
        config: a :class:`~onnxlr.passes.factorize.FactorizeConfig` (rank rule, per-layer rules,
            include/exclude, ``rank_scale`` = keep more channels, ``forced_ranks`` = exact counts).
        keep: unit names to leave alone, with the reason.
        cache: shared across runs: calibration statistics by unit and upstream state.
        progress: called with (index, total, name) before each candidate.
        calibration: a :class:`onnxlr.calib.Calibration` or anything ``load_calibration`` reads.
        select: ``lasso`` (He et al.), ``somp`` (Lu et al.) or ``l1`` (Li et al., data-free).
        reconstruct: ``ls`` (least squares on calibration data), ``slice`` (drop the consumer's
            columns; exact compensation when nothing non-linear lies between the layers).
        unit: ``consumer`` (the rank rule applies to a layer's inputs) or ``producer`` (to its
            outputs).
        sequential: fit each unit on the input of the model pruned so far (He et al.).
        max_rows: calibration rows per unit.
        target_macs: keep one fraction of channels everywhere, chosen so that the candidate
            layers' MACs are at most this fraction of the original (overrides the rank rule).
    """

    name = "channels"
    method = "channels"

    def __init__(self, config, keep: dict[str, str] | None = None, cache: dict | None = None,
                 progress: Callable | None = None, *, calibration: Any = None,
                 select: str = "lasso", reconstruct: str = "ls", unit: str = "consumer",
                 sequential: bool = True, max_rows: int = MAX_ROWS, seed: int = 0,
                 provider: str = "cpu", target_macs: float | None = None):
        if select not in ("lasso", "somp", "l1") or reconstruct not in ("ls", "slice") or \
                unit not in ("consumer", "producer"):
            raise ValueError(f"bad channel pass options {select}/{reconstruct}/{unit}")
        if target_macs is not None and not 0 < target_macs <= 1:
            raise OnnxlrError(f"invalid MAC target {target_macs}: must be in (0, 1]")
        self.config, self.keep = config, keep or {}
        self.cache = cache if cache is not None else {}
        self.progress, self.calibration = progress, calibration
        self.select, self.reconstruct, self.unit = select, reconstruct, unit
        self.sequential, self.max_rows, self.seed, self.provider = sequential, max_rows, seed, provider
        self.target_macs = target_macs
        self.needs_data = select == "lasso" or reconstruct == "ls"

    # -- bookkeeping -----------------------------------------------------------------------------

    def call(self, graph: gs.Graph) -> PassResult:
        graph.toposort()
        names = NameScope(graph)
        candidates = [n for n in list(graph.nodes) if n.op in CANDIDATE_OPS and not n.domain]
        before = {n.name: _cost(n) for n in candidates}
        original = gs.export_onnx(graph.copy(), do_type_check=False) if self.needs_data else None
        units: dict[str, _Unit] = {}
        records = [self._plan(graph, n, before, units) for n in candidates]
        counts = self._counts(graph, units)
        changed_by: dict[str, str] = {}
        applied: list[tuple[str, tuple[int, ...]]] = []
        for i, record in enumerate(records):
            if self.progress:
                self.progress(i, len(records), record.name)
            unit = units.get(record.name)
            if unit is None:
                continue
            unit.keep = counts.get(record.name, unit.keep)
            self._apply(graph, unit, original, applied, names)
            if unit.record.status == PRUNED:
                other = unit.chain.producer if self.unit == "consumer" else unit.chain.consumer
                changed_by.setdefault(other.name, record.name)
        self._account(candidates, records, before, changed_by)
        return PassResult(any(r.status == PRUNED for r in records), records)

    def _plan(self, graph: gs.Graph, node: gs.Node, before: dict, units: dict) -> LayerRecord:
        record = LayerRecord(name=node.name, op=node.op)
        site = find_site(node, graph)
        if isinstance(site, Declined):
            record.reason = site.reason
            return record
        record.kind, record.weight_shape = site.kind, tuple(int(d) for d in site.weight.shape)
        record.params_before = record.params_after = site.params
        record.macs_before = record.macs_after = site.macs
        why = self.config.selected(node.name) or self.keep.get(node.name)
        if why:
            record.reason = why
            return record
        if self.needs_data and self.calibration is None:
            record.reason = (f"{self.method} needs calibration data (--calib): it fits the layer "
                             f"to real activations")
            return record
        chain = chain_into(node, graph) if self.unit == "consumer" else trace_chain(node, graph)
        if isinstance(chain, str):
            record.reason = chain
            return record
        selector = self.config.rank_for(node.name)
        record.method, record.rank_rule = self.method, selector.spec
        keep = kept_count(selector, chain.channels, self.config.rank_multiple)
        if node.name in getattr(self.config, "forced_ranks", {}):
            keep = int(self.config.forced_ranks[node.name][0])
            record.rank_rule = f"searched ({selector.spec})"
        if isinstance(keep, str) and self.target_macs is None:
            record.reason = keep
            return record
        units[node.name] = _Unit(record, chain, keep if isinstance(keep, int) else chain.channels)
        return record

    def _counts(self, graph: gs.Graph, units: dict[str, _Unit]) -> dict[str, int]:
        """Kept channels per unit: the rule (or a MAC target), grown by ``rank_scale``."""
        counts = {name: u.keep for name, u in units.items()}
        if self.target_macs is not None and units:
            fraction = _fraction_for_target(graph, units, self.target_macs)
            counts = {name: max(1, math.ceil(fraction * u.chain.channels - 1e-9))
                      for name, u in units.items()}
            for name, u in units.items():
                u.record.rank_rule = f"MAC target {self.target_macs:g} (keep {fraction:.3f})"
        for name, scale in self.config.rank_scale.items():
            if name in counts:
                c = units[name].chain.channels
                counts[name] = min(c, max(1, math.ceil(counts[name] * scale)))
                units[name].record.extra["rank_scale"] = scale
        return counts

    def _apply(self, graph, unit: _Unit, original, applied: list, names: NameScope) -> None:
        record, keep = unit.record, unit.keep
        chain = (chain_into(unit.chain.consumer, graph) if self.unit == "consumer"
                 else trace_chain(unit.chain.producer, graph))
        if isinstance(chain, str):  # an earlier unit changed the graph around this one
            record.reason = chain
            return
        record.kept_channels = keep
        extra = record.extra
        extra.update(channels=chain.channels, producer=chain.producer.name,
                     consumer=chain.consumer.name, chain=chain.describe())
        if keep >= chain.channels:
            record.reason = f"keeping all {chain.channels} channels saves nothing"
            return
        t0 = time.perf_counter()
        weight = consumer_weight(chain)
        delta, error = None, None
        if self.needs_data:
            features = chain.channels * chain.group
            if features > MAX_FEATURES:
                record.reason = (f"its input has {features} values per position (C·K), over the "
                                 f"limit of {MAX_FEATURES} for the F×F calibration statistics")
                return
            try:
                stats = self._stats(graph, chain, original, applied,
                                    sequential=2 * features <= MAX_FEATURES)
            except OnnxlrError as exc:
                record.reason = f"calibration capture failed: {exc}"
                return
            extra["rows"] = stats.count
            if 2 * features > MAX_FEATURES:
                extra["fit_input"] = "the original model's (too large to capture beside the pruned)"
            if stats.count < keep * chain.group:
                extra["underdetermined"] = (
                    f"{stats.count} calibration rows for {keep * chain.group} weights per "
                    f"output: the fit may not generalise; give more calibration samples")
        if self.select == "lasso":
            sel = select_channels(stats, weight, keep)
            kept, new_w, delta, error = sel.kept, sel.weight, sel.bias_delta, sel.error
            extra["notes"] = sel.notes
        else:
            kept = self._kept(chain, keep, extra)
            if self.reconstruct == "ls":
                new_w, delta, error = refit(stats, weight, kept)
            else:
                new_w, delta = self._slice(chain, weight, kept, extra)
                error = None  # nothing fitted (SOMP's ‖W − A·W_kept‖/‖W‖ is extra["somp_error"])
        extra["removed"] = [int(c) for c in np.setdiff1d(np.arange(chain.channels), kept)]
        rewrite(chain, kept, new_w, delta, graph, names)
        applied.append((record.name, tuple(int(c) for c in kept)))
        # the refit consumer's output error on the calibration rows (None: data-free slice)
        record.status, record.fit_error = PRUNED, error
        record.seconds = time.perf_counter() - t0
        logger.info("%s: %s keeps %d of %d channels (%s), error %s", record.name, self.method, keep,
                    chain.channels, chain.describe(), error)

    def _kept(self, chain: ChannelChain, keep: int, extra: dict) -> np.ndarray:
        rows = producer_rows(chain)
        if self.select == "l1":
            return norm_select(rows, keep, 1)
        from onnxlr.linalg.somp import somp
        result = somp(rows, keep)
        extra["somp_error"] = result.error
        extra["_somp_coef"] = result.coef
        return result.selected

    def _slice(self, chain: ChannelChain, weight: np.ndarray, kept: np.ndarray, extra: dict):
        """Drop the consumer's columns; through a linear chain, add back what the dropped
        channels carried (they are A·kept + d by SOMP's coefficients)."""
        coef = extra.pop("_somp_coef", None)
        new_w = weight[:, kept]
        if coef is None or not chain.linear:
            return new_w, None
        dropped = np.setdiff1d(np.arange(chain.channels), kept)
        a = coef[dropped]                                       # (dropped, kept)
        new_w = new_w + np.einsum("ndk,ds->nsk", weight[:, dropped], a)
        bias = _constant_input(chain.producer, 2) if chain.producer.op != "MatMul" else None
        if bias is None or bias.size == 1:
            return new_w, None
        b = np.asarray(bias, np.float64).reshape(-1)
        offset = b[dropped] - a @ b[kept]                      # what A·kept misses
        if chain.consumer.op == "Conv" and any(chain.consumer.attrs.get("pads", [0])):
            extra["notes"] = "bias compensation is exact away from the zero-padded border"
        extra["compensation"] = "linear (data-free, exact without padding)"
        return new_w, np.einsum("ndk,d->n", weight[:, dropped], offset)

    def _stats(self, graph: gs.Graph, chain: ChannelChain, original, applied: list, *,
               sequential: bool = True) -> PatchStats:
        """Moments of the consumer's input rows: the original model's when nothing upstream
        changed (or not sequential), else the pruned model's beside the original's."""
        from onnxlr.calib import capture, load_calibration  # lazy: imports onnxruntime

        calib = self.cache.get(("calibration", id(self.calibration)))
        if calib is None:
            calib = self.cache[("calibration", id(self.calibration))] = load_calibration(
                self.calibration, original)
        tensor = chain.tensors[-1].name
        site = find_site(chain.consumer)
        per_sample = max(1, math.ceil(self.max_rows / max(calib.num_samples, 1)))
        upstream = _ancestors(chain.tensors[-1])
        state = tuple(a for a in applied if a[0] in upstream)
        if state and not (self.sequential and sequential):
            state = ()
        key = ("stats", self.seed, self.max_rows, tensor, state)
        if key in self.cache:
            return self.cache[key]
        if not state:
            reducer = _StatsReducer({tensor: site}, chain.channels, chain.group, per_sample,
                                    self.seed)
            capture(original, calib, [tensor], provider=self.provider, reducer=reducer)
            stats = reducer.stats[tensor]
        else:
            model, pair = _side_by_side(original, graph, tensor)
            reducer = _StatsReducer({pair[1]: site}, chain.channels, chain.group, per_sample,
                                    self.seed, {pair[1]: pair[0]})
            capture(model, calib, list(pair), provider=self.provider, reducer=reducer)
            stats = reducer.stats[pair[1]]
        self.cache[key] = stats
        return stats

    def _account(self, candidates, records, before, changed_by) -> None:
        """Real after-costs per layer; a neighbour's change goes to the unit that made it."""
        by_name = {r.name: r for r in records}
        for node in candidates:
            rec = by_name[node.name]
            params, macs = _cost(node)
            rec.extra.pop("_somp_coef", None)
            if rec.status == PRUNED:
                rec.params_after, rec.macs_after = params, macs
            elif (params, macs) != before[node.name]:
                driver = by_name[changed_by[node.name]]
                driver.params_before += before[node.name][0] - params
                driver.macs_before += before[node.name][1] - macs
                driver.extra.setdefault("neighbour_saving", {})[node.name] = {
                    "params": before[node.name][0] - params, "macs": before[node.name][1] - macs}
                rec.params_before = rec.params_after = params
                rec.macs_before = rec.macs_after = macs
                rec.extra["changed_by"] = driver.name


def _cost(node: gs.Node) -> tuple[int, int]:
    site = find_site(node)
    return (0, 0) if isinstance(site, Declined) else (site.params, site.macs)


def _ancestors(tensor: gs.Tensor) -> set[str]:
    """Names of the nodes that ``tensor`` depends on."""
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        for node in t.inputs:
            if node.name not in seen:
                seen.add(node.name)
                stack.extend(x for x in node.inputs if isinstance(x, gs.Variable))
    return seen


PREFIX = "onnxlr_pruned::"


def _side_by_side(original, graph: gs.Graph, tensor: str):
    """One model computing ``tensor`` in the original and in the pruned graph from the same
    inputs, so that one calibration run gives both at the same positions."""
    orig = gs.import_onnx(original)
    cur = graph.copy()
    inputs = {t.name: t for t in orig.inputs}
    cur_inputs = {id(t) for t in cur.inputs}
    tensors = cur.tensors()
    wanted = [orig.tensors()[tensor], tensors[tensor]]
    for t in tensors.values():
        if id(t) not in cur_inputs:
            t.name = PREFIX + t.name
    for node in cur.nodes:
        node.name = PREFIX + node.name
        for i, x in enumerate(node.inputs):
            if id(x) in cur_inputs:
                node.inputs[i] = inputs[x.name]
    both = gs.Graph(nodes=orig.nodes + cur.nodes, inputs=orig.inputs, outputs=wanted,
                    opset=orig.opset, import_domains=orig.import_domains)
    both.cleanup(remove_unused_graph_inputs=False).toposort()
    return gs.export_onnx(both, do_type_check=False), (tensor, PREFIX + tensor)


def _fraction_for_target(graph: gs.Graph, units: dict[str, _Unit], target: float) -> float:
    """The one keep-fraction f (bisection) whose channel counts bring the candidate layers'
    MACs to ``target`` × the original: a layer's MACs scale with kept inputs × kept outputs."""
    layers = {n.name: _cost(n)[1] for n in graph.nodes if n.op in CANDIDATE_OPS}
    total = sum(layers.values())

    def macs(f: float) -> float:
        scale = dict.fromkeys(layers, 1.0)
        for u in units.values():
            r = max(1, math.ceil(f * u.chain.channels - 1e-9)) / u.chain.channels
            scale[u.chain.producer.name] *= r
            scale[u.chain.consumer.name] *= r
        return sum(layers[n] * scale[n] for n in layers)

    if macs(1e-9) > target * total:
        return 1e-9
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid) <= target * total else (lo, mid)
    return lo


class PrunePass(ChannelPass):
    """He et al.'s channel pruning: the rank rule sets each layer's kept *input* channels,
    chosen by LASSO on calibration data, the layer refit by least squares."""

    name = "prune"
    method = "prune"

    def __init__(self, config, keep=None, cache=None, progress=None, *, calibration=None, **kw):
        kw.setdefault("select", "lasso")
        kw.setdefault("reconstruct", "ls")
        kw.setdefault("unit", "consumer")
        super().__init__(config, keep, cache, progress, calibration=calibration, **kw)


__all__ = ["ChannelChain", "ChannelPass", "PrunePass", "chain_into", "consumer_weight",
           "kept_count", "producer_rows", "rewrite", "trace_chain"]
