"""Adaptive Fastfood replacement of a Gemm/MatMul as plain ONNX ops (Deep Fried Convnets).

Yang et al., "Deep Fried Convnets" (ICCV 2015, arXiv 1412.7149): a ``d → n`` layer
becomes ``⌈n/D⌉`` stacked blocks ``S·H·G·Π·H·B`` (``D`` = d padded to a power of two), fitted
here after training by :mod:`onnxlr.linalg.fastfood`. The graph, per input row:

    x ─Mul B─ Pad to D ─FWHT─ Gather Π ─Mul G─ FWHT ─ Slice n ─Mul S─ (+ U·Vᵗ x) ─ Add bias

The Walsh–Hadamard transform is emitted as stages, never as a dense ``D × D`` MatMul:
``radix=2`` gives ``log2 D`` butterflies (Reshape, two Slices, Add, Sub, Concat); a larger
radix (default 16) gives ``max(2, ⌈log2 D / log2 radix⌉)`` Kronecker stages
(``H_D = H_r1 ⊗ H_r2 ⊗ …``: a MatMul with a small ±1 Hadamard matrix on the last axis, then
a Transpose that rotates the next axis last), the same transform in fewer, larger nodes,
2–4× faster in ONNX Runtime (:data:`RADIX`) for about 2.7× the arithmetic at D = 512.
Both compute exactly ``scipy.linalg.hadamard(D) @ x``.
Every op exists since opset 11 (Pad and Slice with input operands), so the result runs on
any ONNX runtime.

**Ranks.** ``(k,)``: the rank of an optional least-squares low-rank correction ``U·Vᵗ``
added to the Fastfood output (0: none). ``fastfood`` always starts at 0, the paper's method,
and does not consult the rank rule; when the error bound is missed the back-off grows the
correction (1, 2, 4, …) until the layer would no longer save parameters, then reverts it.
``fastfood_svd`` applies the rank rule to the singular values of what Fastfood misses
(``W − V``, whitened with calibration data), so ``vbmf`` keeps only the correction that
stands above the noise.

**Costs.** Parameters: every number stored: ``B`` (blocks × d), ``G`` and the permutation
indices Π (int32, blocks × D each), ``S`` (n), the correction ``k·(d + n)``, the small ±1
matrices of Kronecker stages (one per size), and the bias. MACs per row: the ``B``, ``G``
and ``S`` products, the two transforms (a butterfly add counts as one MAC: ``D·log2 D`` per
block; a Kronecker stage of size r costs ``D·r``) and the correction (its two MatMuls and
Add); like the other methods, the final bias Add is not counted.

Without calibration data the fit matches ``W`` in Frobenius norm, which is the expected
output error on isotropic Gaussian inputs; with it, the layer's output error on the
calibration statistics (covariance shrunk by :data:`SHRINK`); the record's notes say which.
"""
from __future__ import annotations

import math
import time

import numpy as np
import onnx_graphsurgeon as gs
import scipy.linalg

from onnxlr.errors import OnnxlrError
from onnxlr.graph import NameScope, constant_value, static_shape
from onnxlr.linalg.fastfood import MAX_DIM, FastfoodFit, fastfood_matrix, fit_fastfood, next_pow2
from onnxlr.linalg.svd import singular_values
from onnxlr.linalg.whiten import LayerStats, output_error, whitened_spectrum
from onnxlr.methods.base import Factors, Method, bias_params, constant, detach, new_node, \
    select_rank
from onnxlr.methods.svd import linear_map
from onnxlr.rank import RankSelector
from onnxlr.records import Declined
from onnxlr.sites import LayerSite

#: Kronecker stages of at most 16 by default: one D=512 transform ran in 36 µs (1 row) and
#: 198 µs (64 rows) against 88 µs and 810 µs for the 9 butterfly stages (ORT CPU, 1 thread,
#: interleaved); ``FastfoodMethod(radix=2)`` emits the butterflies.
RADIX = 16
MIN_OPSET = 11
#: Shrinkage of the calibration covariance towards isotropic (see :func:`shrunk`). Held-out
#: layer output error for 0 → 0.1: 1.24 → 0.88 (sklearn MLP 64→256, 64 calibration rows),
#: 0.27 → 0.20 (its 128→10), 0.616 → 0.604 (digits 512→256, 1347 rows); 0.01 and d/N did
#: no better.
SHRINK = 0.1


