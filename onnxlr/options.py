"""Argparse types for numeric options: a bad value is refused while parsing, with a clear
message (usage error, exit 2), never later as a traceback or silently accepted.

``float("nan")`` and ``float("inf")`` parse, so every float type here also requires a
finite value; every count has a lower bound.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable


def count(minimum: int) -> Callable[[str], int]:
    """An integer ``>= minimum`` (``count(1)``: batch sizes, iterations, threads)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def number(*, above: float | None = None, at_least: float | None = None,
           none: bool = False) -> Callable[[str], float | None]:
    """A finite float, ``> above`` or ``>= at_least``; with ``none``, 'none'/'off' → None."""
    def parse(text: str) -> float | None:
        if none and text.strip().lower() in ("none", "off"):
            return None
        try:
            value = float(text)
        except ValueError:
            expected = "a number or 'none'" if none else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be greater than {above:g}, got {value:g}")
        if at_least is not None and not value >= at_least:
            raise argparse.ArgumentTypeError(f"must be at least {at_least:g}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse
