"""Latency acceptance: keep a factorised layer only if it is measured faster, and the whole
model only if it is measured faster than the input.

After the error bound has settled each layer's ranks, every factorised layer
is timed alone (``onnxlr.latency``) at those ranks and at the same ranks
rounded up to multiples of 8 and 16 (never less accurate, often faster); the
fastest is kept if its speed-up beats ``min_layer_speedup``, otherwise the
layer is reverted with the measurement as the reason. The whole model is then
re-verified and re-measured against the original, side by side; if it is not
faster, the original is returned: ``accept="latency"`` never hands back a
slower model.
"""
from __future__ import annotations

import logging

import onnx

from onnxlr import runtime
from onnxlr.latency import LayerTimer, layer_nodes_and_inputs, pick_fastest, rank_variants
from onnxlr.methods import METHODS
from onnxlr.records import FACTORISED, REVERTED, LayerRecord
from onnxlr.sites import find_site

logger = logging.getLogger(__name__)


def time_layers(build, verifier, records: list[LayerRecord], timer: LayerTimer,
                candidates_for=None) -> dict[str, list]:
    """Trials for every factorised record: {layer: [Trial, ...]}.

    ``candidates_for(record, full_ranks)`` gives the ranks to try (default: the
    record's ranks and their rounded-up variants).
    """
    graph, nodes, values = layer_nodes_and_inputs(
        build.prepared, [r.name for r in records if r.status == FACTORISED], verifier.feeds,
        provider=timer.provider)
    todo = [r for r in records if r.status == FACTORISED and r.name in nodes]
    out = {}
    for rec in todo:
        node = nodes[rec.name]
        site = find_site(node, graph)
        full = METHODS[rec.method]().full_ranks(site)
        ranks = (candidates_for or _default_candidates)(rec, full)
        out[rec.name] = timer.trials(node, values, rec.method, ranks)
    timer.timing_cache.save()
    return out


def _default_candidates(rec: LayerRecord, full) -> list[tuple[int, ...]]:
    return rank_variants(tuple(rec.ranks), tuple(full))


def accept_by_latency(build, verifier, records: list[LayerRecord], keep: dict[str, str],
                      timer: LayerTimer, min_layer_speedup: float):
    """Keep the fastest measured candidate of each layer, revert layers that are not faster.

    Returns the rebuilt model and its records (with latency and candidates filled in).
    """
    trials = time_layers(build, verifier, records, timer)
    before = {r.name: r for r in records}
    chosen = {}
    forced, scale = dict(build.config.forced_ranks), dict(build.config.rank_scale)
    for name, options in trials.items():
        best = pick_fastest(options)
        chosen[name] = best
        if best is None or best.speedup < min_layer_speedup:
            measured = ("could not be timed: " + "; ".join(t.reason for t in options if t.reason)
                        if best is None else
                        f"measured {best.speedup:.2f}x alone ({best.ms_before:.3g} → "
                        f"{best.ms_after:.3g} ms at ranks {best.ranks})")
            keep[name] = f"{measured}; below --min-layer-speedup {min_layer_speedup:g}"
        else:
            forced[name] = best.ranks
            scale.pop(name, None)  # the ranks already include any back-off
    build.reconfigure(forced_ranks=forced, rank_scale=scale)
    result, rebuilt = build(keep)
    final = []
    for rec in rebuilt:
        options, best = trials.get(rec.name), chosen.get(rec.name)
        if options is not None:
            if not rec.changed and rec.name in keep:
                reason = keep[rec.name]
                rec = before[rec.name]
                rec.status, rec.reason = REVERTED, reason
            rec.candidates = [t.to_dict(t is best) for t in options]
            if best is not None:
                rec.latency_before_ms, rec.latency_after_ms = best.ms_before, best.ms_after
                rec.extra["local_error"] = best.local_error
        final.append(rec)
    return result, final


#: Timing a fast model end to end: more rounds than asked while they take under this long.
SMALL_MODEL_SECONDS = 2.0


def end_to_end(original: onnx.ModelProto, result: onnx.ModelProto, feeds, *,
               provider: str = "cpu", threads: int | None = None, iterations: int = 30,
               max_seconds: float = 10.0) -> dict:
    """Original vs result, interleaved in one run: medians, speed-up and its spread."""
    return end_to_end_many(original, [result], feeds, provider=provider, threads=threads,
                           iterations=iterations, max_seconds=max_seconds)[0]


def end_to_end_many(original: onnx.ModelProto, results: list, feeds, *, provider: str = "cpu",
                    threads: int | None = None, iterations: int = 30,
                    max_seconds: float = 10.0) -> list[dict]:
    """Original vs each result, all interleaved in the same rounds (O, R1, R2, O, …), so
    that two results are compared under the same machine; one :func:`end_to_end` dict each."""
    # the results' first: their load's transient copies (the proto serialised, ORT's parse)
    # then come and go before the original's weights are held (a 1.2B model: 4.5 GiB)
    after = [runtime.make_session(r, provider=provider, threads=threads) for r in results]
    sessions = [runtime.make_session(original, provider=provider, threads=threads), *after]
    # at least ``iterations`` rounds, more for a fast model while they take under
    # SMALL_MODEL_SECONDS: 30 rounds of a 40 µs MLP read anywhere from 1.4x to 2.3x
    rounds = runtime.rounds_within(sessions, feeds, SMALL_MODEL_SECONDS, least=iterations)
    timed = runtime.interleaved_latency(sessions, feeds, warmup=1, iterations=rounds,
                                        max_seconds=max_seconds * len(results))
    a = timed.stats[0]
    out = []
    for i, b in enumerate(timed.stats[1:], 1):
        out.append({
            "provider": provider, "threads": threads,
            "batch": _batch(feeds), "iterations": b.iterations,
            "before_ms": a.median_ms, "after_ms": b.median_ms, "speedup": timed.speedups[i],
            # the per-round speed-ups' p10/p90, and a 95% interval of their median: the noise
            "speedup_p10": timed.spreads[i][0], "speedup_p90": timed.spreads[i][1],
            "speedup_ci_low": timed.intervals[i][0], "speedup_ci_high": timed.intervals[i][1],
            "p10_before_ms": a.p10_ms, "p90_before_ms": a.p90_ms,
            "p10_after_ms": b.p10_ms, "p90_after_ms": b.p90_ms})
    return out


def _batch(feeds) -> int | None:
    for value in feeds.values():
        if getattr(value, "ndim", 0) >= 1:
            return int(value.shape[0])
    return None
