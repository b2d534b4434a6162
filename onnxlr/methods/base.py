"""What a factorisation method is, and the graph-building helpers they share.

A method answers four questions about a :class:`~onnxlr.sites.LayerSite`:
which ranks (from a rank rule), what they cost (params, MACs), the factors
(pure numpy, in ``onnxlr.linalg``), and the nodes that replace the layer.
The factorise pass does the bookkeeping; a method holds no state.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.errors import OnnxlrError
from onnxlr.graph import NameScope
from onnxlr.rank import RankSelector, round_rank
from onnxlr.records import Declined
from onnxlr.sites import LayerSite


@dataclass
class Factors:
    """The result of decomposing one weight."""

    arrays: Any              # method-specific numpy factors
    weight_error: float      # relative Frobenius error of the reconstructed weight
    seconds: float = 0.0
    notes: str = ""


class Method(abc.ABC):
    """A factorisation: ranks → cost → factors → replacement nodes.

    A method is one class that declares everything the rest of onnxlr needs to know about
    it, and one :func:`onnxlr.methods.register` line: its name, the layer kinds it handles,
    its help text (the CLI's ``--method`` help is built from these), its per-layer size
    limit and whether it uses calibration statistics.
    """

    name: str = ""
    kinds: frozenset[str] = frozenset()
    help: str = ""
    #: Largest weight (elements) this method decomposes: SVD and Tucker need a few float64
    #: copies of it (2**28 elements: 2 GiB each). Bounded per layer, time and memory alike.
    max_elements: int = 2**28
    #: True when ``choose_ranks``/``decompose`` accept ``stats=`` (calibration statistics).
    data_aware: bool = False

    @classmethod
    def too_big(cls, site: LayerSite) -> str | None:
        """Why this method must not decompose the site's weight, or None."""
        if site.weight.size > cls.max_elements:
            return (f"weight has {site.weight.size} elements, over the {cls.name} limit of "
                    f"{cls.max_elements} (decomposition time and memory are bounded per layer)")
        return None

    @abc.abstractmethod
    def choose_ranks(self, site: LayerSite, selector: RankSelector,
                     multiple: int) -> tuple[int, ...] | Declined:
        """Ranks for this site, or a :class:`~onnxlr.records.Declined` saying why no useful
        rank exists (callers test ``isinstance(x, Declined)``)."""

    @abc.abstractmethod
    def full_ranks(self, site: LayerSite) -> tuple[int, ...]:
        """The largest meaningful ranks (exact representation)."""

    def scale_ranks(self, site: LayerSite, ranks: tuple[int, ...], scale: float) -> tuple[int, ...]:
        """Ranks grown by ``scale`` (the error bound's back-off), capped at full ranks."""
        return tuple(min(full, max(1, math.ceil(r * scale)))
                     for r, full in zip(ranks, self.full_ranks(site)))

    @abc.abstractmethod
    def cost(self, site: LayerSite, ranks: tuple[int, ...]) -> tuple[int, int]:
        """(params, MACs) of the replacement, bias included, at the site's shapes."""

    @abc.abstractmethod
    def decompose(self, site: LayerSite, ranks: tuple[int, ...]) -> Factors:
        """Compute the factors (numpy only, no graph access)."""

    @abc.abstractmethod
    def build(self, graph: gs.Graph, site: LayerSite, factors: Factors, names: NameScope) -> None:
        """Replace ``site.node`` in ``graph`` by the factorised nodes."""


def select_rank(selector: RankSelector, s: np.ndarray, m: int, n: int, multiple: int) -> int:
    """Run a rank rule on a spectrum and round it to the hardware-friendly multiple."""
    return round_rank(int(selector.select(s, m, n)), multiple, min(m, n))


# --- graph building -------------------------------------------------------------------------

def _largest(dtype) -> float | None:
    """Largest finite value of a float dtype (ml_dtypes' bfloat16 included), else None."""
    try:
        return float(np.finfo(dtype).max)
    except (TypeError, ValueError):
        try:
            import ml_dtypes
            return float(ml_dtypes.finfo(dtype).max)
        except (ImportError, TypeError, ValueError):
            return None


def overflow_reason(factors: Factors, dtype) -> str | None:
    """Why the factors cannot be written in the weight's dtype (fp16 tops out at 65504), else None.

    Factors are computed in float64; written back in float16/bfloat16 a large singular value
    or core entry would become inf, and the layer would silently compute something else.
    """
    limit = _largest(dtype)
    arrays = factors.arrays if isinstance(factors.arrays, (tuple, list)) else \
        list(vars(factors.arrays).values())
    flat = [a for x in arrays for a in (x if isinstance(x, list) else [x])
            if isinstance(a, np.ndarray) and a.size]
    if limit is None or not flat:
        return None
    peak = max(float(np.max(np.abs(a))) for a in flat)
    if peak > limit:
        return (f"a factor reaches {peak:.4g}, beyond the largest {np.dtype(dtype).name} "
                f"({limit:.4g}); the layer is kept rather than overflow")
    return None


def constant(names: NameScope, name: str, array: np.ndarray, dtype: np.dtype) -> gs.Constant:
    """A weight for an emitted node, cast from float64 to the layer's dtype (fp16, bf16, ...).

    Raises:
        OnnxlrError: the cast would turn finite values into inf (checked for the arrays
            :func:`overflow_reason` cannot see, e.g. a Gemm factor scaled by alpha).
    """
    cast = np.ascontiguousarray(np.asarray(array).astype(dtype))
    if cast.dtype != np.asarray(array).dtype and cast.size:
        wide = cast.astype(np.float64)
        if not np.all(np.isfinite(wide)) and np.all(np.isfinite(array)):
            raise OnnxlrError(f"factor {name!r} overflows {np.dtype(dtype).name}")
    return gs.Constant(names(name), cast)


def new_node(graph: gs.Graph, names: NameScope, name: str, op: str, inputs: list,
             attrs: dict, output: gs.Variable | None, dtype) -> gs.Variable:
    """Append a node; its output is ``output`` (the replaced layer's) or a fresh tensor."""
    node_name = names(name)
    out = output if output is not None else gs.Variable(names(node_name + "_out"), dtype=dtype)
    graph.nodes.append(gs.Node(op, name=node_name, attrs=attrs, inputs=inputs, outputs=[out]))
    return out


def detach(site: LayerSite) -> tuple[gs.Tensor, gs.Variable]:
    """Disconnect the original node; return its activation input and its output tensor."""
    node = site.node
    x, y = node.inputs[0], node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    return x, y


def conv_attrs(site: LayerSite, kernel: tuple[int, ...], *, geometry: bool) -> dict:
    """Attributes for a Conv in a chain; ``geometry`` keeps the original stride/pads/dilation."""
    d = len(kernel)
    attrs: dict = {"kernel_shape": list(kernel), "group": 1}
    if geometry:
        a = site.node.attrs
        for key in ("strides", "dilations", "pads"):
            if key in a:
                attrs[key] = list(a[key])
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            attrs["auto_pad"] = a["auto_pad"]
            attrs.pop("pads", None)
    else:
        attrs.update(strides=[1] * d, pads=[0] * (2 * d), dilations=[1] * d)
    return attrs


def ones(d: int) -> tuple[int, ...]:
    return (1,) * d


def kernel_size(site: LayerSite) -> int:
    return math.prod(site.weight.shape[2:])


def bias_params(site: LayerSite) -> int:
    return site.bias.size if site.bias is not None else 0
