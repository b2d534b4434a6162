"""The factorise pass: match candidate layers, check, decompose, rewrite.

For each Gemm/MatMul/Conv: find the site (or the reason there is none), pick
the method for its kind, the ranks from the rank rule (or the layer's own
override), refuse ranks that do not save both parameters and MACs, decompose
(cached, so re-running with some layers reverted costs nothing) and emit the
replacement nodes. Every candidate yields a :class:`LayerRecord`.
"""
from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx_graphsurgeon as gs

from onnxlr.graph import NameScope
from onnxlr.methods import METHODS, Factors, Method
from onnxlr.methods.base import overflow_reason
from onnxlr.passes.base import Pass, PassResult
from onnxlr.rank import RankSelector
from onnxlr.records import DECLINED, FACTORISED, Declined, LayerRecord
from onnxlr.sites import LAYER_OPS, QUANTIZED_OPS, LayerSite, find_site, is_quantized, nested_layer_records

logger = logging.getLogger(__name__)

CANDIDATE_OPS = LAYER_OPS  # Gemm, MatMul, Conv and the recurrent layers' input weights


@dataclass(frozen=True)
class FactorizeConfig:
    """What to factorise and how; see ``onnxlr.pipeline.optimize`` for the meaning of each field.

    Frozen: a room that wants other ranks, methods or layers builds a new config with
    ``dataclasses.replace`` (``optimize``'s builder through its ``reconfigure``), never writes
    into one another room holds. Its dicts and lists are not written after construction either.
    """

    methods: dict[str, str | None]
    rank: RankSelector
    rank_multiple: int = 1
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    layer_ranks: list[tuple[str, RankSelector]] = field(default_factory=list)
    cp_max_seconds: float = 60.0
    rank_scale: dict[str, float] = field(default_factory=dict)  # from the error-bound back-off
    #: exact ranks per layer name, chosen by a search (latency acceptance, budgets); wins over
    #: the rank rule and ``rank_scale``
    forced_ranks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: factors only good enough to time a chain (its shapes are what matter): Tucker-2 from
    #: its HOSVD without HOOI sweeps; never used for a model that is written
    timing_only: bool = False
    #: the method per layer name chosen by a search (wins over ``methods``' per-kind choice)
    forced_methods: dict[str, str] = field(default_factory=dict)
    #: per-layer input statistics from calibration data ({layer name: onnxlr.linalg.whiten.
    #: LayerStats}, see onnxlr.activations); methods with ``data_aware`` then choose ranks on
    #: the whitened spectrum and decompose for the layer's output error, not its weight error
    calibration: Any = None
    #: {layer name: why it has no calibration statistics} (e.g. too big to hold them)
    calibration_notes: dict[str, str] = field(default_factory=dict)

    def stats_for(self, name: str, method: Method):
        """The layer's calibration statistics when the method can use them, else None."""
        if not self.calibration or not getattr(method, "data_aware", False):
            return None
        return self.calibration.get(name)

    def rank_for(self, name: str) -> RankSelector:
        for pattern, selector in self.layer_ranks:  # first match wins, like --include
            if fnmatch.fnmatchcase(name, pattern):
                return selector
        return self.rank

    def selected(self, name: str) -> str | None:
        """None when the layer is selected, else why not."""
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return "not matched by --include"
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return "excluded by --exclude"
        return None


