"""Truncated SVD of a layer's weight matrix: one layer becomes two thinner ones.

W (m×n) ≈ U_k · (S_k V_kᵀ), so ``m·n`` weights become ``k·(m+n)`` (Girshick,
Fast R-CNN, 2015, sect. 3.1). It pays only when k < m·n/(m+n).

- Gemm ``Y = α·A'·B' + β·C``: ``H = A'·U_k`` (a Gemm with the original transA,
  no bias), then ``Y = H·(α·S_k V_kᵀ) + β·C``.
- MatMul ``X[..., K] @ W[K, N]``: two MatMuls; a following bias Add is kept.
- Conv with weight [T, S, k..]: the matrix is T × (S·k..) (channel
  decomposition, Zhang et al. 2015): a conv with r filters and the original
  kernel, stride, pads and dilation, then a 1×1 conv r→T with the bias. For a
  1×1 conv this is the plain SVD of the T×S matrix.
"""
from __future__ import annotations

import time

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import NameScope
from onnxlr.linalg.svd import singular_values, truncated_svd
from onnxlr.methods.base import (Factors, Method, bias_params, conv_attrs, constant, detach,
                                 new_node, ones, select_rank)
from onnxlr.rank import RankSelector
from onnxlr.sites import LayerSite


class SvdMethod(Method):
    name = "svd"
    kinds = frozenset({"gemm", "matmul", "conv1x1", "conv"})
    help = "truncated SVD: Gemm/MatMul → two matrix products; Conv → k×k conv (r filters) + 1×1"

    def choose_ranks(self, site: LayerSite, selector: RankSelector, multiple: int):
        m, n = site.matrix.shape
        k = select_rank(selector, singular_values(site.matrix), m, n, multiple)
        if k == 0:
            return (f"rank rule '{selector.spec}' chose rank 0 (no singular value above the "
                    f"noise level): layer kept rather than removed")
        return (k,)

    def full_ranks(self, site: LayerSite):
        return (min(site.matrix.shape),)

    def cost(self, site: LayerSite, ranks):
        (k,) = ranks
        m, n = site.matrix.shape
        # Both products run at the output positions (a conv's first half keeps the stride).
        return k * (m + n) + bias_params(site), k * (m + n) * site.out_positions

    def decompose(self, site: LayerSite, ranks) -> Factors:
        (k,) = ranks
        t0 = time.perf_counter()
        w = site.matrix.astype(np.float64)
        a, b = truncated_svd(w, k)
        err = float(np.linalg.norm(w - a @ b) / max(np.linalg.norm(w), 1e-300))
        return Factors((a, b), err, time.perf_counter() - t0)

    def build(self, graph: gs.Graph, site: LayerSite, factors: Factors, names: NameScope) -> None:
        a, b = factors.arrays
        dtype = site.weight.dtype
        node = site.node
        prefix = f"{site.name}/svd"
        if site.kind == "gemm":
            attrs = node.attrs
            alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
            c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
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
        else:
            w = site.weight
            t, s, kernel = w.shape[0], w.shape[1], w.shape[2:]
            k = a.shape[1]
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
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
