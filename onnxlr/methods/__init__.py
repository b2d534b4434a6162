"""The registry of factorisation methods, and the ``--method`` string.

A method spec is a comma list: a base name (``auto``, ``svd``, ``tucker``,
``cp``) and/or per-kind overrides ``kind=method`` with kinds ``gemm``,
``matmul``, ``conv1x1`` and ``conv`` (k×k). ``auto`` is SVD for Gemm, MatMul
and 1×1 convs and Tucker-2 for k×k convs. A single method applies to the
kinds it supports; others are left alone with that reason.
Examples: ``auto``, ``cp``, ``auto,conv=cp``, ``conv=tucker``.
"""
from __future__ import annotations

from onnxlr.errors import OnnxlrError
from onnxlr.methods.base import Factors, Method
from onnxlr.methods.cp import CpMethod
from onnxlr.methods.fastfood import FastfoodMethod, FastfoodSvdMethod
from onnxlr.methods.svd import SvdMethod
from onnxlr.methods.tucker import TuckerMethod

METHODS: dict[str, type[Method]] = {}


def register(method: type[Method]) -> type[Method]:
    """Make a method available to ``--method``, the CLI help, ``inspect`` and the search.

    Adding a method is one file with a :class:`Method` subclass and one call of this (also
    usable as a class decorator)."""
    if not method.name or not method.kinds or not method.kinds <= set(KINDS):
        raise OnnxlrError(f"method {method.__name__} needs a name and kinds among {KINDS}")
    METHODS[method.name] = method
    return method


def describe() -> str:
    """``--method`` help, from the registry."""
    return "; ".join(f"{m.name}: {m.help} [{', '.join(k for k in KINDS if k in m.kinds)}]"
                     for m in METHODS.values())
KINDS = ("gemm", "matmul", "conv1x1", "conv", "rnn")
AUTO = {"gemm": "svd", "matmul": "svd", "conv1x1": "svd", "conv": "tucker", "rnn": "svd"}
#: channel methods act on producer→consumer chains (onnxlr.passes.prune/.thin), alone
CHANNEL_METHODS = ("prune", "thin")

for _method in (SvdMethod, TuckerMethod, CpMethod, FastfoodMethod, FastfoodSvdMethod):
    register(_method)

__all__ = ["AUTO", "CHANNEL_METHODS", "KINDS", "METHODS", "Factors", "Method", "describe", "parse_method", "register"]


def _check_name(name: str, spec: str) -> str:
    if name in CHANNEL_METHODS:
        raise OnnxlrError(f"method '{name}' removes channels across layers and cannot be combined: "
                          f"use --method {name} alone")
    if name not in METHODS:
        raise OnnxlrError(f"unknown method '{name}' in --method {spec!r}: choose from auto, "
                          f"{', '.join(METHODS)}, {', '.join(CHANNEL_METHODS)} "
                          f"(or kind=method with kinds {', '.join(KINDS)})")
    return name


def parse_method(spec: str) -> dict[str, str | None]:
    """Map each layer kind to a method name (None: that kind is left alone).

    Raises:
        OnnxlrError: unknown method or kind, or a method that cannot handle the kind.
    """
    if spec.strip() in CHANNEL_METHODS:  # every kind goes to the channel pass
        return dict.fromkeys(KINDS, spec.strip())
    plan: dict[str, str | None] = dict.fromkeys(KINDS)
    items = [i.strip() for i in spec.split(",") if i.strip()]
    if not items:
        raise OnnxlrError("empty --method: choose from auto, " + ", ".join(METHODS))
    for item in items:
        if "=" in item:
            kind, name = (p.strip() for p in item.split("=", 1))
            if kind not in KINDS:
                raise OnnxlrError(f"unknown layer kind '{kind}' in --method {spec!r}: "
                                  f"kinds are {', '.join(KINDS)}")
            name = AUTO[kind] if name == "auto" else _check_name(name, spec)
            if kind not in METHODS[name].kinds:
                raise OnnxlrError(f"method '{name}' cannot factorise {kind} layers "
                                  f"(it handles {', '.join(sorted(METHODS[name].kinds))})")
            plan[kind] = name
        elif item == "auto":
            plan.update(AUTO)
        else:
            name = _check_name(item, spec)
            for kind in KINDS:
                if kind in METHODS[name].kinds:
                    plan[kind] = name
    return plan