def stage_sizes(dim: int, radix: int) -> list[int]:
    """Sizes of the Hadamard stages for a transform of length ``dim`` (powers of two,
    each at most ``radix``, as even as possible, at least two stages; product ``dim``)."""
    bits = int(math.log2(dim))
    if radix <= 2 or bits < 2:
        return [2] * bits
    stages = max(2, -(-bits // int(math.log2(radix))))  # one stage would be a dense D × D
    return [2 ** (bits // stages + (i < bits % stages)) for i in range(stages)]


def transform_macs(dim: int, radix: int) -> int:
    """MACs of one Walsh–Hadamard transform of length ``dim`` (an add counts as one)."""
    return dim * sum(stage_sizes(dim, radix)) // (2 if radix <= 2 else 1)


def shrunk(cov: np.ndarray, amount: float = SHRINK) -> np.ndarray:
    """``Σ + amount·(tr Σ / d)·I``: pulls the fit towards W in directions the calibration
    data barely excites (Fastfood, unlike a whitened SVD, would fill them with anything)."""
    d = cov.shape[0]
    return cov + amount * float(np.trace(cov)) / max(d, 1) * np.eye(d)


def _lead_dims(site: LayerSite) -> int | None:
    """How many leading (row) axes the layer's input has; None when its rank is unknown."""
    if site.kind == "gemm":
        return 1
    shape = static_shape(site.node.inputs[0])
    return None if shape is None else len(shape) - 1


class FastfoodMethod(Method):
    """Adaptive Fastfood blocks fitted to a Gemm/MatMul (see the module docstring).

    Args:
        radix: 2 for butterfly stages, 4 or more for Kronecker stages of at most that size.
        sweeps: most ALS sweeps per fit.
        seed: seeds the permutations and the fit's random start.
    """

    name = "fastfood"
    kinds = frozenset({"gemm", "matmul"})
    min_rank = 0  # rank 0 (no correction) is the plain method, not an empty layer
    help = ("Adaptive Fastfood (Deep Fried Convnets): S·H·G·Π·H·B blocks fitted to the layer, "
            "Hadamard in Kronecker stages; rank = low-rank correction, starts at 0")
    data_aware = True
    #: the ALS fit holds several float64 copies of each block and the D×D products of its
    #: transforms: bounded like CP (before, Fastfood had no bound at all)
    max_elements = 2**25

    def __init__(self, radix: int = RADIX, sweeps: int = 100, seed: int = 0):
        if radix < 2 or radix & (radix - 1):
            raise OnnxlrError(f"Fastfood radix must be a power of two >= 2, got {radix}")
        self.radix, self.sweeps, self.seed = radix, sweeps, seed
        self._fits: dict = {}   # fits made while choosing ranks, reused by decompose

    def _decline(self, site: LayerSite) -> Declined | None:
        d = site.matrix.shape[0]
        if next_pow2(d) > MAX_DIM:
            return Declined(f"input size {d} pads to {next_pow2(d)}, over the Fastfood fit's "
                            f"limit {MAX_DIM} (it holds D×D float64 matrices)")
        return None

    def choose_ranks(self, site: LayerSite, selector: RankSelector, multiple: int,
                     stats: LayerStats | None = None):
        return self._decline(site) or (0,)

    def full_ranks(self, site: LayerSite):
        return (min(site.matrix.shape),)

    def scale_ranks(self, site: LayerSite, ranks, scale: float):
        """The back-off's ×2 steps: a correction of rank 0 grows to 1, 2, 4, … (scale/2)."""
        (k,) = ranks
        if scale <= 1:
            return tuple(ranks)
        grown = math.ceil(k * scale) if k else math.ceil(scale / 2)
        return (min(self.full_ranks(site)[0], grown),)

    def cost(self, site: LayerSite, ranks):
        (k,) = ranks
        d, n = site.matrix.shape
        dim = next_pow2(d)
        blocks = -(-n // dim)
        hadamards = 0 if self.radix <= 2 else sum(r * r for r in set(stage_sizes(dim, self.radix)))
        params = blocks * (d + 2 * dim) + n + k * (d + n) + hadamards + bias_params(site)
        correction = k * (d + n) + n if k else 0   # two MatMuls and the Add
        per_row = blocks * (d + dim + 2 * transform_macs(dim, self.radix)) + n + correction
        return params, per_row * site.out_positions

    def _fit(self, site: LayerSite, rank: int, stats: LayerStats | None):
        """(fit, bias shift or None, note on what was fitted)."""
        key = (site.name, rank, stats is not None)
        if key in self._fits:
            return self._fits[key]
        a, centred = linear_map(site)
        base = self._fits.get((site.name, 0, stats is not None))
        start = base[0] if base is not None and rank else None
        if stats is None:
            fit = fit_fastfood(a, rank=rank, sweeps=self.sweeps, seed=self.seed, start=start)
            shift, note = None, ("no calibration data: fitted to W in Frobenius norm "
                                 "(isotropic Gaussian inputs)")
        else:
            if stats.dim != a.shape[1]:
                raise OnnxlrError(f"{site.name}: calibration statistics have {stats.dim} "
                                  f"features, the layer has {a.shape[1]} inputs")
            fit = fit_fastfood(a, cov=shrunk(stats.second_moment(centred)),
                               mean=stats.mean if centred else None, rank=rank,
                               sweeps=self.sweeps, seed=self.seed, start=start)
            shift = fit.bias_shift if centred else None
            err = output_error(a, fastfood_matrix(fit), stats, shift)
            note = f"fitted on calibration statistics: layer output error {err:.4g}"
        self._fits[key] = fit, shift, note
        return self._fits[key]

    def decompose(self, site: LayerSite, ranks, stats: LayerStats | None = None) -> Factors:
        (k,) = ranks
        t0 = time.perf_counter()
        fit, shift, note = self._fit(site, int(k), stats)
        notes = (f"Adaptive Fastfood: D={fit.dim}, {len(fit.blocks)} block(s), radix "
                 f"{self.radix}, correction rank {fit.rank}, {fit.sweeps} ALS sweeps; {note}")
        return Factors((fit, shift), fit.weight_error, time.perf_counter() - t0, notes)

    def build(self, graph: gs.Graph, site: LayerSite, factors: Factors, names: NameScope) -> None:
        fit, shift = factors.arrays
        opset = graph.opset if graph.opset is not None else MIN_OPSET
        if opset < MIN_OPSET:
            raise OnnxlrError(f"{site.name}: the Fastfood graph needs opset >= {MIN_OPSET} "
                              f"(Pad and Slice with input operands); the model has {opset}")
        lead = _lead_dims(site)
        FastfoodGraph(graph, names, f"{site.name}/fastfood", site.weight.dtype,
                      1 if lead is None else lead, self.radix).emit(site, fit, shift,
                                                                    flatten=lead is None)


class FastfoodSvdMethod(FastfoodMethod):
    """Fastfood plus a low-rank correction whose rank the rank rule picks on the residual."""

    name = "fastfood_svd"
    help = ("Adaptive Fastfood plus a least-squares low-rank correction; the rank rule "
            "picks its rank on what Fastfood misses")

    def choose_ranks(self, site: LayerSite, selector: RankSelector, multiple: int,
                     stats: LayerStats | None = None):
        reason = self._decline(site)
        if reason:
            return reason
        fit, _, _ = self._fit(site, 0, stats)
        a, centred = linear_map(site)
        resid = a - fastfood_matrix(fit)
        spectrum = (whitened_spectrum(resid, stats, centred) if stats is not None
                    else singular_values(resid))
        m, n = site.matrix.shape
        return (select_rank(selector, spectrum, m, n, multiple),)


class FastfoodGraph:
    """Emits Fastfood subgraphs into ``graph``.

    Args:
        graph, names: where the nodes go and how they are named (``prefix/part``).
        dtype: float type of the constants (the layer's weight type).
        lead: number of leading (row) axes, kept by every Reshape.
        radix: 2 for butterflies, larger for Kronecker stages.
    """

    def __init__(self, graph: gs.Graph, names: NameScope, prefix: str, dtype, lead: int,
                 radix: int = RADIX):
        self.graph, self.names, self.prefix = graph, names, prefix
        self.dtype, self.lead, self.radix = np.dtype(dtype), lead, radix
        self._hadamards: dict[int, gs.Constant] = {}

    def node(self, part: str, op: str, inputs: list, attrs: dict | None = None,
             output: gs.Variable | None = None, dtype=None) -> gs.Variable:
        return new_node(self.graph, self.names, f"{self.prefix}/{part}", op, inputs, attrs or {},
                        output, dtype or self.dtype)

    def const(self, part: str, array: np.ndarray, dtype=None) -> gs.Constant:
        return constant(self.names, f"{self.prefix}/{part}", np.asarray(array),
                        dtype or self.dtype)

    def ints(self, part: str, values) -> gs.Constant:
        return self.const(part, np.asarray(values, np.int64), np.int64)

    def reshape(self, part: str, x, tail: list[int]) -> gs.Variable:
        """Reshape keeping the leading (row) axes (``0`` copies an input dim)."""
        return self.node(part, "Reshape", [x, self.ints(f"{part}_shape", [0] * self.lead + tail)])

    def hadamard(self, part: str, x, length: int, dim: int) -> gs.Variable:
        """Unnormalised FWHT of every ``dim``-long segment of the last axis (``length`` long);
        the result has shape ``[rows…, length]``."""
        if self.radix <= 2:
            return self._butterflies(part, x, length, dim)
        return self._kronecker(part, x, length, dim)

    def _butterflies(self, part: str, x, length: int, dim: int) -> gs.Variable:
        """Stage h views the axis as [length/2h, 2, h] and maps (a, b) to (a + b, a − b)."""
        axis = self.lead + 1
        h = 1
        while h < dim:
            p = f"{part}/h{h}"
            t = self.reshape(f"{p}/view", x, [length // (2 * h), 2, h])
            a, b = (self.node(f"{p}/{half}", "Slice",
                              [t, self.ints(f"{p}/{half}_s", [i]),
                               self.ints(f"{p}/{half}_e", [i + 1]),
                               self.ints(f"{p}/{half}_ax", [axis])])
                    for i, half in enumerate("ab"))
            x = self.node(f"{p}/cat", "Concat", [self.node(f"{p}/add", "Add", [a, b]),
                                                  self.node(f"{p}/sub", "Sub", [a, b])],
                          {"axis": axis})
            h *= 2
        return self.reshape(f"{part}/flat", x, [length])

    def _kronecker(self, part: str, x, length: int, dim: int) -> gs.Variable:
        sizes = stage_sizes(dim, self.radix)
        m = len(sizes)
        x = self.reshape(f"{part}/view", x, [length // dim] + sizes)
        keep = list(range(self.lead + 1))
        rotate = keep + [self.lead + m] + list(range(self.lead + 1, self.lead + m))
        for i, r in enumerate(reversed(sizes)):  # the last axis first, then rotate it away
            p = f"{part}/stage{i}"
            if r not in self._hadamards:  # one ±1 matrix per size, shared by every stage
                self._hadamards[r] = self.const(f"H{r}", scipy.linalg.hadamard(r))
            x = self.node(f"{p}/mm", "MatMul", [x, self._hadamards[r]])
            x = self.node(f"{p}/rot", "Transpose", [x], {"perm": rotate})
        return self.reshape(f"{part}/flat", x, [length])

    def emit(self, site: LayerSite, fit: FastfoodFit, shift: np.ndarray | None,
             flatten: bool = False) -> None:
        """Replace the layer ``site`` by the fitted Fastfood (``shift``: added to its bias).

        ``flatten``: the input's rank is unknown, so it is reshaped to ``[rows, d]`` (with
        ``lead`` 1) and the result back to the input's leading dims at run time.
        """
        node = site.node
        attrs = node.attrs
        alpha = float(attrs.get("alpha", 1.0)) if site.kind == "gemm" else 1.0
        beta = float(attrs.get("beta", 1.0)) if site.kind == "gemm" else 1.0
        c = node.inputs[2] if site.kind == "gemm" and len(node.inputs) > 2 \
            and node.inputs[2].name else None
        x, y = detach(site)
        if site.kind == "gemm" and int(attrs.get("transA", 0)):
            x = self.node("input_T", "Transpose", [x], {"perm": [1, 0]})
        d, n, dim, blocks = fit.d, fit.n, fit.dim, len(fit.blocks)
        length = blocks * dim
        x_in, target = x, (None if flatten else y)
        if flatten:
            x = self.node("flat_in", "Reshape", [x, self.ints("flat_in_shape", [-1, d])])
        bmat = np.stack([blk.b[:d] for blk in fit.blocks])
        t = x
        if blocks > 1:
            t = self.reshape("blocks", t, [1, d])
        t = self.node("B", "Mul", [t, self.const("B_diag", bmat if blocks > 1 else bmat[0])])
        if dim > d:
            rank = self.lead + (2 if blocks > 1 else 1)
            pads = [0] * (2 * rank)
            pads[-1] = dim - d
            t = self.node("pad", "Pad", [t, self.ints("pads", pads)])
        t = self.hadamard("H1", t, length, dim)
        perm = np.concatenate([j * dim + blk.perm for j, blk in enumerate(fit.blocks)])
        t = self.node("perm", "Gather", [t, self.const("Pi", perm.astype(np.int32), np.int32)],
                      {"axis": self.lead})
        g = np.concatenate([blk.g for blk in fit.blocks])
        t = self.node("G", "Mul", [t, self.const("G_diag", g)])
        t = self.hadamard("H2", t, length, dim)
        if length > n:
            t = self.node("rows", "Slice", [t, self.ints("rows_s", [0]), self.ints("rows_e", [n]),
                                            self.ints("rows_ax", [self.lead])])
        scale = alpha / dim  # two unnormalised transforms: H·H = D·I
        s = np.concatenate([blk.s for blk in fit.blocks])[:n] * scale
        bias = self._bias(c, beta, alpha * shift if shift is not None else None)
        last = bias is None and fit.u is None
        t = self.node("S", "Mul", [t, self.const("S_diag", s)], output=target if last else None)
        if fit.u is not None:
            low = self.node("lr_in", "MatMul", [x, self.const("lr_Vt", fit.vt.T)])
            low = self.node("lr_out", "MatMul", [low, self.const("lr_U", alpha * fit.u.T)])
            t = self.node("lr_add", "Add", [t, low], output=target if bias is None else None)
        if bias is not None:
            t = self.node("bias", "Add", [t, bias], output=target)
        if flatten:
            shape = self.node("in_shape", "Shape", [x_in], dtype=np.int64)
            rows = self.node("rows_shape", "Slice", [shape, self.ints("rs_s", [0]),
                                                     self.ints("rs_e", [-1]),
                                                     self.ints("rs_ax", [0])], dtype=np.int64)
            out_shape = self.node("out_shape", "Concat", [rows, self.ints("out_n", [n])],
                                  {"axis": 0}, dtype=np.int64)
            self.node("unflat", "Reshape", [t, out_shape], output=y)

    def _bias(self, c, beta: float, shift: np.ndarray | None):
        """What to add last: β·C plus the fitted shift, folded when C is a constant."""
        value = constant_value(c) if c is not None else None
        if c is None:
            return None if shift is None else self.const("bias_shift", shift)
        if value is not None:
            total = beta * value.astype(np.float64) + (0.0 if shift is None else shift)
            return self.const("bias", total)
        if beta != 1.0:  # a computed C: scale it at run time (no shift: linear_map said so)
            return self.node("beta_C", "Mul", [c, self.const("beta", np.asarray(beta))])
        return c
