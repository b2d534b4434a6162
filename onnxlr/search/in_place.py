"""Layers given back when they run slower inside the whole model than the original did.

A rung is timed faster alone, on its layer cut out of the model (:mod:`onnxlr.latency`).
Inside the model it need not be: ORT fuses an original Conv with what follows it or runs it
in its blocked NCHWc layout, and a factorised layer's stages may fall out of that. One
profiled run of the original and the result, interleaved
(:func:`onnxlr.profiling.compare_profiles`), gives each changed layer's time in place; the
search gives back those that did not get faster there, builds the model without them, and
returns whichever of the two measures faster end to end (one three-way interleaved timing).
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

#: A layer in place must take at most this share of its time before to be kept: a saving
#: under 3% is within the profiler's noise and not worth the metric it costs.
KEEP_BELOW = 0.97
#: Profiled rounds (each runs both models once, with ORT's per-node profiler on).
ROUNDS = 20


def slower_in_place(original, result, feeds: dict, layers: dict[str, str], *,
                    provider: str = "cpu", threads: int | None = None,
                    rounds: int = ROUNDS) -> dict[str, dict]:
    """{layer: {"before_ms", "after_ms"}} for the changed ``layers`` ({layer: method}) that
    are not faster inside ``result`` than inside ``original``; {} when the profile cannot be
    taken."""
    from onnxlr.profiling import compare_profiles
    # the methods name a factorised layer's nodes ("<layer>/<method>/…"): the result has no
    # onnxlr.layers metadata yet (the pipeline writes it only on the model it returns)
    try:
        times = compare_profiles(original, result, feeds, provider=provider, threads=threads,
                                 iterations=rounds, layers=dict(layers))
    except Exception as exc:  # noqa: BLE001 (a profile is advice: ORT's or ours, never fatal)
        logger.info("search: no in-place profile (%s)", str(exc).splitlines()[0])
        return {}
    slower = {}
    for name in layers:
        t = times.get(name)
        if t and t["before_ms"] > 0 and t["after_ms"] >= KEEP_BELOW * t["before_ms"]:
            slower[name] = t
    return slower


def affordable(model) -> bool:
    """Whether the step may hold a third model: not for one whose weights stay in their file
    or reach 1 GB (issue 14's bound is the model plus 2 GB, and the three-way timing holds
    the original and two results at once)."""
    from onnxlr import referenced
    from onnxlr.runtime.sessions import IN_MEMORY_BYTES, _initializer_bytes
    return not referenced.folders(model) and _initializer_bytes(model) < IN_MEMORY_BYTES


def reason(times: dict) -> str:
    return (f"measured no faster inside the model ({times['before_ms']:.3g} → "
            f"{times['after_ms']:.3g} ms in place, profiled): given back")


__all__ = ["KEEP_BELOW", "ROUNDS", "affordable", "reason", "slower_in_place"]
