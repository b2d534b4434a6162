"""What ``onnxlr bench`` found: per-model figures, the settings they were timed with, and
their text / Markdown / JSON (``onnxlr.bench/1``) renderings. No timing happens here."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from onnxlr import escape
from onnxlr.report import human
from onnxlr.runtime import LatencyStats

__all__ = ["BenchResult", "ModelBench", "NOISY_SPREAD", "SCHEMA"]

SCHEMA = "onnxlr.bench/1"
#: p90/p10 above this means the timings were disturbed (busy machine); the text output warns.
NOISY_SPREAD = 1.5


@dataclass
class ModelBench:
    """One model's figures.

    Attributes:
        path: the model file as given.
        params: elements of float initializers and Constant-node tensors.
        file_bytes: size of the ``.onnx`` file plus its external data files.
        latency: per-run latency over the timed rounds (ms).
        speedup: median over rounds of ``t_first / t_this`` (1.0 for the first
            model; > 1 means faster than the first).
        throughput: samples per second at the batch used (``batch / median``).
        peak_rss_mb: growth of the process's peak resident memory while this
            model's session was created and run once (MiB); ``None`` when the
            platform gives no way to measure it. See :class:`onnxlr.machine.PeakRSS`.
    """

    path: str
    params: int
    file_bytes: int
    latency: LatencyStats
    speedup: float
    throughput: float
    peak_rss_mb: float | None

    @property
    def spread(self) -> float:
        """p90 / p10 of the latency (1.0 = perfectly steady; inf when p10 is 0)."""
        p10, p90 = self.latency.p10_ms, self.latency.p90_ms
        return p90 / p10 if p10 > 0 else math.inf

    @property
    def noisy(self) -> bool:
        """The spread exceeds :data:`NOISY_SPREAD`: the machine was busy during timing."""
        return self.spread > NOISY_SPREAD


@dataclass
class BenchResult:
    """All models timed together, with the settings and machine they were timed on."""

    models: list[ModelBench]
    provider: str
    threads: int | None
    batch: int
    opt_level: str
    iterations: int      # timed rounds actually done (each round runs every model once)
    machine: str         # platform, CPU model (and GPU name for GPU providers), onnxruntime version
    rss_method: str | None = None   # how peak_rss_mb was measured (None: not measured)
    notes: list[str] = field(default_factory=list)   # advice about the settings (not a problem)

    @property
    def noisy(self) -> list[ModelBench]:
        """Models whose p90/p10 spread exceeds :data:`NOISY_SPREAD`."""
        return [m for m in self.models if m.noisy]

    @property
    def warnings(self) -> list[str]:
        """Problems with the figures themselves (today: noisy timings)."""
        out = []
        if self.noisy:
            worst = max(m.spread for m in self.noisy)
            out.append(f"timings are noisy (p90/p10 up to {worst:.2f} > {NOISY_SPREAD}): the "
                       f"machine was busy; ratios hold better than absolute times, but rerun on a "
                       f"quieter machine to confirm")
        return out

    def to_dict(self) -> dict:
        """JSON-ready dict with a ``schema`` field (``onnxlr.bench/1``)."""
        def model(m: ModelBench) -> dict:
            d = asdict(m)
            d["latency"] = asdict(m.latency)
            d["spread"] = m.spread if math.isfinite(m.spread) else None
            return d
        return {
            "schema": SCHEMA,
            "settings": {"provider": self.provider, "threads": self.threads, "batch": self.batch,
                         "opt_level": self.opt_level, "iterations": self.iterations},
            "machine": self.machine,
            "rss_method": self.rss_method,
            "models": [model(m) for m in self.models],
            "warnings": self.warnings,
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    HEADER = ["model", "params", "size", "median ms", "p10 ms", "p90 ms", "throughput",
              "speed-up", "peak RSS"]

    def _rows(self) -> list[list[str]]:
        return [[m.path, human(m.params), _bytes(m.file_bytes), _ms(m.latency.median_ms),
                 _ms(m.latency.p10_ms), _ms(m.latency.p90_ms), f"{_rate(m.throughput)}/s",
                 f"{m.speedup:.2f}x", "-" if m.peak_rss_mb is None else f"+{m.peak_rss_mb:.1f} MB"]
                for m in self.models]

    def header_lines(self) -> list[str]:
        threads = "ORT default" if self.threads is None else str(self.threads)
        return [f"provider {self.provider}, threads {threads}, batch {self.batch}, "
                f"opt level {self.opt_level}, {self.iterations} interleaved rounds (medians; "
                f"speed-up = median of per-round ratios vs the first model)",
                f"machine: {self.machine}"]

    def to_text(self) -> str:
        rows = [self.HEADER] + [[escape.text(c) for c in row] for row in self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER))]
        table = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
        lines = [escape.text(s) for s in self.header_lines()] + [""] + table
        if self.rss_method:
            lines += ["", f"peak RSS: {escape.text(self.rss_method)}"]
        lines += [f"note: {escape.text(n)}" for n in self.notes]
        lines += [f"warning: {escape.text(w)}" for w in self.warnings]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        cell = escape.markdown
        table = ["| " + " | ".join(self.HEADER) + " |",
                 "|---|" + "---:|" * (len(self.HEADER) - 1)]
        table += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self._rows()]
        notes = [f"- {cell(s)}" for s in self.header_lines()]
        if self.rss_method:
            notes.append(f"- peak RSS: {cell(self.rss_method)}")
        notes += [f"- note: {cell(n)}" for n in self.notes]
        notes += [f"- **warning**: {cell(w)}" for w in self.warnings]
        return "\n".join(["### onnxlr bench", ""] + table + [""] + notes) + "\n"


def _ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _rate(x: float) -> str:
    return human(x) if x >= 1000 else f"{x:.3g}"


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
