"""Truncated SVD of a layer's weight matrix: one layer becomes two thinner ones.

W (m×n) ≈ U_k · (S_k V_kᵀ), so ``m·n`` weights become ``k·(m+n)`` (Girshick,
Fast R-CNN, 2015, sect. 3.1). It pays only when k < m·n/(m+n).

- Gemm ``Y = α·A'·B' + β·C``: ``H = A'·U_k`` (a Gemm with the original transA,
  no bias), then ``Y = H·(α·S_k V_kᵀ) + β·C``.
- MatMul ``X[..., K] @ W[K, N]``: two MatMuls; a following bias Add is kept.
- LSTM / GRU / RNN with input weights W [D, G·H, I] (every direction's gates applied to
  each step's input, ``x·Wᵀ``): the matrix is I × D·G·H, and ``x·Wᵀ ≈ (x·U_k)·(S_k V_kᵀ)``
  is a MatMul I→k in front of the same recurrent op with input weights [D, G·H, k]. The
  recurrence R stays whole. It saves only the input product's share: on ddddocr's
  bidirectional 512-unit LSTM (about a third of the CRNN's time at batch 1), rank 128 timed
  1.34x on the layer alone, and made the whole model 1.02-1.06x faster on a quiet machine;
  the search's timings and in-place profile decide.
- Conv with weight [T, S, k..]: the matrix is T × (S·k..) (channel
  decomposition, Zhang et al. 2015): a conv with r filters and the original
  kernel, stride, pads and dilation, then a 1×1 conv r→T with the bias. For a
  1×1 conv this is the plain SVD of the T×S matrix.

Data-aware (``stats``: the layer's input rows / conv patches, from calibration
data): the truncation is done on the whitened matrix (``onnxlr.linalg.whiten``),
and the rank rules see the whitened spectrum, so ``energy:0.95`` keeps 95% of
the layer's output variance. Gemm and Conv whiten by the input covariance and
absorb the mean's share of the error into their bias (a bias is created if
the layer had none); a MatMul has no bias, so it whitens by E[x xᵀ].
"""
from __future__ import annotations

import time

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import NameScope
from onnxlr.linalg.svd import check_finite, singular_values, truncated_svd
from onnxlr.linalg.whiten import LayerStats, whitened_spectrum, whitened_svd
from onnxlr.methods.base import (Factors, Method, bias_params, conv_attrs, constant, detach,
                                 new_node, ones, select_rank)
from onnxlr.rank import RankSelector
from onnxlr.records import Declined
from onnxlr.sites import MATRIX_KINDS, LayerSite


def linear_map(site: LayerSite) -> tuple[np.ndarray, bool]:
    """(A, centred): the layer as y = A·x (out × in) and whether its bias can absorb a shift."""
    if site.kind == "gemm":
        node = site.node
        has_c = len(node.inputs) > 2 and bool(node.inputs[2].name)
        return site.matrix.T, not has_c or site.bias is not None  # a computed C cannot shift
    if site.kind in ("matmul", "rnn"):  # no bias of its own in front of the recurrence
        return site.matrix.T, False
    return site.matrix, True


def shifted_bias(site: LayerSite, shift: np.ndarray) -> np.ndarray:
    """The layer's bias (zero if none) plus a data-aware shift."""
    return (site.bias.astype(np.float64) if site.bias is not None else 0.0) + shift


