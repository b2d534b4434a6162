"""CP of a k×k conv: 1×1 (S→R) → one depthwise conv per spatial axis → 1×1 (R→T).

W[t, s, k₁..k_d] ≈ Σ_r A_out[t,r]·A_in[s,r]·Π_i A_i[k_i,r] (Lebedev et al.
2015, "Speeding-up convolutional neural networks using fine-tuned
CP-decomposition", arXiv 1412.6553). The spatial conv splits per axis: the
depthwise conv for axis i carries that axis' stride, pads and dilation and is
1 along the others (auto_pad works per axis, so it passes through unchanged).

Rank: ``--rank 32`` is the CP rank itself. Other rules (ratio, energy, vbmf)
have no CP spectrum to look at, so the rule picks Tucker-2 ranks on the
channel unfoldings and the CP rank is the one with the same MACs as that
Tucker-2 chain: both methods then get the same budget from the same rule.

Data-aware (``stats``: the conv's input patch statistics): the Tucker-2 ranks
behind the budget come from the whitened spectra, and after ALS the output 1×1
conv (``out_factor``) and the bias are refit by least squares on the
calibration patches (Zhang et al. 2015's asymmetric reconstruction), which also
repairs part of what a bounded ALS left behind.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import NameScope
from onnxlr.methods.base import Factors, Method, bias_params, constant, detach, new_node, ones
from onnxlr.linalg.whiten import LayerStats, output_error, refit_last
from onnxlr.methods.svd import shifted_bias
from onnxlr.methods.tucker import TuckerMethod, mode_ranks
from onnxlr.rank import FixedRank, RankSelector
from onnxlr.records import Declined
from onnxlr.sites import LayerSite


def refit_cp(site: LayerSite, cp, stats: LayerStats):
    """``cp`` with ``out_factor`` and a bias shift refit on the calibration patch statistics."""
    from onnxlr.linalg.cp import CP, cp_to_tensor

    @dataclass
    class RefitCP(CP):
        bias_shift: np.ndarray | None = None

    w = site.weight.astype(np.float64)
    t, s = w.shape[:2]
    kk = math.prod(w.shape[2:])
    a = w.reshape(t, s * kk)
    r = cp.out_factor.shape[1]
    before = output_error(a, cp.reconstruct().reshape(t, s * kk), stats)
    stage = cp_to_tensor([np.eye(r), cp.in_factor, *cp.spatial]).reshape(r, s * kk)
    out_factor, shift, after = refit_last(a, stage, stats)
    err = float(np.linalg.norm(a - out_factor @ stage) / max(np.linalg.norm(a), 1e-300))
    refit = RefitCP(out_factor, cp.in_factor, list(cp.spatial), err, cp.iterations, cp.seconds,
                    shift)
    return refit, f"refit on calibration data: layer output error {before:.4g} -> {after:.4g}"


class CpMethod(Method):
    name = "cp"
    kinds = frozenset({"conv"})
    help = "CP: 1×1 → depthwise per spatial axis → 1×1 (Lebedev et al. 2015)"
    #: a CP sweep costs 2·size·R flops and three copies of the weight: a smaller budget
    max_elements = 2**25

    def __init__(self, max_seconds: float = 60.0, max_iter: int = 200):
        self.max_seconds = max_seconds
        self.max_iter = max_iter

    data_aware = True

    def choose_ranks(self, site: LayerSite, selector: RankSelector, multiple: int,
                     stats: LayerStats | None = None):
        t, s = site.weight.shape[:2]
        if isinstance(selector, FixedRank):
            rank = selector.rank
        else:
            tucker = mode_ranks(site, selector, multiple, stats)
            if tucker == (t, s):
                return Declined(f"rank rule '{selector.spec}' kept both channel modes at full "
                                f"rank: nothing to gain")
            budget = TuckerMethod().cost(site, tucker)[1]
            rank = budget // max(self.cost(site, (1,))[1], 1)
            if multiple > 1 and rank >= multiple:
                rank -= rank % multiple  # round down: rounding up would overshoot the budget
        if rank < 1:
            return Declined(f"rank rule '{selector.spec}' leaves no CP rank within the budget")
        return (int(rank),)

    def full_ranks(self, site: LayerSite):
        t, s = site.weight.shape[:2]
        return (t * s,)  # beyond any rank that could still save work

    def cost(self, site: LayerSite, ranks):
        (r,) = ranks
        w = site.weight
        t, s, kernel = w.shape[0], w.shape[1], w.shape[2:]
        params = r * (s + t + sum(kernel)) + bias_params(site)
        macs = s * r * site.in_positions + r * t * site.out_positions
        for i, k in enumerate(kernel):
            # after the depthwise conv of axis i, axes ≤ i are at output size
            positions = math.prod(site.out_spatial[: i + 1]) * math.prod(site.in_spatial[i + 1:])
            macs += r * k * positions
        return params, macs

    def decompose(self, site: LayerSite, ranks, stats: LayerStats | None = None) -> Factors:
        from onnxlr.linalg.cp import cp_conv  # lazy: ALS machinery is only needed when used
        (r,) = ranks
        t0 = time.perf_counter()
        result = cp_conv(site.weight.astype(np.float64), r, max_iter=self.max_iter,
                         max_seconds=self.max_seconds)
        notes = f"{result.iterations} ALS iterations"
        if stats is not None:
            result, note = refit_cp(site, result, stats)
            notes += "; " + note
        return Factors(result, float(result.rel_error), time.perf_counter() - t0, notes)

    def build(self, graph: gs.Graph, site: LayerSite, factors: Factors, names: NameScope) -> None:
        cp = factors.arrays
        w = site.weight
        t, s, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
        d, dtype, r = len(kernel), w.dtype, cp.out_factor.shape[1]
        a = site.node.attrs
        strides = list(a.get("strides", [1] * d))
        dilations = list(a.get("dilations", [1] * d))
        pads = list(a.get("pads", [0] * (2 * d)))
        auto_pad = a.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        node, prefix = site.node, f"{site.name}/cp"
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if getattr(cp, "bias_shift", None) is not None:
            bias = constant(names, f"{prefix}/bias", shifted_bias(site, cp.bias_shift), dtype)
        x, y = detach(site)
        plain = {"strides": [1] * d, "pads": [0] * (2 * d), "dilations": [1] * d, "group": 1}
        h = new_node(graph, names, f"{prefix}/conv_in", "Conv",
                     [x, constant(names, f"{prefix}/A_in",
                                  cp.in_factor.T.reshape((r, s) + ones(d)), dtype)],
                     {"kernel_shape": list(ones(d)), **plain}, None, dtype)
        for i, k in enumerate(kernel):
            shape = [1] * d
            shape[i] = k
            attrs = {"kernel_shape": shape, "group": r,
                     "strides": [strides[j] if j == i else 1 for j in range(d)],
                     "dilations": [dilations[j] if j == i else 1 for j in range(d)]}
            if auto_pad != "NOTSET":
                attrs["auto_pad"] = auto_pad
            else:
                attrs["pads"] = ([pads[j] if j == i else 0 for j in range(d)]
                                 + [pads[d + j] if j == i else 0 for j in range(d)])
            weight = cp.spatial[i].T.reshape([r, 1] + shape)
            h = new_node(graph, names, f"{prefix}/depthwise{i}", "Conv",
                         [h, constant(names, f"{prefix}/A_k{i}", weight, dtype)],
                         attrs, None, dtype)
        inputs = [h, constant(names, f"{prefix}/A_out", cp.out_factor.reshape((t, r) + ones(d)),
                              dtype)]
        if bias is not None:
            inputs.append(bias)
        new_node(graph, names, f"{prefix}/conv_out", "Conv", inputs,
                 {"kernel_shape": list(ones(d)), **plain}, y, dtype)
