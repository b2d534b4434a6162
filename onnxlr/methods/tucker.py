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

Data-aware (``stats``: the conv's input patch statistics from calibration
data): ranks come from the whitened spectra (mode 0: the T × S·k.. matrix in
the patch metric; mode 1: the input-channel unfolding in the channel metric),
and two candidates are computed in closed form, the one with the lower output
error on the calibration statistics kept: (1) HOOI, then the last linear stage
(the output 1×1 conv, or the core when the output mode is unfactorised) and the
bias refit by least squares so that the chain's outputs match the original's
on the calibration patches (asymmetric reconstruction, Zhang et al. 2015,
arXiv 1505.06798); (2) :func:`whitened_tucker`, whose input 1×1 also comes from
the data.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import NameScope
from onnxlr.linalg.svd import array_key
from onnxlr.linalg.tucker import Tucker2, mode_products, tucker2, unfold, unfolding_singular_values
from onnxlr.linalg.whiten import (LayerStats, output_error, refit_last, whitened_spectrum,
                                  whitened_svd)
from onnxlr.methods.base import (Factors, Method, bias_params, conv_attrs, constant, detach,
                                 kernel_size, new_node, ones, select_rank)
from onnxlr.methods.svd import shifted_bias
from onnxlr.rank import RankSelector
from onnxlr.records import Declined
from onnxlr.sites import LayerSite


@dataclass
class RefitTucker2(Tucker2):
    """A Tucker-2 whose last stage was refit on calibration data; ``bias_shift`` joins the bias."""

    bias_shift: np.ndarray | None = None


def channel_stats(stats: LayerStats, s: int, kk: int) -> LayerStats:
    """Input-channel statistics from patch statistics (averaged over kernel offsets)."""
    g = stats.gram.reshape(s, kk, s, kk)
    return LayerStats(np.einsum("akbk->ab", g) / kk, stats.mean.reshape(s, kk).mean(axis=1),
                      stats.count)


def mode_spectra(site: LayerSite, stats: LayerStats | None) -> tuple[np.ndarray, np.ndarray]:
    """Spectra of the mode-0 and mode-1 unfoldings, whitened by the inputs when ``stats``."""
    w = site.weight
    if stats is None:
        return unfolding_singular_values(w, 0), unfolding_singular_values(w, 1)
    t, s, kk = w.shape[0], w.shape[1], kernel_size(site)
    w64 = w.astype(np.float64)
    return (whitened_spectrum(w64.reshape(t, s * kk), stats, True),
            whitened_spectrum(unfold(w64, 1).T, channel_stats(stats, s, kk), True))


def mode_ranks(site: LayerSite, selector: RankSelector, multiple: int,
               stats: LayerStats | None = None) -> tuple[int, int]:
    """(R_out, R_in) from the rank rule on the two channel unfoldings; 0 or full → full size."""
    w = site.weight
    t, s, kk = w.shape[0], w.shape[1], kernel_size(site)
    s0, s1 = mode_spectra(site, stats)
    r_out = select_rank(selector, s0, t, s * kk, multiple)
    r_in = select_rank(selector, s1, s, t * kk, multiple)
    return (r_out if 0 < r_out < t else t), (r_in if 0 < r_in < s else s)


def refit_tucker(site: LayerSite, tk: Tucker2,
                 stats: LayerStats) -> tuple[RefitTucker2, float, float]:
    """Refit the chain's last linear stage and bias on the calibration patch statistics.

    Returns the refit chain and the layer's calibration output error before and after.
    """
    w = site.weight.astype(np.float64)
    t, s, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    kk = math.prod(kernel)
    a = w.reshape(t, s * kk)
    r_out, r_in = tk.core.shape[:2]
    before = output_error(a, tk.reconstruct().reshape(t, s * kk), stats)
    core, u_out = tk.core, tk.u_out
    if r_out < t:  # stage: input 1×1 and core; refit the output 1×1
        stage = np.einsum("oik,si->osk", core.reshape(r_out, r_in, kk), tk.u_in)
        u_out, shift, after = refit_last(a, stage.reshape(r_out, s * kk), stats)
    else:  # output mode unfactorised: stage is the input 1×1 per offset; refit the core
        core_mat, shift, after = refit_last(a, np.kron(tk.u_in.T, np.eye(kk)), stats)
        core = core_mat.reshape((t, r_in) + kernel)
    approx = mode_products(core, u_out, tk.u_in)
    err = float(np.linalg.norm(w - approx) / max(np.linalg.norm(w), 1e-300))
    return RefitTucker2(core, u_out, tk.u_in, err, shift), before, after


