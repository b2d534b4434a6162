"""ONNX Runtime room: make feeds, build sessions, compare outputs, time models.

onnxlr only trusts a factorised model once ONNX Runtime has run it next to the
original on the same inputs, so everything that touches ORT lives here, behind a
few small functions, one job a module:

``sessions``  providers, session options, loading a model, running it (the only module
              that imports ``onnxruntime``, lazily, so that ``onnxlr inspect`` works
              without it installed)
``inputs``    feeds: ``--input-shape`` parsing, an inputs file, seeded random inputs
``compare``   a candidate's outputs against the reference's (:class:`Comparison`)
``timing``    sessions timed interleaved (A, B, A, B, ...) so that machine drift hits every
              model alike

Everything is re-exported here: ``from onnxlr import runtime; runtime.make_session(...)``
and ``from onnxlr.runtime import make_inputs`` keep working as before the split.
"""
from __future__ import annotations

from onnxlr.runtime.compare import (Comparison, OutputComparison, _compare_one,  # noqa: F401
                                    check_reference, class_rows, compare_outputs)
from onnxlr.runtime.inputs import (DEFAULT_DIM, MAX_INPUT_ELEMENTS,  # noqa: F401
                                   _feedable_inputs, _load_npz, _resolve_shape, make_inputs,
                                   parse_input_shapes)
from onnxlr.runtime.sessions import (TIMING_PROTOCOL, _is_ort_error, _ort, _ort_message, _runner,  # noqa: F401
                                     make_session, providers_for, run, session_options)
from onnxlr.runtime.timing import (MAX_ROUNDS, LatencyComparison, LatencyStats,  # noqa: F401
                                   interleaved_latency, rounds_within)

__all__ = [
    "TIMING_PROTOCOL", "Comparison", "LatencyComparison", "LatencyStats", "OutputComparison",
    "check_reference", "class_rows", "compare_outputs", "interleaved_latency", "make_inputs",
    "make_session", "parse_input_shapes", "providers_for", "rounds_within", "run",
    "session_options",
]
