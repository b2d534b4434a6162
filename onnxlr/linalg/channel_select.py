r"""Which input channels of a layer to keep, and the weights that make up for the rest.

Channel pruning, He et al., "Channel Pruning for Accelerating Very Deep Neural
Networks", ICCV 2017 (arXiv 1707.06168). A consumer layer computes at each
sampled position (one row) ``y = Σ_c W_c x_c``, where ``x_c`` holds the K values
channel c contributes (a k×k patch for a conv, the H·W block of a Gemm after a
Flatten, one value for a Gemm) and ``W_c`` is N × K. Keeping c' channels:

    min_{β, W} ‖Y − Σ_c β_c X_c W_cᵀ‖²   s.t. ‖β‖₀ ≤ c'

He et al. relax ‖β‖₀ to λ‖β‖₁ and solve the LASSO in β with W fixed, raising λ
until c' channels are left (their §3.2 "apply (i) until ‖β‖₀ satisfies, then (ii)
once"), then solve W by least squares on the kept channels.

Everything here works from second moments of the rows (:class:`PatchStats`,
F = C·K features), never from the rows themselves: memory is O(F²) whatever the
number of calibration positions, and the LASSO is in Gram form (C × C). With
``x̃`` the input of the model pruned so far and ``x`` the original's (He et al.
feed the pruned model's features to fight accumulated error), the target is
``Y = X Wᵀ`` (original input, original weights) and the fit uses ``X̃``.

What is added to the paper, and why:

1. Channels that are zero, or linear combinations of other channels (the same
   coefficients at every position), cost nothing to remove: least squares on the
   rest reproduces Y exactly. The LASSO in β cannot see this (β scales a
   channel's whole contribution; it cannot move it onto another channel), so a
   pivoted Cholesky of the channel Gram (LAPACK ``dpstrf``) removes them first.
2. Before the LASSO, W is refit by least squares on the remaining channels (the
   paper's step (ii) at λ = 0), so that the contributions sum to Y.
3. An intercept: the consumer's bias absorbs the mean of what removed channels
   contributed (ReLU outputs have non-zero means). With zero padding this is
   exact away from the border.
4. Exact count: λ descends from λ_max (every β zero) on a geometric grid, warm
   started, until ≥ c' coefficients are non-zero, then bisects λ; if no λ gives
   exactly c' (ties), the c' largest |β_c|·‖Z_c‖ are kept.

Why not scikit-learn's ``Lasso``: scikit-learn is not a dependency, and in Gram
form the problem has only C ≤ a few thousand variables. It is solved by FISTA
(accelerated proximal gradient, vectorised: one C×C product per iteration)
rather than coordinate descent, whose per-coordinate Python loop was 17-80×
slower here (C = 64: 1.0 s vs 0.06 s; C = 256: 5.6 s vs 0.07 s, same support).

The LASSO solver (FISTA, and the λ path to an exact count) is :mod:`onnxlr.linalg.lasso`.
Also here: the L1-norm filter criterion (Li et al. 2017, arXiv 1608.08710), the
data-free baseline. Rows come from :func:`onnxlr.activations.site_rows` (im2col).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from scipy.linalg import blas, lapack

from onnxlr.linalg.lasso import lasso_gram, lasso_select  # noqa: F401 (public here too)

logger = logging.getLogger(__name__)

__all__ = ["ChannelSelection", "PatchStats", "dependent_channels", "lasso_gram", "lasso_select",
           "norm_select", "refit", "select_channels"]

#: a channel whose mean square is below this fraction of the largest carries nothing
ZERO_TOL = 1e-12
#: squared sine of the angle between a channel and the span of the others below which it is
#: a linear combination of them (pivoted Cholesky stops there)
DEPENDENT_TOL = 1e-9
#: relative ridge added to the least-squares normal equations (numerical safety only)
RIDGE = 1e-9
#: relative ridge when there are fewer rows than unknowns (the fit would interpolate them)
UNDERDETERMINED_RIDGE = 1e-3


class PatchStats:
    """Sums over rows of a consumer's input, as (F, F) float64 matrices with F = C·K.

    Features are channel-major (feature ``c·K + a`` is offset a of channel c), the
    order of ``W.reshape(N, C, K)``. ``x̃`` is the input of the model being pruned,
    ``x`` the original model's input at the same positions; when they are the same
    (nothing upstream changed) the three Grams are one array. Rows are accumulated
    with one symmetric rank-k update (BLAS ``syrk``) of ``[x̃, x]`` per batch.

    Attributes (after the first :meth:`add`):
        h: Σ x̃ x̃ᵀ.   cross: Σ x̃ xᵀ.   h_orig: Σ x xᵀ.
        sum, sum_orig: Σ x̃, Σ x.   count: rows.   channels, group: C and K.
    """

    def __init__(self, channels: int, group: int):
        self.channels, self.group = int(channels), int(group)
        self.count = 0
        self.same = True
        self._upper: np.ndarray | None = None   # upper triangle of Σ z zᵀ, z = [x̃, x]
        self._sum: np.ndarray | None = None
        self._full: np.ndarray | None = None

    def add(self, x: np.ndarray, x_orig: np.ndarray | None = None) -> None:
        """Accumulate rows: ``x`` (P, C, K) or (P, C·K); ``x_orig`` the original's, or None."""
        f = self.channels * self.group
        z = np.asarray(x, np.float64).reshape(-1, f)
        if self._upper is None:
            self.same = x_orig is None
        if (x_orig is None) != self.same:
            raise ValueError("PatchStats: every batch must have x_orig, or none")
        if not self.same:
            z = np.concatenate([z, np.asarray(x_orig, np.float64).reshape(-1, f)], axis=1)
        z = np.asfortranarray(z)
        if self._upper is None:
            self._upper, self._sum = np.zeros((z.shape[1],) * 2, order="F"), np.zeros(z.shape[1])
        self._upper = blas.dsyrk(1.0, z, beta=1.0, c=self._upper, trans=1, lower=0,
                                 overwrite_c=1)
        self._sum += z.sum(axis=0)
        self.count += z.shape[0]
        self._full = None

    def _gram(self) -> np.ndarray:
        if self._full is None:
            if self._upper is None:
                raise ValueError("PatchStats: no rows were added")
            u = self._upper
            self._full = np.triu(u) + np.triu(u, 1).T
        return self._full

    @property
    def h(self) -> np.ndarray:
        f = self.channels * self.group
        return self._gram()[:f, :f]

    @property
    def cross(self) -> np.ndarray:
        f = self.channels * self.group
        return self.h if self.same else self._gram()[:f, f:]

    @property
    def h_orig(self) -> np.ndarray:
        f = self.channels * self.group
        return self.h if self.same else self._gram()[f:, f:]

    @property
    def sum(self) -> np.ndarray:
        return self._sum[:self.channels * self.group]

    @property
    def sum_orig(self) -> np.ndarray:
        return self.sum if self.same else self._sum[self.channels * self.group:]

    @classmethod
    def from_rows(cls, x: np.ndarray, x_orig: np.ndarray | None = None) -> PatchStats:
        """Stats of (P, C, K) rows in one go."""
        x = np.asarray(x)
        stats = cls(x.shape[1], int(np.prod(x.shape[2:], dtype=int)) if x.ndim > 2 else 1)
        stats.add(x, x_orig)
        return stats

    def moments(self, centered: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(H̃, cross, H) as sums, centred on the means when ``centered``."""
        h, cross, ho = self.h, self.cross, self.h_orig
        if not centered:
            return h, cross, ho
        n, mu, mo = self.count, self.mean, self.mean_orig
        hc = h - n * np.outer(mu, mu)
        if self.same:
            return hc, hc, hc
        return hc, cross - n * np.outer(mu, mo), ho - n * np.outer(mo, mo)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def mean_orig(self) -> np.ndarray:
        return self.mean if self.same else self.sum_orig / max(self.count, 1)

    def channel_gram(self) -> np.ndarray:
        """(C, C) uncentred Gram of the channels, each channel's K values stacked into one vector."""
        c, k = self.channels, self.group
        return np.einsum("akbk->ab", self.h.reshape(c, k, c, k))


@dataclass
class ChannelSelection:
    """The kept channels and the consumer weights refit on them.

    Attributes:
        kept: sorted indices of the kept input channels.
        weight: (N, len(kept), K) float64 consumer weights for the kept channels.
        bias_delta: (N,) to add to the consumer's bias (zeros without an intercept).
        error: relative L2 error of the consumer's output on the calibration rows.
        removed_free: channels removed because they were zero or linearly dependent.
        lam: the LASSO λ that gave the support (None when no LASSO was needed).
        notes: what happened, for the report.
    """

    kept: np.ndarray
    weight: np.ndarray
    bias_delta: np.ndarray
    error: float
    removed_free: list[int] = field(default_factory=list)
    lam: float | None = None
    notes: str = ""


def _features(kept: np.ndarray, group: int) -> np.ndarray:
    return (np.asarray(kept)[:, None] * group + np.arange(group)[None, :]).ravel()


def dependent_channels(gram: np.ndarray, tol: float = DEPENDENT_TOL
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split channels into (independent, dependent, zero) by pivoted Cholesky of their Gram.

    The Gram is normalised to unit diagonal, so the pivots are squared sines of the
    angle between a channel and the span of those picked before; channels left when
    the pivot falls below ``tol`` are linear combinations of the independent ones.

    Returns:
        independent channels (pivot order), dependent channels, zero channels.
    """
    gram = np.asarray(gram, np.float64)
    d = np.diag(gram).copy()
    zero = np.flatnonzero(d <= ZERO_TOL * max(d.max(initial=0.0), np.finfo(float).tiny))
    live = np.setdiff1d(np.arange(len(d)), zero)
    if live.size == 0:
        return live, live, zero
    s = 1.0 / np.sqrt(d[live])
    g = gram[np.ix_(live, live)] * s[:, None] * s[None, :]
    _, piv, rank, info = lapack.dpstrf(g, tol=tol, lower=1)
    if info < 0:
        raise ValueError(f"dpstrf: argument {-info} is invalid")
    order = live[piv - 1]
    return order[:rank], order[rank:], zero


def refit(stats: PatchStats, weight: np.ndarray, kept: np.ndarray, *, intercept: bool = True,
          ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares consumer weights on the kept channels (He et al.'s step (ii)).

    Solves ``min_W' ‖X Wᵀ − X̃_S W'ᵀ − δ‖²`` from the moments: the normal equations
    ``H̃_SS W'ᵀ = cross_S Wᵀ`` (centred when ``intercept``; δ then matches the means).

    Args:
        stats: moments of the consumer's input rows.
        weight: (N, C, K) original consumer weights (as the layer applies them).
        kept: channel indices to keep.

    Returns:
        (W' of shape (N, len(kept), K), bias delta (N,), relative output error).
    """
    n, c, k = weight.shape
    wf = np.asarray(weight, np.float64).reshape(n, c * k)
    kept = np.asarray(kept, dtype=int)
    idx = _features(kept, k)
    hc, crossc, hoc = stats.moments(intercept)
    if stats.count < len(idx):
        ridge = max(ridge, UNDERDETERMINED_RIDGE)
    a = hc[np.ix_(idx, idx)]
    rhs = crossc[idx] @ wf.T
    scale = np.trace(a) / max(len(idx), 1)
    ridged = a + (ridge * scale if scale > 0 else ridge) * np.eye(len(idx))
    try:
        sol = scipy.linalg.solve(ridged, rhs, assume_a="pos") if len(idx) else np.zeros((0, n))
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        sol = scipy.linalg.lstsq(ridged, rhs, cond=1e-12)[0]
    w_new = sol.T
    if intercept:
        delta = stats.mean_orig @ wf.T - stats.mean[idx] @ w_new.T
    else:
        delta = np.zeros(n)
    # ‖Y − Ŷ‖² = ‖Y‖² − 2⟨Y, Ŷ⟩ + ‖Ŷ‖², each from the (centred) moments
    resid = (np.einsum("ij,ij->", wf @ hoc, wf) - 2 * np.einsum("ij,ij->", w_new, rhs.T)
             + np.einsum("ij,ij->", w_new @ a, w_new))
    total = np.einsum("ij,ij->", wf @ stats.moments(False)[2], wf)
    error = float(np.sqrt(max(resid, 0.0) / total)) if total > 0 else 0.0
    return w_new.reshape(n, len(kept), k), delta, error


def contribution_gram(stats: PatchStats, w_fit: np.ndarray, cand: np.ndarray, weight: np.ndarray,
                      *, centered: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Gram of the per-channel contributions ``Z_c = X̃_c W_fit,cᵀ`` and their products with Y.

    ``G[c, d] = ⟨Z_c, Z_d⟩`` and ``b[c] = ⟨Z_c, Y⟩`` with ``Y = X Wᵀ``: the LASSO
    ``½βᵀGβ − bᵀβ + λ‖β‖₁`` is He et al.'s problem (i) up to a constant.
    """
    n, c, k = weight.shape
    m = len(cand)
    idx = _features(cand, k)
    hc, crossc, _ = stats.moments(centered)
    wfit = np.asarray(w_fit, np.float64).reshape(n, m * k)
    g = (hc[np.ix_(idx, idx)] * (wfit.T @ wfit)).reshape(m, k, m, k).sum(axis=(1, 3))
    mixed = wfit.T @ np.asarray(weight, np.float64).reshape(n, c * k)
    b = (crossc[idx] * mixed).sum(axis=1).reshape(m, k).sum(axis=1)
    return g, b


def select_channels(stats: PatchStats, weight: np.ndarray, keep: int, *, intercept: bool = True,
                    ridge: float = RIDGE, dependent_tol: float = DEPENDENT_TOL) -> ChannelSelection:
    """He et al.'s channel selection and reconstruction, with the additions listed above.

    Args:
        stats: moments of the consumer's input rows (C channels of K values).
        weight: (N, C, K) consumer weights as the layer applies them.
        keep: number of channels to keep, 1 ≤ keep ≤ C.
        intercept: let the consumer's bias absorb the removed channels' means.

    Returns:
        The kept channels, the refit weights and bias change, and the output error.
    """
    c = stats.channels
    if not 1 <= keep <= c:
        raise ValueError(f"keep must be in [1, {c}], got {keep}")
    independent, dependent, zero = dependent_channels(stats.channel_gram(), dependent_tol)
    free = [int(z) for z in zero] + [int(d) for d in dependent]
    lam, notes = None, ""
    if c - keep <= len(free):
        removed = free[:c - keep]
        kept = np.setdiff1d(np.arange(c), removed)
        notes = f"{len(removed)} channel(s) removed at no cost (zero or linearly dependent)"
    else:
        removed = free
        cand = np.sort(independent)
        w_fit, _, _ = refit(stats, weight, cand, intercept=intercept, ridge=ridge)
        g, b = contribution_gram(stats, w_fit, cand, weight, centered=intercept)
        support, _, lam = lasso_select(g, b, keep)
        kept = cand[support]
        if free:
            notes = f"{len(free)} zero or linearly dependent channel(s) removed first; "
        notes += f"LASSO λ = {lam:.4g} kept {keep} of {len(cand)}"
    w_new, delta, error = refit(stats, weight, kept, intercept=intercept, ridge=ridge)
    return ChannelSelection(np.sort(kept), w_new, delta, error, sorted(removed), lam, notes)


def norm_select(rows: np.ndarray, keep: int, ord: int = 1) -> np.ndarray:
    """The ``keep`` rows with the largest L``ord`` norm, sorted: the data-free filter
    criterion of Li et al., "Pruning Filters for Efficient ConvNets" (arXiv 1608.08710)."""
    rows = np.asarray(rows, np.float64).reshape(len(rows), -1)
    norms = np.linalg.norm(rows, ord=ord, axis=1)
    return np.sort(np.argsort(-norms, kind="stable")[:keep])