class Factorize(Pass):
    """Replace each selected layer by its factorised chain.

    Args:
        config: methods, rank rule, selection.
        keep: layer names to leave as they are (reverted by a later check).
        cache: factors by (layer, method, ranks), shared across runs.
        progress: called with (index, total, layer name) before each candidate.
    """

    name = "factorize"

    def __init__(self, config: FactorizeConfig, keep: dict[str, str] | None = None,
                 cache: dict | None = None, progress: Callable | None = None):
        self.config = config
        self.keep = keep or {}
        self.cache = cache if cache is not None else {}
        self.progress = progress

    def method(self, name: str) -> Method:
        """A fresh instance of the named method with this config's options."""
        if name == "cp":
            return METHODS[name](max_seconds=self.config.cp_max_seconds)
        if name == "tucker" and self.config.timing_only:
            return METHODS[name](hooi_sweeps=0)
        return METHODS[name]()

    def call(self, graph: gs.Graph) -> PassResult:
        names = NameScope(graph)
        candidates = [n for n in list(graph.nodes)
                      if n.op in CANDIDATE_OPS + QUANTIZED_OPS and not n.domain]
        records, modified = [], False
        for i, node in enumerate(candidates):
            if self.progress:
                self.progress(i, len(candidates), node.name)
            record = self._one(graph, node, names)
            records.append(record)
            modified |= record.status == FACTORISED
        records.extend(nested_layer_records(graph))  # If/Loop/Scan bodies: left alone, stated
        return PassResult(modified, records)

    def _one(self, graph: gs.Graph, node: gs.Node, names: NameScope) -> LayerRecord:
        record = LayerRecord(name=node.name, op=node.op)
        site = find_site(node, graph)
        if isinstance(site, Declined):
            record.reason = site.reason
            if is_quantized(node):
                record.extra["quantized"] = True  # listed in every report, not only JSON
            return record
        record.kind = site.kind
        record.weight_shape = tuple(int(d) for d in site.weight.shape)
        record.params_before = record.params_after = site.params
        record.macs_before = record.macs_after = site.macs
        if not site.shapes_known:
            record.extra["macs_note"] = "shapes unknown: MACs counted per position"
        why_not = self.config.selected(node.name)
        method_name = self.config.forced_methods.get(node.name) or self.config.methods.get(site.kind)
        if why_not is None and method_name is None:
            why_not = f"no method selected for {site.kind} layers"
        if why_not is None:
            why_not = METHODS[method_name].too_big(site)
        if why_not is None and node.name in self.keep:
            why_not = self.keep[node.name]
        if why_not:
            record.reason = why_not
            return record
        method = self.method(method_name)
        selector = self.config.rank_for(node.name)
        record.method, record.rank_rule = method_name, selector.spec
        t0 = time.perf_counter()
        if node.name in self.config.forced_ranks:
            ranks = tuple(max(1, min(int(r), full)) for r, full in
                          zip(self.config.forced_ranks[node.name], method.full_ranks(site)))
            record.rank_rule = f"searched ({selector.spec})"
        else:
            stats = self.config.stats_for(node.name, method)
            ranks = (method.choose_ranks(site, selector, self.config.rank_multiple, stats=stats)
                     if stats is not None else
                     method.choose_ranks(site, selector, self.config.rank_multiple))
        if isinstance(ranks, Declined):
            record.reason = ranks.reason
            return record
        if node.name in self.config.rank_scale:
            ranks = method.scale_ranks(site, tuple(ranks), self.config.rank_scale[node.name])
            record.extra["rank_scale"] = self.config.rank_scale[node.name]
        record.ranks = tuple(int(r) for r in ranks)
        params, macs = method.cost(site, ranks)
        if params >= site.params or macs >= site.macs:
            record.reason = (f"ranks {record.ranks} would not save work: params {params} vs "
                             f"{site.params}, MACs {macs} vs {site.macs}")
            return record
        factors = self.factors(method, site, record.ranks)
        record.reason = overflow_reason(factors, site.weight.dtype) or ""
        if record.reason:  # e.g. fp16 factors beyond 65504: keep the layer, say why
            return record
        method.build(graph, site, factors, names)
        record.status, record.params_after, record.macs_after = FACTORISED, params, macs
        record.weight_error = factors.weight_error
        record.seconds = time.perf_counter() - t0
        if factors.notes:
            record.extra["notes"] = factors.notes
        if self.config.stats_for(node.name, method) is not None:
            record.extra["data_aware"] = True
        elif node.name in self.config.calibration_notes:
            record.extra["calibration_note"] = self.config.calibration_notes[node.name]
        logger.info("%s: %s ranks %s, weight error %.4f", node.name, method_name, record.ranks,
                    record.weight_error)
        return record

    def factors(self, method: Method, site: LayerSite, ranks: tuple[int, ...]) -> Factors:
        """The factors of ``site`` at ``ranks`` (cached by layer, method, ranks, data use)."""
        stats = self.config.stats_for(site.name, method)
        key = (site.name, method.name, ranks, stats is not None, self.config.timing_only)
        if key not in self.cache:
            self.cache[key] = (method.decompose(site, ranks, stats=stats) if stats is not None
                               else method.decompose(site, ranks))
        return self.cache[key]


__all__ = ["CANDIDATE_OPS", "DECLINED", "Factorize", "FactorizeConfig"]
