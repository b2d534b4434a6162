"""One exception type for everything the user can fix.

The CLI turns an :class:`OnnxlrError` into one line on stderr and a non-zero
exit code, without a traceback; any other exception is a bug and keeps its
traceback (the Polygraphy convention).
"""
from __future__ import annotations


class OnnxlrError(Exception):
    """A problem with the user's input (file, option, model), not a bug.

    Attributes:
        exit_code: process exit code the CLI uses for this error.
    """

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class OptionError(OnnxlrError, ValueError):
    """A bad option value, or options that exclude each other (``onnxlr.settings``): one line
    that names the option."""


class BoundExceeded(OnnxlrError):
    """The optimised model misses the requested output-error bound."""

    exit_code = 3


class TargetMissed(OnnxlrError):
    """A --target-speedup / --target-flops was not reached (the best result found is still
    written, and the report says which constraint bound)."""

    exit_code = 4
