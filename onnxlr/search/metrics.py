"""What the user measures: a score of a candidate's outputs, and how far it may drop.

A metric is a function ``score(reference, candidate, labels) -> float`` (higher is better)
of the original's and the candidate's outputs on the same real inputs (``labels`` from the
inputs file's ``label`` array, or None). Its *drop* is ``score(ref, ref) - score(ref, cand)``:
for agreement-style metrics the baseline is 1; for accuracy it is the original's accuracy.
``--max-drop`` bounds that drop; each built-in has a default that fits its unit.

Built-ins (``--metric NAME``):
  accuracy   top-1 accuracy of the class-score output against ``label`` (needs labels)
  top1       top-1 agreement with the original on class-score outputs [N, C]
  cosine     mean per-sample cosine similarity, worst float output (embeddings)
  rel_l2     1 - worst output's relative L2 error (the old bound, as a score)
  channels   1 - worst relative L2 error of any channel (axis 1) of any output: every box
             coordinate and class score of a detector is held to the bound on its own,
             like Polygraphy's per-output tolerances, so big box values cannot hide
             broken class scores
  auto       accuracy with labels and a class output; top1 for class outputs; else channels

A plug-in is ``file.py:function`` or ``package.module:function`` (or any callable from the
Python API) taking ``(reference, candidate)`` or ``(reference, candidate, labels)``.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from onnxlr.errors import OnnxlrError
from onnxlr.runtime import check_reference, class_rows  # noqa: F401 (re-exported)

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Metric:
    """A named score with its default allowed drop."""

    name: str
    score_fn: Callable[[Outputs, Outputs, np.ndarray | None], float]
    default_max_drop: float
    needs_labels: bool = False
    description: str = ""

    def score(self, reference: Outputs, candidate: Outputs, labels=None) -> float:
        """The candidate's score; a one-line error if the metric raises or returns no number."""
        try:
            value = self.score_fn(reference, candidate, labels)
        except OnnxlrError:
            raise
        except Exception as exc:  # a user's plug-in: its failure is named, not a traceback
            raise OnnxlrError(f"metric {self.name!r} raised {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            raise OnnxlrError(f"metric {self.name!r} returned {type(value).__name__}, not a number")
        value = float(value)
        if not math.isfinite(value):
            raise OnnxlrError(f"metric {self.name!r} returned {value}: a score must be finite")
        return value

    def drop(self, reference: Outputs, candidate: Outputs, labels=None) -> float:
        return self.score(reference, reference, labels) - self.score(reference, candidate, labels)


#: One-sided confidence of the drop's bound: the search accepts an assignment when the drop
#: is within ``max_drop`` at this confidence over the samples it was judged on.
CONFIDENCE = 0.8
#: Paired bootstrap resamples behind that bound (seeded: the same for every candidate).
RESAMPLES = 64


def drop_bound(metric: Metric, reference: Outputs, candidate: Outputs, labels=None, *,
               confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0,
               drop: float | None = None, stop_above: float | None = None,
               samples: int | None = None) -> float:
    """The drop at ``confidence`` by a paired bootstrap over the samples: what the search
    compares with ``max_drop``.

    Why: the search scores hundreds of candidates on one held-out set and keeps the best,
    so a drop measured on a few hundred samples is biased low (selection); a top-1 metric
    moves in steps of 1/n. On the digits CNN the plain drop accepted 0.8 points on 256
    held-out samples and lost 2.7 points on the 450 test images. Resampling the samples
    (the same resamples for the original and the candidate) bounds the drop by what the
    sample size can tell. ``samples``: how many samples the outputs hold; each output is
    resampled along its axis of that size (the first; a time-major sequence output
    [T, N, C] along axis 1: ddddocr's, whose plain drop had let a selection-biased 0.4-point
    gain through that lost 8.6 points on its test captchas). Without it, a leading axis all
    outputs share. Outputs where no such axis is found get the plain drop. ``drop``: the
    plain drop when the caller has it already (it is not recomputed).
    ``stop_above``: the allowance; a plain drop already above it is returned as it is (the
    bound is never below the plain drop, so the verdict is the same) without resampling:
    a plug-in metric is scored 64 more times per bound, on NudeNet half the checks' time.
    """
    plain = metric.drop(reference, candidate, labels) if drop is None else drop
    if stop_above is not None and plain > stop_above + 1e-12:
        return plain
    n = samples if samples is not None else (len(labels) if labels is not None else None)
    axes = sample_axes({**reference, **candidate}, n)
    if axes is None:
        return plain
    n = n if n is not None else np.asarray(next(iter(reference.values()))).shape[0]
    if n < 2 or labels is not None and len(labels) != n:
        return plain
    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        ref = {k: np.take(np.asarray(v), idx, axis=axes[k]) for k, v in reference.items()}
        cand = {k: np.take(np.asarray(v), idx, axis=axes[k]) for k, v in candidate.items()}
        lab = None if labels is None else np.asarray(labels)[idx]
        drops.append(metric.drop(ref, cand, lab))
    # A measured gain is not credited: the bound is the drop, at least 0, plus the bootstrap's
    # margin at ``confidence``. A compressed model's gain on the judged samples is what the
    # selection picked, not what new inputs show (ddddocr: +3.1 points of exact match on the
    # 256 judged captchas, -2.4 on 1024 test ones); so a candidate that changes many outputs
    # passes only when the judged set can resolve the allowance.
    margin = max(float(np.quantile(drops, confidence)) - plain, 0.0)
    return max(plain, 0.0) + margin


def input_samples(feeds: dict) -> int | None:
    """How many samples a feed dict holds: its inputs' one shared leading size, or None."""
    sizes = {np.asarray(v).shape[0] for v in feeds.values() if np.asarray(v).ndim >= 1}
    return sizes.pop() if len(sizes) == 1 else None


def sample_axes(outputs: Outputs, samples: int | None) -> dict[str, int] | None:
    """{output: the axis holding the samples}, or None where an output has none: the first
    axis of size ``samples`` (axis 0 when ``samples`` is None and every output's first axis
    has one shared size)."""
    shapes = {k: np.asarray(v).shape for k, v in outputs.items()}
    if any(len(sh) == 0 for sh in shapes.values()) or not shapes:
        return None
    if samples is None:
        firsts = {sh[0] for sh in shapes.values()}
        return {k: 0 for k in shapes} if len(firsts) == 1 else None
    axes = {}
    for k, sh in shapes.items():
        hits = [i for i, d in enumerate(sh) if d == samples]
        if not hits:
            return None
        axes[k] = hits[0]
    return axes


def _float_outputs(outputs: Outputs) -> list[str]:
    return [k for k, v in outputs.items() if np.asarray(v).dtype.kind == "f" and np.asarray(v).size]


def class_outputs(outputs: Outputs) -> list[str]:
    """Outputs shaped like class scores [N, C] (C > 1, size-1 dims ignored)."""
    return [k for k, v in outputs.items() if class_rows(v) is not None]


def _accuracy(reference: Outputs, candidate: Outputs, labels) -> float:
    if labels is None:
        raise OnnxlrError("metric 'accuracy' needs labels: give inputs with an integer "
                          "'label' array, or choose --metric top1")
    names = class_outputs(reference)
    if not names:
        raise OnnxlrError("metric 'accuracy' needs a class-score output [N, C]; the model has none")
    rows = class_rows(candidate[names[0]])
    labels = np.asarray(labels).reshape(-1)
    if rows.shape[0] != labels.shape[0]:
        raise OnnxlrError(f"metric 'accuracy': {labels.shape[0]} labels for {rows.shape[0]} "
                          f"rows of output {names[0]!r}")
    return float(np.mean(rows.argmax(axis=1) == labels))


def _top1(reference: Outputs, candidate: Outputs, labels) -> float:
    names = class_outputs(reference)
    if not names:
        raise OnnxlrError("metric 'top1' needs a class-score output [N, C]; the model has none")
    return min(float(np.mean(class_rows(reference[k]).argmax(1) == class_rows(candidate[k]).argmax(1)))
               for k in names)


#: The error a built-in gives an output it cannot compare (NaN, inf): huge but finite, so
#: the candidate simply fails its bound while the score stays a number.
UNCOMPARABLE = 1e9


def _finite_or_zero(num: float, den: float) -> float:
    return min(num / den, UNCOMPARABLE) if den > 0 else (0.0 if num == 0 else UNCOMPARABLE)


def _rel_l2(a: np.ndarray, b: np.ndarray, axis=None) -> np.ndarray | float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.all(np.isfinite(a64)) and np.all(np.isfinite(b64))):
        return UNCOMPARABLE  # NaN == NaN is not agreement (a check must not pass on nothing)
    if axis is None:
        return _finite_or_zero(float(np.linalg.norm(a64 - b64)), float(np.linalg.norm(a64)))
    moved = np.moveaxis(a64, axis, 0).reshape(a64.shape[axis], -1)
    diff = np.moveaxis(a64 - b64, axis, 0).reshape(a64.shape[axis], -1)
    num, den = np.linalg.norm(diff, axis=1), np.linalg.norm(moved, axis=1)
    return max(_finite_or_zero(float(n), float(d)) for n, d in zip(num, den))


