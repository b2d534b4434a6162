"""``OptimizeOptions``: every setting of one ``optimize`` run, validated once and frozen.

Each default is written here and nowhere else: ``optimize()``'s keyword arguments build (or
replace fields of) an ``OptimizeOptions``, and the CLI's ``onnxlr optimize`` flags take their
defaults from its fields (``default(name)``) and build one from the parsed arguments. A bad
value, or two options that exclude each other, is refused when the object is built, with a
one-line :class:`~onnxlr.errors.OptionError` (a ``ValueError`` and an ``OnnxlrError``) that
names the option; the method, rank and ``--layer-rank`` specs are parsed there too
(``method_plan``, ``rank_rule``, ``layer_rank_rules``), once.

(``onnxlr.options`` is something else: the CLI's argparse types for numeric flags.)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from onnxlr.errors import OnnxlrError, OptionError
from onnxlr.methods import CHANNEL_METHODS, parse_method
from onnxlr.rank import RankSelector, parse_rank


@dataclass(frozen=True)
class OptimizeOptions:
    """How to optimise a model (see :func:`onnxlr.pipeline.optimize`).

    Attributes:
        method: method spec, e.g. ``auto``, ``tucker``, ``cp``, ``svd``, ``auto,conv=cp``;
            or ``prune`` / ``thin`` alone (channel methods).
        rank: rank rule: ``32``, ``0.25``, ``energy:0.95`` or ``vbmf``.
        rank_multiple: round ranks up to a multiple of this (8 or 16 suit most hardware).
        include, exclude: node-name globs selecting the layers to factorise.
        layer_ranks: ``GLOB=RANK`` overrides of the rank rule for matching layers.
        max_error: bound on every output's relative L2 error (None: no bound).
        on_exceed: ``revert`` backs off layers until the bound holds; ``fail``
            returns the result with ``report.bound_met`` False.
        verify: run original and result with ONNX Runtime (needed for a bound).
        input_shapes: ``{input name: shape}`` for dynamic dims.
        inputs: ``.npz`` of real inputs keyed by input name, instead of random ones.
        batch: batch size for a dynamic leading dim of random inputs.
        seed: seed of random inputs, calibration sampling and the held-out split.
        cp_max_seconds: time bound for one CP decomposition.
        accept: ``error`` keeps what meets the error bound; ``latency`` also times
            each factorised layer alone on ``provider`` and keeps it only if it is at
            least ``min_layer_speedup`` times faster, and returns the input model
            unchanged if the whole result is not measured faster.
        min_layer_speedup: with ``accept="latency"``, how much faster a layer must run alone.
        provider, threads: ONNX Runtime provider (cpu | cuda | tensorrt) and intra-op
            threads for verification and latency.
        latency_cache: JSON file of layer timings (``default``: ~/.cache/onnxlr,
            None: in memory only).
        measure_latency: time original and result end to end at the end (needs verify).
        target_flops, target_speedup: a global budget (one of them): MACs of the candidate
            layers at most this fraction of before, or the whole model this many times faster.
            Ranks are then allocated across layers by measured sensitivity (``onnxlr.budget``)
            instead of the rank rule; ``max_error`` still bounds the result.
        profile: ORT-profile each layer inside the whole model, original vs result
            (``report.profile``).
        calib: calibration inputs (a ``.npz``, a folder of ``.npy``/``.npz``, or an iterable
            of feed dicts; see ``onnxlr.calib``): the layers' input statistics are captured
            once and the methods become data-aware (whitened SVD ranks and truncation, least-
            squares refit of Tucker/CP's last stage; ``onnxlr.linalg.whiten``). Without
            ``inputs``, verification runs on held-out calibration samples (the last fifth,
            at most 256; random inputs when fewer than 10), as ``report.verify_inputs`` says.
        calib_samples: use at most this many calibration samples.
        metric, max_drop: judge by what the user measures (``onnxlr.search``): a built-in
            name (``auto``, ``accuracy``, ``top1``, ``cosine``, ``rel_l2``, ``channels``),
            ``file.py:function``, ``module:function`` or a callable ``(reference, candidate
            [, labels]) -> score``; ``max_drop`` bounds the score's loss (default: the
            metric's own). Either one switches to the global search: every layer's ladder of
            candidates measured alone, scored in one gated ONNX Runtime session, allocated
            greedily and checked end to end; ``max_error`` and the rank rule are then not
            used, ``target_flops``/``target_speedup`` become the search's objective.
        timing_batch: the batch layers and the whole model are timed at in the search
            (default: the verification inputs' batch, at most 64).
        evaluate: ``.npz`` of held-out inputs (and ``label``) the search never sees: the
            metric of the original and the result on them goes into ``report.search``.

    Parsed in construction (not arguments): ``method_plan`` (layer kind → method name or
    None), ``rank_rule`` (a :class:`~onnxlr.rank.RankSelector`) and ``layer_rank_rules``
    (``(glob, RankSelector)`` pairs). ``include``, ``exclude`` and ``layer_ranks`` are stored
    as tuples whatever sequence they are given as.
    """

    method: str = "auto"
    rank: str = "vbmf"
    rank_multiple: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layer_ranks: tuple[str, ...] = ()
    max_error: float | None = 0.05
    on_exceed: str = "revert"
    verify: bool = True
    input_shapes: dict | None = None
    inputs: str | None = None
    batch: int = 1
    seed: int = 0
    cp_max_seconds: float = 60.0
    accept: str = "error"
    min_layer_speedup: float = 1.05
    provider: str = "cpu"
    threads: int | None = None
    latency_cache: str | None = "default"
    measure_latency: bool = True
    target_flops: float | None = None
    target_speedup: float | None = None
    profile: bool = False
    calib: Any = None
    calib_samples: int | None = None
    metric: Any = None
    max_drop: float | None = None
    timing_batch: int | None = None
    evaluate: str | None = None

    method_plan: dict = field(init=False, repr=False, compare=False)
    rank_rule: RankSelector = field(init=False, repr=False, compare=False)
    layer_rank_rules: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "layer_ranks"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        self._check()
        try:
            plan, rule = parse_method(self.method), parse_rank(self.rank)
            layer_rules = tuple(parse_layer_ranks(self.layer_ranks))
        except OptionError:
            raise
        except OnnxlrError as exc:
            raise OptionError(str(exc)) from None
        object.__setattr__(self, "method_plan", plan)
        object.__setattr__(self, "rank_rule", rule)
        object.__setattr__(self, "layer_rank_rules", layer_rules)

    # --- what the options ask for -------------------------------------------------------

    @property
    def searched(self) -> bool:
        """A metric (or its allowed drop) was given: the global search judges the result."""
        return self.metric is not None or self.max_drop is not None

    @property
    def budgeted(self) -> bool:
        """A MAC or speed-up target was given."""
        return self.target_flops is not None or self.target_speedup is not None

    @property
    def channel_method(self) -> str | None:
        """``prune`` or ``thin`` when that is the method (alone), else None."""
        name = self.method.strip()
        return name if name in CHANNEL_METHODS else None

    def replace(self, **changes) -> OptimizeOptions:
        """A copy with ``changes`` (validated again); an unknown name is a ``TypeError``."""
        check_names(changes)
        return dataclasses.replace(self, **changes) if changes else self

    # --- validation ---------------------------------------------------------------------

    def _check(self) -> None:
        """Ranges and exclusive options, in the order ``optimize()`` always checked them."""
        verify = self.verify
        if not isinstance(self.method, str):
            raise OptionError(f"invalid --method {self.method!r}: expected a string such as "
                              f"'auto' or 'auto,conv=cp'")
        if self.on_exceed not in ("revert", "fail"):
            raise OptionError(f"invalid on_exceed {self.on_exceed!r}: choose revert or fail")
        if self.max_error is not None and not _number(self.max_error) > 0:
            raise OptionError(f"invalid --max-error {self.max_error}: must be > 0")
        if self.max_error is not None and not verify:
            raise OptionError("--max-error needs verification: drop --no-verify or use "
                              "--max-error none")
        if not _number(self.rank_multiple) >= 1:
            raise OptionError(f"invalid --rank-multiple {self.rank_multiple}: must be >= 1")
        if not _count(self.batch, 1):
            raise OptionError(f"invalid --batch {self.batch}: must be an integer >= 1")
        if not (_number(self.cp_max_seconds) > 0 and math.isfinite(self.cp_max_seconds)):
            raise OptionError(f"invalid --cp-max-seconds {self.cp_max_seconds}: must be a "
                              f"finite number > 0")
        if self.accept not in ("error", "latency"):
            raise OptionError(f"invalid --accept {self.accept!r}: choose error or latency")
        if self.accept == "latency" and not verify:
            raise OptionError("--accept latency measures with ONNX Runtime: drop --no-verify")
        if not _number(self.min_layer_speedup) > 0:
            raise OptionError(f"invalid --min-layer-speedup {self.min_layer_speedup}: "
                              f"must be > 0")
        if self.timing_batch is not None and not _count(self.timing_batch, 1):
            raise OptionError(f"invalid --timing-batch {self.timing_batch}: must be an "
                              f"integer >= 1")
        if self.evaluate is not None and not self.searched:
            raise OptionError("--eval reports the --metric on held-out inputs: give --metric "
                              "too")
        if self.searched:
            if self.max_drop is not None and not (0 <= _number(self.max_drop) < 1e6):
                raise OptionError(f"invalid --max-drop {self.max_drop}: must be a finite "
                                  f"number >= 0")
            if not verify:
                raise OptionError("--metric/--max-drop are checked with ONNX Runtime: drop "
                                  "--no-verify")
            if self.channel_method:
                raise OptionError(f"--metric searches factorisations; --method "
                                  f"{self.channel_method} is not one of its methods yet (use "
                                  f"--rank/--max-error with it)")
        if self.target_flops is not None and self.target_speedup is not None:
            raise OptionError("give one budget: --target-flops or --target-speedup, not both")
        if self.profile and not verify:
            raise OptionError("--profile runs ONNX Runtime: drop --no-verify")
        if self.budgeted and not verify:
            raise OptionError("a budget is allocated from measurements: drop --no-verify")


def _number(value) -> float:
    """``value`` as a float for a range check; NaN (which fails every range) if it is not a
    real number (numpy's included; a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


def _count(value, minimum: int) -> bool:
    """An integer (numpy's included; a bool is not one) of at least ``minimum``."""
    return (not isinstance(value, bool) and isinstance(value, numbers.Integral)
            and value >= minimum)


def parse_layer_ranks(specs) -> list[tuple[str, RankSelector]]:
    """``['conv5*=16', 'fc?=energy:0.9']`` → [(glob, RankSelector)]."""
    out = []
    for spec in specs or []:
        if "=" not in spec:
            raise OptionError(f"invalid --layer-rank {spec!r}: expected GLOB=RANK, e.g. "
                              f"'conv5_*=16'")
        glob, rank = spec.rsplit("=", 1)
        try:
            out.append((glob, parse_rank(rank)))
        except OnnxlrError as exc:
            raise OptionError(f"invalid --layer-rank {spec!r}: {exc}") from None
    return out


#: The names ``OptimizeOptions(...)`` and ``optimize(**options)`` take.
OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(OptimizeOptions)
                                      if f.init)


def default(name: str):
    """The default of option ``name`` (what the CLI's flags start from)."""
    return OptimizeOptions.__dataclass_fields__[name].default


def check_names(changes: dict, what: str = "optimize()") -> None:
    """``TypeError`` naming the first key of ``changes`` that is no option (with the nearest
    option name, when one is close)."""
    for name in changes:
        if name not in OPTION_NAMES:
            near = difflib.get_close_matches(name, OPTION_NAMES, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise TypeError(f"{what} got an unexpected keyword argument {name!r}{hint}")


def make_options(options: OptimizeOptions | None = None, **changes) -> OptimizeOptions:
    """``options`` (default: all defaults) with ``changes``; validated."""
    check_names(changes)
    if options is None:
        return OptimizeOptions(**changes)
    if not isinstance(options, OptimizeOptions):
        raise TypeError(f"options must be an OptimizeOptions, not {type(options).__name__}")
    return options.replace(**changes)


__all__ = ["OPTION_NAMES", "OptimizeOptions", "check_names", "default", "make_options",
           "parse_layer_ranks"]