class SvdMethod(Method):
    name = "svd"
    kinds = frozenset({"gemm", "matmul", "conv1x1", "conv", "rnn"})
    help = ("truncated SVD: Gemm/MatMul → two matrix products; Conv → k×k conv (r filters) + "
            "1×1; LSTM/GRU/RNN → a MatMul in front of thinner input weights")
    data_aware = True

    def choose_ranks(self, site: LayerSite, selector: RankSelector, multiple: int,
                     stats: LayerStats | None = None):
        m, n = site.matrix.shape
        if stats is not None:
            a, centred = linear_map(site)
            spectrum = whitened_spectrum(a, stats, centred)
        elif selector.uses_spectrum:
            spectrum = singular_values(site.matrix)
        else:  # the rule reads only the shape; the weight is still refused if not finite
            check_finite(site.matrix)
            spectrum = np.zeros(min(m, n))
        k = select_rank(selector, spectrum, m, n, multiple)
        if k == 0:
            return Declined(f"rank rule '{selector.spec}' chose rank 0 (no singular value "
                            f"above the noise level): layer kept rather than removed")
        return (k,)

    def full_ranks(self, site: LayerSite):
        return (min(site.matrix.shape),)

    def cost(self, site: LayerSite, ranks):
        (k,) = ranks
        m, n = site.matrix.shape
        # Both products run at the output positions (a conv's first half keeps the stride).
        return k * (m + n) + bias_params(site), k * (m + n) * site.out_positions

    def decompose(self, site: LayerSite, ranks, stats: LayerStats | None = None) -> Factors:
        """Factors ``(a, b)`` with ``matrix ≈ a @ b``; with ``stats``, ``(a, b, bias shift)``."""
        (k,) = ranks
        t0 = time.perf_counter()
        w = site.matrix.astype(np.float64)
        if stats is None:
            a, b = truncated_svd(w, k)
            err = float(np.linalg.norm(w - a @ b) / max(np.linalg.norm(w), 1e-300))
            return Factors((a, b), err, time.perf_counter() - t0)
        lin, centred = linear_map(site)
        ws = whitened_svd(lin, stats, k, centred=centred)
        if site.kind in MATRIX_KINDS:  # matrix = Aᵀ ≈ rightᵀ · leftᵀ
            a, b = ws.right.T, ws.left.T
        else:
            a, b = ws.left, ws.right
        err = float(np.linalg.norm(w - a @ b) / max(np.linalg.norm(w), 1e-300))
        notes = (f"data-aware (whitened, {ws.method}); calibration output error "
                 f"{ws.output_error:.4g}")
        return Factors((a, b, ws.shift), err, time.perf_counter() - t0, notes)

    def build(self, graph: gs.Graph, site: LayerSite, factors: Factors, names: NameScope) -> None:
        a, b = factors.arrays[:2]
        shift = factors.arrays[2] if len(factors.arrays) > 2 else None
        dtype = site.weight.dtype
        node = site.node
        prefix = f"{site.name}/svd"
        if site.kind == "gemm":
            attrs = node.attrs
            alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
            c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            if shift is not None:
                c, beta = _gemm_bias(names, prefix, site, c, alpha * shift, beta, dtype)
            x, y = detach(site)
            h = new_node(graph, names, f"{prefix}/gemm_in", "Gemm",
                         [x, constant(names, f"{prefix}/U", a, dtype)],
                         {"transA": int(attrs.get("transA", 0))}, None, dtype)
            inputs = [h, constant(names, f"{prefix}/SVt", alpha * b, dtype)]
            out_attrs = {}
            if c is not None:
                inputs.append(c)
                out_attrs["beta"] = beta
            new_node(graph, names, f"{prefix}/gemm_out", "Gemm", inputs, out_attrs, y, dtype)
        elif site.kind == "matmul":
            x, y = detach(site)
            h = new_node(graph, names, f"{prefix}/matmul_in", "MatMul",
                         [x, constant(names, f"{prefix}/U", a, dtype)], {}, None, dtype)
            new_node(graph, names, f"{prefix}/matmul_out", "MatMul",
                     [h, constant(names, f"{prefix}/SVt", b, dtype)], {}, y, dtype)
        elif site.kind == "rnn":
            # x·Wᵀ ≈ (x·a)·b: the MatMul's output feeds the same recurrent node, whose input
            # weights become bᵀ per direction; every other input and output stays
            d, gates, _ = site.weight.shape
            h = new_node(graph, names, f"{prefix}/rnn_in", "MatMul",
                         [node.inputs[0], constant(names, f"{prefix}/U", a, dtype)], {}, None,
                         dtype)
            node.inputs[0] = h
            node.inputs[1] = constant(names, f"{prefix}/W", b.T.reshape(d, gates, a.shape[1]),
                                      dtype)
        else:
            w = site.weight
            t, s, kernel = w.shape[0], w.shape[1], w.shape[2:]
            k = a.shape[1]
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            if shift is not None:
                bias = constant(names, f"{prefix}/bias", shifted_bias(site, shift), dtype)
            x, y = detach(site)
            first = b.reshape((k, s) + tuple(kernel))
            h = new_node(graph, names, f"{prefix}/conv_in", "Conv",
                         [x, constant(names, f"{prefix}/W_in", first, dtype)],
                         conv_attrs(site, tuple(kernel), geometry=True), None, dtype)
            last = a.reshape((t, k) + ones(len(kernel)))
            inputs = [h, constant(names, f"{prefix}/W_out", last, dtype)]
            if bias is not None:
                inputs.append(bias)
            new_node(graph, names, f"{prefix}/conv_out", "Conv", inputs,
                     conv_attrs(site, ones(len(kernel)), geometry=False), y, dtype)


def _gemm_bias(names: NameScope, prefix: str, site: LayerSite, c, shift: np.ndarray,
               beta: float, dtype) -> tuple[gs.Constant, float]:
    """Gemm's C with ``shift`` (output units) added: C + shift/β, or shift with β = 1."""
    from onnxlr.graph import constant_value

    value = constant_value(c) if c is not None else None
    if value is None or beta == 0.0:
        return constant(names, f"{prefix}/C", shift, dtype), 1.0
    return constant(names, f"{prefix}/C", value.astype(np.float64) + shift / beta, dtype), beta
