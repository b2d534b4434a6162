"""Timing models side by side: sessions interleaved (A, B, A, B, ...) so that drift of the
machine (clock boost, thermal throttling, noisy neighbours) hits every model alike."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from onnxlr.errors import OnnxlrError
from onnxlr.runtime.sessions import _runner

logger = logging.getLogger(__name__)

@dataclass
class LatencyStats:
    """Latency of one model over the timed rounds, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    iterations: int


@dataclass
class LatencyComparison:
    """Latencies of several models timed together.

    Attributes:
        stats: one per session, in the order given.
        speedups: per session, the median over rounds of ``t_first / t_i``
            (so the first is 1.0 and >1 means faster than the first).
        spreads: per session, (p10, p90) of those per-round ratios: how far one round
            can be from the median.
        intervals: per session, a 95% confidence interval of that median (order
            statistics of the rounds, distribution-free): when it holds 1, "faster" or
            "slower" is within the noise.
    """

    stats: list[LatencyStats]
    speedups: list[float]
    spreads: list[tuple[float, float]] = field(default_factory=list)
    intervals: list[tuple[float, float]] = field(default_factory=list)


#: Rounds at most per timing. A time budget decides below it: a model or layer of a few
#: microseconds needs thousands of rounds for its median to settle (300 left a small MLP's
#: rungs 1.3-1.8x apart for the same layer; 30 rounds of the whole 40 µs MLP read 1.4-2.3x),
#: a big one reaches its budget in a few dozen.
MAX_ROUNDS = 5000


def rounds_within(sessions: list, feeds, seconds: float, least: int) -> int:
    """Interleaved rounds of ``sessions`` that take about ``seconds`` (from three probe
    rounds), at least ``least`` and at most :data:`MAX_ROUNDS`."""
    probe = interleaved_latency(sessions, feeds, warmup=3, iterations=3)
    per_round = sum(s.median_ms for s in probe.stats) / 1e3
    return int(min(MAX_ROUNDS, max(least, seconds / max(per_round, 1e-6))))


def interleaved_latency(sessions: list, feeds: dict | list[dict], *, warmup: int = 5,
                        iterations: int = 50, max_seconds: float | None = None) -> LatencyComparison:
    """Time sessions round-robin (A, B, C, A, B, C, ...) so machine drift cancels.

    Args:
        sessions: ORT sessions to time.
        feeds: one feed dict for all sessions, or one per session.
        warmup: untimed runs per session before timing.
        iterations: timed rounds (each round runs every session once).
        max_seconds: stop after this much timed wall time, but only once at
            least 5 rounds (or ``iterations``, if fewer) are done.

    Raises:
        OnnxlrError: no sessions, a feeds list of the wrong length, or ``iterations < 1``.
    """
    if not sessions:
        raise OnnxlrError("no sessions to time")
    feed_list = list(feeds) if isinstance(feeds, (list, tuple)) else [feeds] * len(sessions)
    if len(feed_list) != len(sessions):
        raise OnnxlrError(f"got {len(feed_list)} feed dicts for {len(sessions)} sessions")
    if iterations < 1:
        raise OnnxlrError(f"iterations must be at least 1, got {iterations}")
    runners = [_runner(s, f, device_resident=True) for s, f in zip(sessions, feed_list)]
    for runner in runners:
        for _ in range(max(0, warmup)):
            runner()
    times = np.empty((iterations, len(runners)))
    start, rounds = time.perf_counter(), 0
    for r in range(iterations):
        for i, runner in enumerate(runners):
            t0 = time.perf_counter()
            runner()
            times[r, i] = time.perf_counter() - t0
        rounds = r + 1
        if max_seconds is not None and rounds >= 5 and time.perf_counter() - start > max_seconds:
            break
    times = times[:rounds] * 1e3
    logger.debug("timed %d rounds of %d sessions", rounds, len(runners))
    stats = [LatencyStats(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)),
                          float(np.mean(t)), rounds) for t in times.T]
    ratios = [np.sort(times[:, 0] / np.maximum(times[:, i], 1e-9)) for i in range(len(runners))]
    # ranks of the median's 95% interval: the binomial(n, 1/2) quantiles, normal approximation
    k = max(0, int(np.floor(rounds / 2 - 0.98 * math.sqrt(rounds))))
    return LatencyComparison(stats, [float(np.median(r)) for r in ratios],
                             [(float(np.percentile(r, 10)), float(np.percentile(r, 90)))
                              for r in ratios],
                             [(float(r[k]), float(r[rounds - 1 - k])) for r in ratios])
