"""Each layer's ladder: candidate replacements with MACs, latency alone and sensitivity.

A rung is a method at ranks whose MACs are a fraction of the layer's (``LEVELS``), rounded
to multiples of 8 where the layer is big enough (PITFALLS 7). Every rung is built and timed
alone on the activation the layer really sees (``onnxlr.latency``; timings are cached on
disk), and only rungs *measured* faster than the layer stay on the ladder: FLOPs are not
speed (PITFALLS 1). Sensitivity (the metric's drop with that rung alone in place) is filled
in by the planner from the gated graph.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from onnxlr.budget import ranks_for_macs, selected_layers
from onnxlr.latency import LayerTimer, layer_nodes_and_inputs
from onnxlr.methods import METHODS
from onnxlr.search.gated import Option
from onnxlr.sites import find_site

logger = logging.getLogger(__name__)

#: MAC fractions offered to every layer, most expensive first.
LEVELS = (0.6, 0.4, 0.25, 0.15, 0.08)
#: A rung must be at least this much faster alone to stay on the ladder (timing noise).
MIN_RUNG_SPEEDUP = 1.03


@dataclass
class Rung:
    """One candidate of one layer, measured."""

    option: Option
    macs: int
    weight_error: float | None
    local_error: float | None       # rel. L2 of the layer's own output on its real input
    ms_before: float
    ms_after: float
    drop: float | None = None       # metric drop with this rung alone in the model
    distortion: float | None = None  # worst output rel. L2 with this rung alone

    @property
    def speedup(self) -> float:
        return self.ms_before / self.ms_after

    def saved_ms(self, layer_ms: float) -> float:
        """Milliseconds saved on a layer that takes ``layer_ms``, by this rung's paired ratio."""
        return layer_ms * (1.0 - 1.0 / self.speedup)

    def to_dict(self, chosen: bool = False) -> dict:
        return {"method": self.option.method, "ranks": list(self.option.ranks),
                "macs": self.macs, "weight_error": self.weight_error,
                "local_error": self.local_error, "latency_before_ms": self.ms_before,
                "latency_ms": self.ms_after, "speedup": self.speedup,
                "metric_drop": self.drop, "output_error": self.distortion, "chosen": chosen}


@dataclass
class Ladder:
    """A layer and its rungs, slowest first."""

    layer: str
    method: str
    macs_before: int
    params_before: int
    ms_before: float
    rungs: list[Rung] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # rungs left off, and why


def build_ladders(build, feeds, timer: LayerTimer, *, multiple: int = 8, levels=LEVELS,
                  progress=None) -> tuple[list[Ladder], dict[str, str]]:
    """Ladders for every layer the settings select; and {layer: why it has no ladder}."""
    records = selected_layers(build)
    graph, nodes, values = layer_nodes_and_inputs(
        build.prepared, [r.name for r in records], feeds, provider=timer.provider)
    ladders, empty = [], {}
    for i, rec in enumerate(records):
        if progress:
            progress(i, len(records), f"timing {rec.name}")
        node = nodes.get(rec.name)
        if node is None:
            continue
        site = find_site(node, graph)
        if isinstance(site, str):
            empty[rec.name] = site
            continue
        method = METHODS[rec.method]()
        ranks = [ranks_for_macs(method, site, f, multiple) for f in levels]
        ranks = [r for r in dict.fromkeys(ranks) if r is not None]
        trials = timer.trials(node, values, rec.method, ranks)
        # MACs before and after counted on the same input: the isolated layer's real shape
        # (the whole graph's count is per position where a dim is dynamic, e.g. a sequence)
        macs_before = next((t.macs_before for t in trials if t.macs_before), rec.macs_before)
        ladder = Ladder(rec.name, rec.method, macs_before, rec.params_before, 0.0)
        for t in trials:
            if t.speedup is None:
                ladder.dropped.append(f"{t.ranks}: {t.reason or 'could not be timed'}")
            elif t.speedup < MIN_RUNG_SPEEDUP:
                ladder.dropped.append(f"{t.ranks}: measured {t.speedup:.2f}x alone")
            else:
                ladder.rungs.append(Rung(Option(rec.method, tuple(t.ranks)), t.macs,
                                         t.weight_error, t.local_error, t.ms_before, t.ms_after))
        if ladder.rungs:
            # one baseline per layer; each rung's saving comes from its own paired ratio
            ladder.ms_before = float(np.median([r.ms_before for r in ladder.rungs]))
            ladder.rungs.sort(key=lambda r: r.speedup)
            ladders.append(ladder)
        else:
            empty[rec.name] = ("no candidate was measured faster alone: "
                               + "; ".join(ladder.dropped[:4]) if ladder.dropped else
                               "no candidate ranks save work")
    timer.timing_cache.save()
    return ladders, empty