def whitened_tucker(site: LayerSite, ranks: tuple[int, int],
                    stats: LayerStats) -> tuple[RefitTucker2, float]:
    """Tucker-2 chosen for the output error: input 1×1 from the channel-whitened mode-1
    unfolding, then the best (core, output 1×1, bias) for it (reduced-rank regression).

    Input side: with channel covariance Σ_ch = L Lᵀ, the input projection keeps the top
    r_in left singular vectors of Lᵀ·W₍₁₎ (the output energy each whitened input direction
    carries; cross-offset correlations are ignored here). Given that projection, the core
    is the least-squares fit of the layer's outputs on the projected patches, and the
    output mode is its whitened truncation in the metric of those projected patches,
    which is the exact optimum of both for the chosen input projection.
    """
    w = site.weight.astype(np.float64)
    t, s, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    kk = math.prod(kernel)
    r_out, r_in = ranks
    a = w.reshape(t, s * kk)
    if r_in < s:
        # the whitener and the input-side SVD are the layer's, not the rung's: once each
        def input_side():
            wh = channel_stats(stats, s, kk).whitener(True)
            return wh, np.linalg.svd(wh.factor.T @ unfold(w, 1), full_matrices=False)[0]
        wh, u_full = stats.remember(array_key("tucker input side", w), input_side)
        u = u_full[:, :r_in]
        u_in = np.linalg.qr((u.T @ wh.inverse).T)[0]  # orthonormal basis of the same rows
    else:
        u_in = np.eye(s)
    stage = np.kron(u_in.T, np.eye(kk))  # (r_in·K, S·K): the input 1×1 at every offset
    core, shift, err = refit_last(a, stage, stats)
    u_out = np.eye(t)
    if r_out < t:
        projected = LayerStats(stage @ stats.gram @ stage.T, stage @ stats.mean, stats.count)
        ws = whitened_svd(core, projected, r_out, centred=True)
        u_out, core, shift = ws.left, ws.right, shift + ws.shift
        err = output_error(a, u_out @ core @ stage, stats, shift)
    core = core.reshape((u_out.shape[1], r_in) + kernel)
    approx = mode_products(core, u_out, u_in)
    rel = float(np.linalg.norm(w - approx) / max(np.linalg.norm(w), 1e-300))
    return RefitTucker2(core, u_out, u_in, rel, shift), err


class TuckerMethod(Method):
    name = "tucker"
    kinds = frozenset({"conv"})
    help = "Tucker-2 on the channel modes: 1×1 → k×k core → 1×1 (Kim et al. 2015)"

    data_aware = True

    def __init__(self, hooi_sweeps: int = 10):
        #: HOOI sweeps after the HOSVD start (0: HOSVD only, what timing a chain needs).
        #: Ten, not fifty: on Magika's 512×256×5 conv, 5 sweeps took the error from 0.4229
        #: (HOSVD) to 0.4128 and 50 to 0.4127, at 13.7 s per rung instead of 3.3 s (and
        #: 195 s at a lower rank); the data-aware refit re-solves the last stage anyway.
        self.hooi_sweeps = hooi_sweeps

    def choose_ranks(self, site: LayerSite, selector: RankSelector, multiple: int,
                     stats: LayerStats | None = None):
        r_out, r_in = mode_ranks(site, selector, multiple, stats)
        t, s = site.weight.shape[:2]
        if r_out == t and r_in == s:
            return Declined(f"rank rule '{selector.spec}' kept both channel modes at full "
                            f"rank ({t}, {s}): nothing to gain")
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

    def decompose(self, site: LayerSite, ranks, stats: LayerStats | None = None) -> Factors:
        t0 = time.perf_counter()
        result = tucker2(site.weight.astype(np.float64), tuple(ranks),
                         n_iter_max=self.hooi_sweeps)
        if stats is None:
            return Factors(result, float(result.rel_error), time.perf_counter() - t0)
        refit, before, after = refit_tucker(site, result, stats)
        whitened, err = whitened_tucker(site, tuple(ranks), stats)
        note = (f"calibration output error: weight HOOI {before:.4g}, HOOI + refit {after:.4g}, "
                f"whitened {err:.4g}; kept the ")
        best, note = (whitened, note + "whitened") if err < after else (refit, note + "refit")
        return Factors(best, float(best.rel_error), time.perf_counter() - t0, note)

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
        if getattr(tk, "bias_shift", None) is not None:
            bias = constant(names, f"{prefix}/bias", shifted_bias(site, tk.bias_shift), dtype)
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
