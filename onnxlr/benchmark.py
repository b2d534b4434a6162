"""Benchmark room: time several ONNX models against each other with ONNX Runtime.

Why it works this way: the machines onnxlr runs on are often shared and noisy,
so an absolute latency means little from one run to the next. What holds up is
a *ratio measured side by side in one process*. Every model gets its own ORT
session in this process, the same feeds, the same provider, thread count and
graph optimisation level; after a warm-up the sessions are run interleaved
(A, B, A, B, ...), so clock boost, throttling and noisy neighbours hit every
model alike, and each model's speed-up against the first is the median of the
per-round ratios ``t_first / t_model``. Medians (with p10/p90 for the spread)
are reported rather than means; a wide p10-p90 spread flags a busy machine.
See ``shared/BENCHMARKING.md`` for the rules this follows.

What is measured:

- latency: one ``session.run`` with NumPy feeds, wall time (``perf_counter``).
  With ``provider="cuda"`` the host-to-device and device-to-host copies are
  included (``run`` is synchronous), as a plain ORT user would see them.
- throughput: ``batch / median latency`` in samples per second.
- params: elements of the float initializers and ``Constant`` node tensors
  (subgraphs included).
- peak RSS: see :class:`_PeakRSS` for the method and its limits. It is host
  memory only; GPU memory is not counted.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import external_data_helper

from onnxlr import escape
from onnxlr.errors import OnnxlrError
from onnxlr.io import load_model
from onnxlr.report import human
from onnxlr.runtime import (LatencyStats, interleaved_latency, make_inputs, make_session,
                            providers_for, run, session_options)

logger = logging.getLogger(__name__)

__all__ = ["BenchResult", "ModelBench", "NOISY_SPREAD", "SCHEMA", "benchmark", "count_params"]

SCHEMA = "onnxlr.bench/1"
#: p90/p10 above this means the timings were disturbed (busy machine); the text output warns.
NOISY_SPREAD = 1.5

_FLOAT_TYPES = frozenset(
    v for k, v in onnx.TensorProto.DataType.items() if "FLOAT" in k or k == "DOUBLE")


# --- results ------------------------------------------------------------------------------------

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
            platform gives no way to measure it. See :class:`_PeakRSS`.
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


# --- model facts --------------------------------------------------------------------------------

def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _elements(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1


def count_params(model: onnx.ModelProto) -> int:
    """Elements of float initializers and of float ``Constant`` node values (subgraphs included).

    Integer tensors (shapes, indices) are not weights and are not counted.
    """
    total = 0
    for g in _graphs(model.graph):
        total += sum(_elements(t) for t in g.initializer if t.data_type in _FLOAT_TYPES)
        total += sum(_elements(s.values) for s in g.sparse_initializer
                     if s.values.data_type in _FLOAT_TYPES)
        for node in g.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
                    total += _elements(attr.t)
                elif attr.name == "value_float":
                    total += 1
                elif attr.name == "value_floats":
                    total += len(attr.floats)
    return total


def _file_bytes(path: Path) -> int:
    """Size of the model file plus every external data file it names (each counted once)."""
    size = path.stat().st_size
    light = onnx.load_model(str(path), load_external_data=False)
    locations = {external_data_helper.ExternalDataInfo(t).location
                 for t in external_data_helper._get_all_tensors(light)
                 if external_data_helper.uses_external_data(t)}
    for loc in locations:  # load_model has already checked these locations are safe
        try:
            size += (path.parent / loc).stat().st_size
        except OSError:
            pass
    return size


@dataclass
class _Info:
    path: str
    params: int
    file_bytes: int
    inputs: list[tuple[str, int, tuple | None]]   # name, elem type, dims (int or str) or None


def _input_spec(model: onnx.ModelProto) -> list[tuple[str, int, tuple | None]]:
    inits = {t.name for t in model.graph.initializer}
    spec = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                         else (d.dim_param or "?") for d in tt.shape.dim)
        spec.append((v.name, tt.elem_type, dims))
    return spec


def _describe(path: str) -> tuple[onnx.ModelProto, _Info]:
    model = load_model(path)
    return model, _Info(path, count_params(model), _file_bytes(Path(path)), _input_spec(model))


def _format_spec(spec: list[tuple[str, int, tuple | None]]) -> str:
    def one(name, elem, dims):
        dtype = onnx.TensorProto.DataType.Name(elem).lower() if elem else "?"
        shape = "?" if dims is None else "[" + ",".join(map(str, dims)) + "]"
        return f"{name}: {dtype}{shape}"
    return ", ".join(one(*s) for s in spec) or "(none)"


def _check_same_inputs(first: _Info, other: _Info, feeds: dict[str, np.ndarray]) -> None:
    """Refuse a model whose inputs differ from the first one's (names, dtypes, fixed dims).

    A symbolic dim in either model matches anything: what matters is that the
    shared feeds (made from the first model) fit this model.
    """
    def fail(why: str) -> OnnxlrError:
        return OnnxlrError(f"models take different inputs, so they cannot be timed on the same "
                           f"feeds: {why}; {first.path} takes ({_format_spec(first.inputs)}), "
                           f"{other.path} takes ({_format_spec(other.inputs)})")
    names_a = [s[0] for s in first.inputs]
    names_b = [s[0] for s in other.inputs]
    if sorted(names_a) != sorted(names_b):
        raise fail("input names differ")
    spec_a = {s[0]: s for s in first.inputs}
    for name, elem, dims in other.inputs:
        if elem != spec_a[name][1]:
            raise fail(f"input {name!r} has a different dtype")
        if dims is None:
            continue
        shape = feeds[name].shape
        if len(dims) != len(shape):
            raise fail(f"input {name!r} has a different rank")
        for axis, (d, n) in enumerate(zip(dims, shape)):
            if isinstance(d, int) and d != n:
                raise fail(f"input {name!r} has a different size at axis {axis}")


def _effective_batch(feeds: dict[str, np.ndarray], batch: int) -> int:
    """The batch the feeds really carry.

    Fixed leading dims (in the model or from ``input_shapes``) win over
    ``batch``; when every feed has rank >= 2 and they share a leading dim, that
    dim is the batch. Otherwise (rank-0/1 inputs, disagreeing leading dims)
    ``batch`` is taken as given.
    """
    arrays = list(feeds.values())
    if arrays and all(a.ndim >= 2 for a in arrays):
        leading = {a.shape[0] for a in arrays}
        if len(leading) == 1:
            (d,) = leading
            if d != batch:
                logger.warning("the feeds' leading dim is %d, not --batch %d: throughput uses %d",
                               d, batch, d)
            return int(d)
    return batch


# --- machine --------------------------------------------------------------------------------------

def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if (key.strip() in ("model name", "Processor", "cpu model", "Hardware")
                        and value.strip()):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu_name() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return ", ".join(dict.fromkeys(names)) or None


def machine_description(provider: str = "cpu") -> str:
    """Platform, CPU model and core count, GPU name (GPU providers), onnxruntime version."""
    import onnxruntime
    parts = [platform.platform()]
    cpu = _cpu_model()
    parts.append(f"{cpu + ', ' if cpu else ''}{os.cpu_count() or '?'} logical CPUs")
    if provider.lower() != "cpu":
        gpu = _gpu_name()
        if gpu:
            parts.append(f"GPU {gpu}")
    parts.append(f"onnxruntime {onnxruntime.__version__}, python {platform.python_version()}")
    return "; ".join(parts)


# --- memory ------------------------------------------------------------------------------------

class _PeakRSS:
    """Growth of the process's peak resident set size over a stretch of work.

    Methods, best first:

    1. Linux: write ``5`` to ``/proc/self/clear_refs``, which resets the peak
       (``VmHWM`` in ``/proc/self/status``) to the current RSS; afterwards
       ``VmHWM - RSS before`` is the peak growth of that stretch alone.
    2. Elsewhere on Unix: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the
       lifetime peak, which cannot be reset: the growth only shows once the
       process exceeds its earlier peak, so it is a *lower bound* (a model
       that needs less than the earlier peak reads 0).
    3. Windows with psutil: ``peak_wset``, same lower-bound caveat.

    Limits common to all: this is the whole process, so other threads'
    allocations count too; memory that the allocator already holds (freed by
    earlier work but not returned to the OS) is reused without raising RSS,
    so later models can read low, even 0; the first model also pays ORT's
    one-time set-up; memory-mapped weights count only once touched; GPU
    memory is not included. Treat it as a rough figure, good for spotting a
    model that needs far more host memory than another, not for ranking
    models of similar size.
    """

    def __init__(self) -> None:
        self.method: str | None = None
        if self._clear_refs() and self._status("VmHWM") is not None:
            self.method = ("VmHWM growth, peak reset per model via /proc/self/clear_refs "
                           "(session creation + first run; host memory only)")
            self._kind = "clear_refs"
        elif self._rusage() is not None:
            self.method = ("getrusage ru_maxrss growth (session creation + first run; lifetime "
                           "peak, so a lower bound once an earlier model peaked higher; "
                           "host memory only)")
            self._kind = "rusage"
        elif self._psutil_peak() is not None:
            self.method = ("psutil peak working set growth (session creation + first run; "
                           "lifetime peak, so a lower bound; host memory only)")
            self._kind = "psutil"
        else:
            self._kind = None
        self._start: float | None = None

    @staticmethod
    def _clear_refs() -> bool:
        if not sys.platform.startswith("linux"):
            return False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> float | None:
        """A ``/proc/self/status`` entry in MiB."""
        try:
            with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 1024  # kB
        except (OSError, ValueError, IndexError):
            pass
        return None

    @staticmethod
    def _rusage() -> float | None:
        try:
            import resource
        except ImportError:
            return None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB

    @staticmethod
    def _psutil_peak() -> float | None:
        try:
            import psutil
            info = psutil.Process().memory_info()
        except Exception:  # not installed, or no access
            return None
        peak = getattr(info, "peak_wset", None)
        return None if peak is None else peak / (1 << 20)

    def start(self) -> None:
        gc.collect()
        if self._kind == "clear_refs":
            self._clear_refs()
            self._start = self._status("VmRSS")
        elif self._kind == "rusage":
            self._start = self._rusage()
        elif self._kind == "psutil":
            self._start = self._psutil_peak()

    def stop(self) -> float | None:
        """Peak growth in MiB since :meth:`start` (never negative), or None."""
        if self._start is None:
            return None
        if self._kind == "clear_refs":
            end = self._status("VmHWM")
        elif self._kind == "rusage":
            end = self._rusage()
        else:
            end = self._psutil_peak()
        start, self._start = self._start, None
        return None if end is None else max(0.0, end - start)


# --- the benchmark -----------------------------------------------------------------------------

def benchmark(paths: list[str], *, provider: str = "cpu", threads: int | None = None,
              batch: int = 1,
              input_shapes: dict | None = None, opt_level: str = "all", warmup: int = 10,
              iterations: int = 100, max_seconds: float | None = None, seed: int = 0,
              inputs: str | None = None) -> BenchResult:
    """Time models side by side in this process and compare them with the first.

    Args:
        paths: model files; the first is the reference for ``speedup``. The
            same file may be given twice (a sanity check: expect ~1.0x).
        provider: ``cpu``, ``cuda`` or ``tensorrt`` (see :func:`runtime.providers_for`).
        threads: intra-op threads for every session; ``None`` lets ORT choose
            (fix it for figures you want to compare across runs).
        batch: size of an unknown leading (batch) dim of the inputs.
        input_shapes: input name to shape (from :func:`runtime.parse_input_shapes`).
        opt_level: ORT graph optimisation level for every session.
        warmup: untimed runs per session before timing.
        iterations: timed rounds; each round runs every model once, in order.
        max_seconds: stop timing after this long (once at least 5 rounds are done).
        seed: seed of the random feeds.
        inputs: optional ``.npz`` with one array per input, used instead of random feeds.

    Returns:
        A :class:`BenchResult`, one :class:`ModelBench` per path in order.

    Raises:
        OnnxlrError: no paths, an unreadable model, models whose inputs differ,
            a bad setting, or ORT failing to load or run a model.
    """
    if not paths:
        raise OnnxlrError("no models to benchmark")
    if batch < 1:
        raise OnnxlrError(f"--batch must be at least 1, got {batch}")
    if iterations < 1:
        raise OnnxlrError(f"--iterations must be at least 1, got {iterations}")
    if warmup < 0:
        raise OnnxlrError(f"--warmup must not be negative, got {warmup}")
    paths = [os.fspath(p) for p in paths]
    # Validate the settings before the (possibly slow) model loading.
    providers_for(provider)
    session_options(threads, opt_level)

    infos: list[_Info] = []
    feeds: dict[str, np.ndarray] = {}
    for i, path in enumerate(paths):
        model, info = _describe(path)
        if i == 0:
            feeds = make_inputs(model, input_shapes, batch=batch, seed=seed, npz=inputs)
        else:
            _check_same_inputs(infos[0], info, feeds)
        infos.append(info)
        del model  # sessions load from the path: keep no copy of the weights in Python
    used_batch = _effective_batch(feeds, batch)

    meter = _PeakRSS()
    sessions, peaks = [], []
    for path in paths:
        meter.start()
        session = make_session(path, provider=provider, threads=threads, opt_level=opt_level)
        run(session, feeds)  # the first run allocates ORT's arenas and plans memory
        peaks.append(meter.stop())
        sessions.append(session)
        logger.debug("session for %s ready (peak RSS growth %s MiB)", path, peaks[-1])

    try:
        timing = interleaved_latency(sessions, feeds, warmup=warmup, iterations=iterations,
                                     max_seconds=max_seconds)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise OnnxlrError(f"onnxruntime failed while timing: {str(exc).strip().splitlines()[0]}") \
            from None

    models = [ModelBench(path=info.path, params=info.params, file_bytes=info.file_bytes,
                         latency=stats, speedup=speedup,
                         throughput=used_batch / max(stats.median_ms / 1e3, 1e-12),
                         peak_rss_mb=peak)
              for info, stats, speedup, peak in zip(infos, timing.stats, timing.speedups, peaks)]
    notes = []
    if threads is None:
        notes.append("threads not fixed (ORT default): pass --threads for figures that "
                        "compare across runs")
    return BenchResult(models=models, provider=provider.lower(), threads=threads, batch=used_batch,
                       opt_level=opt_level, iterations=timing.stats[0].iterations,
                       machine=machine_description(provider),
                       rss_method=meter.method if any(p is not None for p in peaks) else None,
                       notes=notes)
