"""Each layer's ladder: candidate replacements with MACs, latency alone and sensitivity.

A rung is a method at ranks whose MACs are a fraction of the layer's (``LEVELS``), rounded
to multiples of 8 where the layer is big enough (PITFALLS 7). Every rung is built and timed
alone on the activation the layer really sees (``onnxlr.latency``; timings are cached on
disk), and only rungs *measured* faster than the layer stay on the ladder: FLOPs are not
speed (PITFALLS 1). Sensitivity (the metric's drop with that rung alone in place) is filled
in by the planner from the gated graph.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np

from onnxlr.budget import ranks_for_macs, selected_layers
from onnxlr.latency import LayerTimer, layer_nodes_and_inputs
from onnxlr.methods import METHODS
from onnxlr.search.gated import Option
from onnxlr.records import Declined
from onnxlr.sites import find_site

logger = logging.getLogger(__name__)

#: MAC fractions offered to every layer, most expensive first. Four, not six: every rung is
#: timed alone, factorised with data and scored in the gated graph, so rungs are most of a
#: search's time (ddddocr: 102 rungs, ~4 s each on 2 cores); prune rungs add their own.
LEVELS = (0.7, 0.45, 0.25, 0.12)
#: A rung must be at least this much faster alone to stay on the ladder (timing noise).
MIN_RUNG_SPEEDUP = 1.03


@dataclass
class Rung:
    """One candidate of one layer, measured."""

    option: Option
    macs: int
    weight_error: float | None
    local_error: float | None       # rel. L2 of the layer's own output on its real input
                                    # (weights-only factors: they time the same)
    ms_before: float
    ms_after: float
    drop: float | None = None       # metric drop with this rung alone in the model
    distortion: float | None = None  # worst output rel. L2 with this rung alone
    #: "layer": timed as the layer alone; "chain": a prune rung, timed as the whole channel
    #: chain (producer → ops → consumer), whose own baseline is the chain's time
    scope: str = "layer"
    #: the other layer a chain rung changes: a channel prune's producer (its rows go), an
    #: LSTM's consumer (its input columns go)
    neighbour: str | None = None
    neighbour_macs: int = 0         # MACs this rung also saves in that layer

    @property
    def speedup(self) -> float:
        return self.ms_before / self.ms_after

    def saved_ms(self, layer_ms: float) -> float:
        """Milliseconds saved on a layer that takes ``layer_ms``, by this rung's paired ratio
        (a chain's rung: on the chain's own measured time)."""
        base = self.ms_before if self.scope == "chain" else layer_ms
        return base * (1.0 - 1.0 / self.speedup)

    def macs_saved(self, layer_macs: int) -> int:
        return layer_macs - self.macs + self.neighbour_macs

    def to_dict(self, chosen: bool = False) -> dict:
        return {"method": self.option.method, "ranks": list(self.option.ranks),
                "macs": self.macs, "weight_error": self.weight_error,
                "local_error": self.local_error, "latency_before_ms": self.ms_before,
                "latency_ms": self.ms_after, "speedup": self.speedup,
                "metric_drop": self.drop, "output_error": self.distortion, "chosen": chosen,
                **({"timed": "the channel chain", "neighbour": self.neighbour,
                    "neighbour_macs_saved": self.neighbour_macs} if self.scope == "chain" else {})}


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
    samples: int = 0   # leading dim of the layer's captured input (the timing batch)
    chain: str | None = None  # the channel chain its prune rungs act on, if any


#: Layers under this share of the candidate layers' MACs get no ladder: their replacement
#: cannot move the model's time much, and timing their rungs is most of a search's cost.
MIN_MAC_SHARE = 0.005

#: With ``--method auto`` a k×k conv also gets channel-SVD rungs (k×k conv with r filters,
#: then 1×1): for few input channels it beats Tucker-2; Pareto filtering keeps what is worth it.
AUTO_ALTERNATIVES = {"conv": ("tucker", "svd")}


def pareto(rungs: list[Rung]) -> list[Rung]:
    """The rungs no other rung beats on both speed and the layer's own output error."""
    def err(r: Rung) -> float:
        return r.local_error if r.local_error is not None else float("inf")
    keep = [r for r in rungs
            if not any(o is not r and o.speedup >= r.speedup and err(o) <= err(r)
                       and (o.speedup > r.speedup or err(o) < err(r)) for o in rungs)]
    return sorted(keep, key=lambda r: r.speedup)