def _relative_l2(reference: Outputs, candidate: Outputs, labels) -> float:
    return 1.0 - max((_rel_l2(reference[k], candidate[k]) for k in _float_outputs(reference)),
                     default=0.0)


def _channels(reference: Outputs, candidate: Outputs, labels) -> float:
    worst = 0.0
    for k in _float_outputs(reference):
        a = np.asarray(reference[k])
        axis = 1 if a.ndim >= 3 else None
        worst = max(worst, _rel_l2(a, candidate[k], axis))
    return 1.0 - worst


def _cosine(reference: Outputs, candidate: Outputs, labels) -> float:
    worst = 1.0
    for k in _float_outputs(reference):
        a = np.asarray(reference[k], np.float64)
        b = np.asarray(candidate[k], np.float64)
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            return -1.0
        a2, b2 = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1), \
            b.reshape(b.shape[0], -1) if b.ndim else b.reshape(1, 1)
        na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
        both_zero = (na == 0) & (nb == 0)
        cos = np.where(both_zero, 1.0,
                       np.sum(a2 * b2, axis=1) / np.maximum(na * nb, 1e-300))
        worst = min(worst, float(np.mean(np.clip(cos, -1.0, 1.0))))
    return worst


BUILTINS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", _accuracy, 0.01, True, "top-1 accuracy against the labels"),
    "top1": Metric("top1", _top1, 0.01, False, "top-1 agreement with the original"),
    "cosine": Metric("cosine", _cosine, 0.005, False, "mean per-sample cosine similarity"),
    "rel_l2": Metric("rel_l2", _relative_l2, 0.05, False, "1 - worst output relative L2 error"),
    "channels": Metric("channels", _channels, 0.05, False,
                       "1 - worst relative L2 error of any output channel"),
}


