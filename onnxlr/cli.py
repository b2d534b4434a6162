"""Command line: ``onnxlr optimize | inspect | bench``. Thin: parse, call, print.

User errors (:class:`OnnxlrError`) become one line on stderr and a non-zero
exit code; anything else is a bug and keeps its traceback.
Exit codes: 0 ok, 1 bad input, 2 bad usage, 3 ``--max-error`` missed with
``--on-exceed fail`` (the result then goes to ``<out>.rejected.onnx``), 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from onnxlr import __version__
from onnxlr.errors import BoundExceeded, OnnxlrError, TargetMissed
from onnxlr.options import count, number
from onnxlr.settings import OPTION_NAMES, OptimizeOptions, default


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input .onnx file")
    from onnxlr.methods import describe
    p.add_argument("--method", default=default("method"),
                   help="auto (svd for gemm/matmul/conv1x1/rnn, tucker for conv), a method, or per "
                        "kind: 'auto,conv=cp', 'gemm=fastfood'. Methods: " + describe()
                        + ". Or alone: prune (channel pruning, needs --calib) | thin (SOMP, "
                        "data-free; least squares with --calib), where --rank 0.5 keeps half "
                        "the channels. Default: " + default("method"))
    p.add_argument("--rank-multiple", type=count(1), default=default("rank_multiple"), metavar="N",
                   help="round ranks up to a multiple of N (8 or 16 run faster on most hardware)")


def _verbosity(p: argparse.ArgumentParser, top: bool) -> None:
    """-v/-q before or after the subcommand (``onnxlr -v optimize`` = ``onnxlr optimize -v``)."""
    default = False if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="log what each step does")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="errors only on stderr, no progress; the report shrinks to its headline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxlr", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"onnxlr {__version__}")
    _verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_parser(*a, **k):
        sp = _add_parser(*a, **k)
        _verbosity(sp, top=False)
        return sp
    sub.add_parser = add_parser

    p = sub.add_parser("optimize", help="factorise layers and verify the result")
    d = default  # every optimize flag's default is the OptimizeOptions field's (onnxlr.settings)
    _common(p)
    p.add_argument("output_positional", nargs="?", metavar="output",
                   help="output .onnx path, as onnxsim/onnxslim take it (same as -o)")
    p.add_argument("-o", "--output", default=None, help="output .onnx path (never the input)")
    p.add_argument("--rank", default=d("rank"),
                   help="32 (fixed) | 0.25 (fraction of full rank) | energy:0.95 | vbmf. "
                        "Default: " + d("rank"))
    p.add_argument("--include", action="append", default=list(d("include")), metavar="GLOB",
                   help="only factorise layers whose node name matches (repeatable)")
    p.add_argument("--exclude", action="append", default=list(d("exclude")), metavar="GLOB",
                   help="never factorise layers whose node name matches (repeatable)")
    p.add_argument("--layer-rank", action="append", default=list(d("layer_ranks")),
                   metavar="GLOB=RANK",
                   help="a rank rule for matching layers, e.g. 'conv5_*=16' (repeatable)")
    p.add_argument("--max-error", type=number(above=0, none=True), default=d("max_error"),
                   metavar="X", help=f"bound on each output's relative L2 error vs the original "
                        f"(default {d('max_error'):g}; 'none' disables)")
    p.add_argument("--on-exceed", choices=("revert", "fail"), default=d("on_exceed"),
                   help="revert: undo the layers that hurt most until the bound holds (default); "
                        "fail: exit 3 and write the result to <output>.rejected.onnx instead")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="shape for an input with dynamic dims (repeatable)")
    p.add_argument("--inputs", metavar="NPZ", default=d("inputs"),
                   help=".npz of real inputs keyed by input name")
    p.add_argument("--calib", metavar="PATH", default=d("calib"),
                   help="calibration inputs (.npz keyed by input name, first axis = samples, or a "
                        "folder of .npy/.npz): data-aware factorisation; without --inputs, "
                        "verification uses held-out calibration samples")
    p.add_argument("--calib-samples", type=count(1), default=d("calib_samples"),
                   metavar="N", help="use at most N calibration samples")
    p.add_argument("--batch", type=count(1), default=d("batch"),
                   help=f"batch size for random inputs (default {d('batch')})")
    p.add_argument("--no-verify", action="store_true", default=not d("verify"),
                   help="do not run ONNX Runtime (needs --max-error none)")
    p.add_argument("--cp-max-seconds", type=number(above=0), default=d("cp_max_seconds"),
                   help=f"time bound for one CP decomposition (default {d('cp_max_seconds'):g})")
    p.add_argument("--metric", default=d("metric"), metavar="NAME|FILE.py:FN|MODULE:FN",
                   help="judge by what you measure and search every layer's candidates for "
                        "the fastest model within --max-drop: auto (accuracy with labels, "
                        "else top-1 agreement for classifiers, per-channel rel. L2 otherwise), "
                        "accuracy, top1, cosine, rel_l2, channels, or your own function "
                        "(reference, candidate[, labels]) -> score, higher is better")
    p.add_argument("--max-drop", type=float, default=d("max_drop"), metavar="X",
                   help="largest allowed loss of the --metric score (default: the metric's "
                        "own: 0.01 for accuracy/top1/plug-ins, 0.005 cosine, 0.05 rel_l2/"
                        "channels); implies --metric auto when --metric is not given")
    p.add_argument("--eval", metavar="NPZ", default=d("evaluate"),
                   help="with --metric: inputs (and 'label') the search never sees; the "
                        "metric of the original and the result on them is reported")
    p.add_argument("--timing-batch", type=count(1), default=d("timing_batch"), metavar="N",
                   help="with --metric: time layers and the whole model on the first N "
                        "verification samples (default: all of them, at most 64)")
    p.add_argument("--accept", choices=("error", "latency"), default=d("accept"),
                   help="error: keep what meets --max-error (default); latency: also time each "
                        "layer alone and keep it only if faster, and never return a model "
                        "measured slower than the input")
    p.add_argument("--min-layer-speedup", type=number(above=0), default=d("min_layer_speedup"),
                   metavar="X",
                   help=f"with --accept latency: a layer must run X times faster alone "
                        f"(default {d('min_layer_speedup'):g})")
    p.add_argument("--provider", default=d("provider"),
                   help=f"ONNX Runtime provider for verification and timing: cpu | cuda | "
                        f"tensorrt (default {d('provider')})")
    p.add_argument("--threads", type=count(1), default=d("threads"),
                   help="intra-op threads for verification and timing (default: ORT's)")
    p.add_argument("--latency-cache", default=d("latency_cache"), metavar="PATH",
                   help="JSON cache of layer timings (default ~/.cache/onnxlr/latency.json; "
                        "'none' keeps it in memory)")
    p.add_argument("--target-flops", type=number(above=0), default=d("target_flops"), metavar="F",
                   help="budget: MACs of the candidate layers at most F x before (e.g. 0.5); "
                        "ranks are allocated across layers by measured sensitivity")
    p.add_argument("--target-speedup", type=number(above=0), default=d("target_speedup"),
                   metavar="S",
                   help="budget: the whole model S times faster (e.g. 2.0), from layer timings")
    p.add_argument("--no-latency", action="store_true", default=not d("measure_latency"),
                   help="skip the end-to-end latency measurement at the end")
    p.add_argument("--report", action="append", default=[], metavar="PATH",
                   help="write the report: .json, .md or .html (repeatable)")
    p.add_argument("--profile", action="store_true", default=d("profile"),
                   help="profile each layer's time inside the whole model, original vs result "
                        "(ONNX Runtime profiling), for the report")
    p.add_argument("--recipe", metavar="JSON", default=None,
                   help="read the options from a recipe (onnxlr/schemas/recipe.schema.json); "
                        "options on the command line win")
    p.add_argument("--write-recipe", metavar="JSON", default=None,
                   help="write the options this run used as a recipe, to replay it")

    p = sub.add_parser("inspect", help="list candidate layers and the ranks each rule would pick")
    _common(p)
    p.add_argument("--rules", default="vbmf,energy:0.95,0.25",
                   help="comma list of rank rules to show (default vbmf,energy:0.95,0.25)")
    p = sub.add_parser("bench", help="ONNX Runtime latency of models, interleaved A B A B, "
                                      "speed-up vs the first")
    p.add_argument("models", nargs="+", help=".onnx files; the first is the baseline")
    p.add_argument("--provider", default="cpu", help="cpu | cuda | tensorrt (default cpu)")
    p.add_argument("--threads", type=count(1), default=None, help="intra-op threads (default: ORT's)")
    p.add_argument("--batch", type=count(1), default=1, help="batch size for a dynamic leading dim")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224")
    p.add_argument("--inputs", metavar="NPZ", help=".npz of real inputs keyed by input name")
    p.add_argument("--opt-level", default="all", help="disable | basic | extended | all")
    p.add_argument("--warmup", type=count(0), default=10)
    p.add_argument("--iterations", type=count(1), default=100, help="interleaved rounds")
    p.add_argument("--max-seconds", type=number(above=0), default=None, help="stop early after this long")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the result as Markdown")
    return parser


def cmd_bench(args) -> int:
    from onnxlr.benchmark import benchmark
    from onnxlr.paths import check_bench
    from onnxlr.runtime import parse_input_shapes

    reads = check_bench(args.models, args.inputs,
                        [("--json", args.json), ("--markdown", args.markdown)])
    result = benchmark(args.models, provider=args.provider, threads=args.threads,
                       batch=args.batch, input_shapes=parse_input_shapes(args.input_shape) or None,
                       opt_level=args.opt_level, warmup=args.warmup, iterations=args.iterations,
                       max_seconds=args.max_seconds, inputs=args.inputs)
    print(result.to_text())
    for path, text in ((args.json, result.to_json), (args.markdown, result.to_markdown)):
        if path:
            _write_text(Path(path), text(), protect=reads)
    return 0


_QUIET = {"on": False}
#: The progress renderer of the running command (:mod:`onnxlr.console`), or None.
_VIEW: dict = {"current": None}


def _progress(i: int, total: int, name: str) -> None:
    """The library's progress callback, rendered by :mod:`onnxlr.console`: rich rows with
    ETA on a terminal, plain lines (each phase, every quarter of it) in a pipe or a file."""
    if _QUIET["on"]:
        return
    if _VIEW["current"] is None:
        from onnxlr import console
        _VIEW["current"] = console.view(False, sys.stderr)
    _VIEW["current"](i, total, name)


def _end_progress() -> None:
    view, _VIEW["current"] = _VIEW["current"], None
    if view is not None:
        view.close()


def _width() -> int | None:
    """Columns the printed report must fit: the terminal's; none in a pipe or a file (one
    line per layer there, for grep and diff, whatever $COLUMNS an environment exports)."""
    import shutil
    return shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else None


_REPORTS = {".json": "to_json", ".md": "to_markdown", ".html": "to_html", ".htm": "to_html"}


def options_from_args(args: argparse.Namespace) -> OptimizeOptions:
    """The ``optimize`` options the parsed ``onnxlr optimize`` flags ask for (validated: a bad
    combination is an ``OptionError``, one line naming the option)."""
    shapes = None
    if args.input_shape:
        from onnxlr.runtime import parse_input_shapes
        shapes = parse_input_shapes(args.input_shape)
    given = {k: getattr(args, k) for k in OPTION_NAMES if hasattr(args, k)}  # same-named flags
    given.update(layer_ranks=args.layer_rank, verify=not args.no_verify, input_shapes=shapes,
                 evaluate=args.eval, measure_latency=not args.no_verify and not args.no_latency,
                 latency_cache=None if args.latency_cache.lower() == "none" else args.latency_cache)
    return OptimizeOptions(**given)


def cmd_optimize(args) -> int:
    from onnxlr.io import same_file, save_model
    from onnxlr.paths import check_optimize, rejected_path
    from onnxlr.pipeline import optimize

    if args.output and args.output_positional and args.output != args.output_positional:
        raise OnnxlrError(f"two outputs given: {args.output_positional} and -o {args.output}")
    args.output = args.output or args.output_positional
    if not args.output:
        raise OnnxlrError("no output path: give it as the second argument or with -o")
    out = Path(args.output)
    if same_file(out, args.model):
        raise OnnxlrError(f"{out}: output path is the input model; refusing to overwrite it")
    for path in args.report:
        if Path(path).suffix.lower() not in _REPORTS:
            raise OnnxlrError(f"{path}: unknown report format (use .json, .md or .html)")
    # every read and write checked before any work: no output onto an input, none unwritable
    reads = check_optimize(args.model, args.output,
                           [*args.report, *([args.write_recipe] if args.write_recipe else [])],
                           inputs=args.inputs,
                           calib=args.calib, metric=args.metric, evaluate=args.eval,
                           latency_cache=None if args.latency_cache.lower() in ("none", "default")
                           else args.latency_cache)
    model, report = optimize(args.model, options=options_from_args(args), progress=_progress)
    _end_progress()
    print(report.headline() if args.quiet else report.to_text(_width()))
    target = out if report.bound_met is not False else rejected_path(out)
    # a model whose weights came in a data file (over 1 GB) leaves with them in one
    save_model(model, target, protect=reads,
               external_data=True if report.weights_by_reference else None)
    for path in args.report:
        text = getattr(report, _REPORTS[Path(path).suffix.lower()])()
        _write_text(Path(path), text, protect=[*reads, target])
    if report.bound_met is False and report.search:
        s = report.search
        raise BoundExceeded(f"metric {s['metric']} dropped {s['drop']:.4g}, over --max-drop "
                            f"{s['max_drop']:g}; result written to {target} (not to {out})")
    if report.bound_met is False:
        raise BoundExceeded(f"output error {report.output_error:.4g} exceeds --max-error "
                            f"{args.max_error:g}; result written to {target} (not to {out})")
    if args.write_recipe:
        import json

        from onnxlr.recipe import from_args
        _write_text(Path(args.write_recipe),
                    json.dumps(from_args(args, _optimize_parser()), indent=1) + "\n",
                    protect=[*reads, target])
    print(f"wrote {target}")
    missed = next((d for d in (report.search, report.budget)
                   if d and d.get("target_met") is False), None)
    if missed is not None:
        what = (f"--target-speedup {missed['target_speedup']:g}"
                if missed.get("target_speedup") is not None
                else f"--target-flops {missed['target_flops']:g}")
        raise TargetMissed(f"{what} was not reached (the best result found was written to "
                           f"{target}; the report says what bound it)")
    return 0


def _write_text(path: Path, text: str, protect) -> None:
    import os
    import tempfile

    from onnxlr.io import same_file
    if any(same_file(path, p) for p in protect):
        raise OnnxlrError(f"{path}: report path would overwrite a model")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxlr-", dir=path.parent or ".")
    except OSError as exc:
        raise OnnxlrError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        # mkstemp makes 0600; a report is for reading: the mode a plain open() would give
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OnnxlrError(f"{path}: cannot write ({exc.strerror})") from None
        raise


def cmd_inspect(args) -> int:
    from onnxlr.inspect import format_views, inspect_model
    from onnxlr.io import load_model

    rules = tuple(r.strip() for r in args.rules.split(",") if r.strip())
    views = inspect_model(load_model(args.model), args.method, rules, args.rank_multiple)
    print(format_views(views, rules))
    return 0


def _sigterm_interrupts():
    """SIGTERM (a pipeline's timeout, ``kill``) is handled like Ctrl-C: clean up, exit 130.
    Returns the previous handler (None off the main thread, where signals cannot be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    return signal.signal(signal.SIGTERM, _terminate)


def _optimize_parser() -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices["optimize"]  # noqa: SLF001


def _with_recipe(argv: list[str]) -> list[str]:
    """``optimize … --recipe r.json …``: the recipe's options go first, so that the ones on
    the command line (parsed later) win."""
    if "optimize" not in argv:
        return argv
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--recipe"),
                next((a.split("=", 1)[1] for a in argv if a.startswith("--recipe=")), None))
    if path is None:
        return argv
    from onnxlr.recipe import to_argv
    at = argv.index("optimize") + 1
    return argv[:at] + to_argv(path, _optimize_parser()) + argv[at:]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _with_recipe(argv)
    except OnnxlrError as exc:
        print(f"onnxlr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    previous = _sigterm_interrupts()
    _QUIET["on"] = bool(args.quiet)
    _VIEW["current"] = None  # each command's quiet seconds start now
    if args.quiet and args.verbose:
        parser.error("-q and -v contradict each other: choose one")
    from onnxlr.console import StderrHandler
    logging.basicConfig(level=logging.INFO if args.verbose else
                        logging.ERROR if args.quiet else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s",
                        handlers=[StderrHandler()])
    try:
        commands = {"optimize": cmd_optimize, "inspect": cmd_inspect, "bench": cmd_bench}
        return commands[args.command](args)
    except OnnxlrError as exc:
        from onnxlr.escape import text
        _end_progress()
        print(f"onnxlr: error: {text(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _end_progress()
        print("onnxlr: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        _end_progress()
        if previous is not None:
            import signal
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