def build_ladders(build, feeds, timer: LayerTimer, *, multiple: int = 8, levels=LEVELS,
                  progress=None, alternatives: dict | None = None
                  ) -> tuple[list[Ladder], dict[str, str]]:
    """Ladders for every layer the settings select; and {layer: why it has no ladder}.

    ``alternatives``: {layer kind: method names} tried besides the configured method.
    """
    records = selected_layers(build)
    # A chain's speed depends on its shapes, not its values: time (and Pareto-filter) the
    # rungs with cheap weights-only factors (Tucker-2 from its HOSVD, no HOOI sweeps), a
    # fraction of the data-aware ones' cost; the real factors are computed later only for the
    # rungs that stay (the gated graph).
    timer = dataclasses.replace(
        timer, config=dataclasses.replace(timer.config, calibration=None, timing_only=True),
        factor_cache={})
    graph, nodes, values = layer_nodes_and_inputs(
        build.prepared, [r.name for r in records], feeds, provider=timer.provider)
    ladders, empty = [], {}
    total = sum(r.macs_before for r in records) or 1
    for i, rec in enumerate(records):
        if progress:
            progress(i, len(records), f"timing {rec.name}")
        node = nodes.get(rec.name)
        if node is None:
            continue
        site = find_site(node, graph)
        if isinstance(site, Declined):
            empty[rec.name] = site.reason
            continue
        if rec.macs_before < MIN_MAC_SHARE * total:
            empty[rec.name] = (f"{100 * rec.macs_before / total:.2g}% of the candidate layers' "
                               f"MACs: under the {100 * MIN_MAC_SHARE:g}% worth a ladder")
            continue
        ladder = Ladder(rec.name, rec.method, rec.macs_before, rec.params_before, 0.0)
        timed = []
        names = dict.fromkeys([rec.method, *(alternatives or {}).get(rec.kind, ())])
        for name in names:
            method = METHODS[name]()
            if rec.kind not in method.kinds:
                continue
            ranks = [ranks_for_macs(method, site, f, multiple) for f in levels]
            ranks = [r for r in dict.fromkeys(ranks) if r is not None]
            if not ranks:
                continue
            # the cheapest rung first: if even it is not faster, no rung of this method is
            cheapest = timer.trials(node, values, name, ranks[-1:])
            if not cheapest or (cheapest[0].speedup or 0.0) < MIN_RUNG_SPEEDUP:
                t = cheapest[0] if cheapest else None
                ladder.dropped.append(f"{name}: its cheapest rung {ranks[-1]} measured "
                                      f"{(t.speedup or 0.0) if t else 0.0:.2f}x alone"
                                      + (f" ({t.reason})" if t and t.reason else ""))
                continue
            trials = timer.trials(node, values, name, ranks[:-1]) + cheapest
            timed += trials
            for t in trials:
                label = f"{name} {t.ranks}"
                if t.speedup is None:
                    ladder.dropped.append(f"{label}: {t.reason or 'could not be timed'}")
                elif t.speedup < MIN_RUNG_SPEEDUP:
                    ladder.dropped.append(f"{label}: measured {t.speedup:.2f}x alone")
                else:
                    ladder.rungs.append(Rung(Option(name, tuple(t.ranks)), t.macs, t.weight_error,
                                             t.local_error, t.ms_before, t.ms_after))
        # MACs before and after counted on the same input: the isolated layer's real shape
        # (the whole graph's count is per position where a dim is dynamic, e.g. a sequence)
        ladder.macs_before = next((t.macs_before for t in timed if t.macs_before),
                                  rec.macs_before)
        first = next((values[t.name] for t in node.inputs
                      if t.name in values and getattr(values[t.name], "ndim", 0)), None)
        ladder.samples = int(first.shape[0]) if first is not None else 0
        if ladder.rungs:
            kept = pareto(ladder.rungs)
            ladder.dropped += [f"{r.option.method} {r.option.ranks}: beaten on speed and error "
                               f"by another candidate" for r in ladder.rungs if r not in kept]
            ladder.rungs = kept
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