def auto_metric(reference: Outputs, labels) -> Metric:
    """The built-in that fits the outputs: accuracy / top-1 agreement for classifiers,
    per-channel relative L2 for everything else (detectors, regressors, embeddings)."""
    if class_outputs(reference):
        return BUILTINS["accuracy" if labels is not None else "top1"]
    return BUILTINS["channels"]


def _load_callable(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise OnnxlrError(f"invalid --metric {spec!r}: choose {', '.join(['auto', *BUILTINS])} "
                          f"or give file.py:function / module:function")
    if target.endswith(".py") or os.sep in target:
        if not os.path.isfile(target):
            raise OnnxlrError(f"metric file {target} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"onnxlr_metric_{abs(hash(target))}",
                                                          target)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            raise OnnxlrError(f"metric file {target} failed to load: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise OnnxlrError(f"metric module {target!r} cannot be imported: "
                              f"{type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise OnnxlrError(f"metric {spec!r}: {target} has no function {attr!r}")
    return fn


def _wrap(fn: Callable, name: str, max_drop: float) -> Metric:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        takes_labels = len(params) >= 3 or any(
            p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        takes_labels = True
    call = (lambda r, c, y: fn(r, c, y)) if takes_labels else (lambda r, c, y: fn(r, c))
    return Metric(name, call, max_drop, False, f"user metric {name}")


#: Default allowed drop of a plug-in's score: one point of a [0, 1] score.
PLUGIN_MAX_DROP = 0.01


def resolve_metric(spec, reference: Outputs, labels) -> Metric:
    """A Metric from a name, ``file.py:function``, ``module:function`` or a callable."""
    if isinstance(spec, Metric):
        metric = spec
    elif callable(spec):
        metric = _wrap(spec, getattr(spec, "__name__", "callable"), PLUGIN_MAX_DROP)
    elif spec in (None, "auto"):
        metric = auto_metric(reference, labels)
    elif spec in BUILTINS:
        metric = BUILTINS[spec]
    else:
        metric = _wrap(_load_callable(str(spec)), str(spec), PLUGIN_MAX_DROP)
    if metric.needs_labels and labels is None:
        raise OnnxlrError(f"metric {metric.name!r} needs labels: the inputs have no integer "
                          f"'label' array")
    return metric
