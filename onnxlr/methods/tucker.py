"""Tucker-2 of a k×k conv: 1×1 (S→R_in) → k×k (R_in→R_out) → 1×1 (R_out→T).

W[T, S, k..] ≈ core[R_out, R_in, k..] ×₀ U_out ×₁ U_in (Kim et al. 2015,
"Compression of deep convolutional neural networks for fast and low power
mobile applications", arXiv 1511.06530). The core conv keeps the original
stride, pads, auto_pad and dilation; the 1×1 convs are stride 1, so the chain
computes the same function at full ranks. Ranks come from the rank rule applied
to the mode-0 (T × S·k..) and mode-1 (S × T·k..) unfoldings, as Kim et al. do
with VBMF. A mode whose rank is its full size (or whose rule says 0, e.g. an
RGB input conv with S = 3) stays unfactorised: its factor is folded into the
core and the matching 1×1 conv is not emitted.
"""
from __future__ import annotations

import time

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import NameScope
from onnxlr.linalg.tucker import tucker2, unfolding_singular_values
from onnxlr.methods.base import (Factors, Method, bias_params, conv_attrs, constant, detach,
                                 kernel_size, new_node, ones, select_rank)
from onnxlr.rank import RankSelector
from onnxlr.sites import LayerSite


def mode_ranks(site: LayerSite, selector: RankSelector, multiple: int) -> tuple[int, int]:
    """(R_out, R_in) from the rank rule on the two channel unfoldings; 0 or full → full size."""
    w = site.weight
    t, s, kk = w.shape[0], w.shape[1], kernel_size(site)
    r_out = select_rank(selector, unfolding_singular_values(w, 0), t, s * kk, multiple)
    r_in = select_rank(selector, unfolding_singular_values(w, 1), s, t * kk, multiple)
    return (r_out if 0 < r_out < t else t), (r_in if 0 < r_in < s else s)


class TuckerMethod(Method):
    name = "tucker"
    kinds = frozenset({"conv"})
    help = "Tucker-2 on the channel modes: 1×1 → k×k core → 1×1 (Kim et al. 2015)"

    def choose_ranks(self, site: LayerSite, selector: RankSelector, multiple: int):
        r_out, r_in = mode_ranks(site, selector, multiple)
        t, s = site.weight.shape[:2]
        if r_out == t and r_in == s:
            return (f"rank rule '{selector.spec}' kept both channel modes at full rank "
                    f"({t}, {s}): nothing to gain")
        return (r_out, r_in)

    def full_ranks(self, site: LayerSite):
        return tuple(site.weight.shape[:2])

    def cost(self, site: LayerSite, ranks):
        r_out, r_in = ranks
        t, s = site.weight.shape[:2]
        kk = kernel_size(site)
        params = r_out * r_in * kk + bias_params(site)
        macs = r_out * r_in * kk * site.out_positions
        if r_in < s:
            params += s * r_in
            macs += s * r_in * site.in_positions
        if r_out < t:
            params += r_out * t
            macs += r_out * t * site.out_positions
        return params, macs

    def decompose(self, site: LayerSite, ranks) -> Factors:
        t0 = time.perf_counter()
        result = tucker2(site.weight.astype(np.float64), tuple(ranks))
        return Factors(result, float(result.rel_error), time.perf_counter() - t0)

    def build(self, graph: gs.Graph, site: LayerSite, factors: Factors, names: NameScope) -> None:
        tk = factors.arrays
        w = site.weight
        t, s, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
        d, dtype = len(kernel), w.dtype
        core, u_out, u_in = tk.core, tk.u_out, tk.u_in
        r_out, r_in = core.shape[0], core.shape[1]
        # An unfactorised mode is folded into the core rather than emitted as a square 1×1 conv.
        if r_in == s:
            core = np.einsum("oi...,si->os...", core, u_in)
        if r_out == t:
            core = np.einsum("oi...,to->ti...", core, u_out)
        node, prefix = site.node, f"{site.name}/tucker"
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        x, y = detach(site)
        h = x
        if r_in < s:
            h = new_node(graph, names, f"{prefix}/conv_in", "Conv",
                         [x, constant(names, f"{prefix}/U_in", u_in.T.reshape((r_in, s) + ones(d)),
                                      dtype)],
                         conv_attrs(site, ones(d), geometry=False), None, dtype)
        core_inputs = [h, constant(names, f"{prefix}/core", core, dtype)]
        if r_out == t and bias is not None:
            core_inputs.append(bias)
        h = new_node(graph, names, f"{prefix}/core", "Conv", core_inputs,
                     conv_attrs(site, kernel, geometry=True), y if r_out == t else None, dtype)
        if r_out < t:
            inputs = [h, constant(names, f"{prefix}/U_out", u_out.reshape((t, r_out) + ones(d)),
                                  dtype)]
            if bias is not None:
                inputs.append(bias)
            new_node(graph, names, f"{prefix}/conv_out", "Conv", inputs,
                     conv_attrs(site, ones(d), geometry=False), y, dtype)
