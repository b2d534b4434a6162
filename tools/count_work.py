"""Count the repeated work one ``onnxlr optimize`` of the bundled model does.

Runs the README's first command through the CLI's own ``main`` (so nothing is set up
differently from what a user gets)::

    onnxlr optimize examples/digits_cnn.onnx -o /tmp/x.onnx \\
        --calib examples/digits_calib.npz --metric accuracy --eval examples/digits_test.npz

with a fresh, empty latency cache (``ONNXLR_CACHE_DIR`` points at a temporary folder: the
first run from a fresh clone), and counts by monkeypatching:

- graph conversions: ``onnx_graphsurgeon.import_onnx`` / ``export_onnx`` (every call, the
  ones inside ``onnxlr.graph`` included) and ``onnxlr.graph.to_graph`` / ``to_model``;
- shape inferences: ``onnx.shape_inference.infer_shapes`` (every call, the ones inside
  ``onnxlr.graph.infer_shapes`` included);
- ONNX Runtime sessions: ``onnxruntime.InferenceSession`` constructions;
- calibration: ``onnxlr.calib.load_calibration`` calls given a path (parsing and
  validating the file) and every read of the calibration file itself (``onnxlr.arrays.load_npz``
  on it: a :class:`~onnxlr.calib.Calibration` re-reads its file each time it is iterated).

The names are patched wherever an ``onnxlr`` module bound them (``from x import y``), so the
counts do not depend on how a module imported them. Timing work (the number of timing
repetitions) is not counted: only how often a model is converted, inferred or opened.

Usage: ``python tools/count_work.py [--json] [--by-caller]``.

Measured on the bundled digits CNN (7 candidate layers) on a shared, loaded 2-core machine.
The search's ladders and checks depend on measured speed-ups, so the counts move from run
to run: each cell is the range over three runs before and seven after.

==========================================  =========  =====
what                                        before     after
==========================================  =========  =====
gs.import_onnx                              74–78      12–14
gs.export_onnx                              137–145    58–65
onnxlr.graph.to_graph                       8–9        6–8
onnxlr.graph.to_model                       5–6        3–5
onnx.shape_inference.infer_shapes           84–88      8
onnxruntime.InferenceSession                100–108    67–88
load_calibration (from the file)            2          1
calibration file reads (load_npz)           6          4
==========================================  =========  =====

"before" is main at a0459de; "after" is branch issue11b. Where the difference comes from
(``--by-caller``):

- ``onnxlr.latency``: a layer was cut out (export, shape inference, import) once per
  candidate and once more per ``trials`` call, and a ladder calls ``trials`` twice per
  layer and method (the cheapest rung first): 66–70 isolations; now once per layer (6),
  and the layer's baseline session serves both calls. What is left of the exports and the
  sessions is one per timed candidate (each is a different model).
- ``onnxlr.graph.to_graph``: every conversion of the prepared model (statistics, ladders,
  gated graph, builds: 6–8 a run) inferred its shapes again, two passes of onnx's shape
  inference each (plain, then with data propagation); the prepared model carries them as
  ``value_info``, so they are inferred only when some tensor lacks a shape.
- calibration: ``pipeline._fit_batches`` parsed the file a second time (now it is handed
  the :class:`~onnxlr.calib.Calibration` the statistics came from), and the held-out part was
  read twice (inputs, then labels; now ``Calibration.gather``, one pass).
- ``calib.expose`` inferred the prepared model's shapes again for the tensors it exposes;
  it now takes them from the model's ``value_info`` when every one is there (two runs
  after this last change: 8 shape inferences each; it changes no other row).

Left: 8 shape inferences (prepare 2, one per isolated layer); the search's own sessions
(its refit, scoring, evaluation: ``onnxlr/search/``, not changed here).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "examples" / "digits_calib.npz"
ARGV = ["optimize", str(ROOT / "examples" / "digits_cnn.onnx"), "-o", "{out}",
        "--calib", str(CALIB), "--metric", "accuracy",
        "--eval", str(ROOT / "examples" / "digits_test.npz")]

COUNTED = ["gs.import_onnx", "gs.export_onnx", "onnxlr.graph.to_graph", "onnxlr.graph.to_model",
           "onnx.shape_inference.infer_shapes", "onnxruntime.InferenceSession",
           "load_calibration (from the file)", "calibration file reads (load_npz)"]


def _rebind(old, new) -> None:
    """Replace ``old`` by ``new`` in every loaded onnxlr module that bound it by name."""
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "onnxlr" or name.startswith("onnxlr.")):
            continue
        for attr, value in list(vars(module).items()):
            if value is old:
                setattr(module, attr, new)


def _import_all() -> None:
    """Import every onnxlr module now, so that :func:`_rebind` reaches their bound names."""
    import importlib
    import pkgutil

    import onnxlr

    for info in pkgutil.walk_packages(onnxlr.__path__, "onnxlr."):
        if info.name != "onnxlr.__main__":  # it runs the CLI when imported
            importlib.import_module(info.name)


#: Where a conversion or a session is made on someone else's behalf: the caller is asked for.
_PLUMBING = {"onnxlr.graph": None, "onnxlr.runtime": None, "onnxlr.verify": {"session"},
             "onnxlr.search.run": {"_session"}}


def _caller() -> str:
    """``module:function`` of the innermost onnxlr frame outside the plumbing (``onnxlr.graph``,
    ``onnxlr.runtime``, the session helpers): who asked for the conversion or the session."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("onnxlr") and not (
                module in _PLUMBING and (_PLUMBING[module] is None
                                         or frame.f_code.co_name in _PLUMBING[module])):
            return f"{module}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def install(counts: collections.Counter, callers: collections.Counter | None = None) -> None:
    """Wrap every counted function; ``counts[key]`` grows by one a call, ``callers[key,
    caller]`` too when given."""
    import numpy  # noqa: F401
    import onnx
    import onnx.shape_inference
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    _import_all()
    import onnxlr.arrays
    import onnxlr.calib
    import onnxlr.graph

    def wrap(owner, attr: str, key: str, when=None):
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            if when is None or when(*args, **kwargs):
                counts[key] += 1
                if callers is not None:
                    callers[key, _caller()] += 1
            return original(*args, **kwargs)

        counted.__wrapped__ = original
        setattr(owner, attr, counted)
        _rebind(original, counted)

    wrap(gs, "import_onnx", "gs.import_onnx")
    wrap(gs, "export_onnx", "gs.export_onnx")
    wrap(onnxlr.graph, "to_graph", "onnxlr.graph.to_graph")
    wrap(onnxlr.graph, "to_model", "onnxlr.graph.to_model")
    wrap(onnx.shape_inference, "infer_shapes", "onnx.shape_inference.infer_shapes")
    wrap(onnxlr.calib, "load_calibration", "load_calibration (from the file)",
         when=lambda source, *a, **k: isinstance(source, (str, os.PathLike)))
    wrap(onnxlr.arrays, "load_npz", "calibration file reads (load_npz)",
         when=lambda path, *a, **k: Path(path).resolve() == CALIB)

    base = ort.InferenceSession

    class CountedSession(base):  # a subclass: isinstance checks still hold
        def __init__(self, *args, **kwargs):
            counts["onnxruntime.InferenceSession"] += 1
            if callers is not None:
                callers["onnxruntime.InferenceSession", _caller()] += 1
            super().__init__(*args, **kwargs)

    ort.InferenceSession = CountedSession


def count(callers: collections.Counter | None = None) -> dict[str, int]:
    """Run the README's first command once and return the counts (and, into ``callers``,
    the same by ``(what, onnxlr caller)``)."""
    counts: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ONNXLR_CACHE_DIR"] = str(Path(tmp) / "cache")  # a cold latency cache
        install(counts, callers)
        from onnxlr.cli import main

        argv = [a.format(out=str(Path(tmp) / "x.onnx")) for a in ARGV]
        code = main(argv)
        if code != 0:
            raise SystemExit(f"onnxlr optimize exited {code}")
    return {key: counts[key] for key in COUNTED}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("--by-caller", action="store_true",
                        help="also list each count by the onnxlr function that made the call")
    args = parser.parse_args()
    callers: collections.Counter = collections.Counter()
    result = count(callers)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    if args.by_caller:
        for (key, caller), value in sorted(callers.items()):
            print(f"  {key:<{width}}  {value:4d}  {caller}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
