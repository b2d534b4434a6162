"""Fitting Adaptive Fastfood blocks (and an optional low-rank correction) to a dense
weight by alternating least squares, under the input covariance; the starts, the
weighting and the solves. :mod:`onnxlr.linalg.fastfood` gives the math and the measured
reasons for the structural start."""
from __future__ import annotations

import functools
import logging
import math
import time

import numpy as np
import scipy.linalg

from onnxlr.linalg.fastfood.structure import (FastfoodBlock, FastfoodFit, _hadamard_rows,
                                              fastfood_matrix, fwht, next_pow2, permutations)
from onnxlr.linalg.svd import as_float64, truncated_svd
from onnxlr.linalg.whiten import whitener

logger = logging.getLogger(__name__)

#: A structural start is refined only if it already explains this much (relative error below).
STRUCTURAL_KEEP = 0.5
#: Largest padded input size the fit accepts: it holds a few ``D × D`` float64 matrices.
MAX_DIM = 4096


@functools.lru_cache(maxsize=2)
def _xor_table(dim: int) -> np.ndarray:
    """``k ⊕ l`` for all index pairs (read-only, shared by the blocks of a fit)."""
    table = np.bitwise_xor.outer(np.arange(dim, dtype=np.int32), np.arange(dim, dtype=np.int32))
    table.flags.writeable = False
    return table


class _Weighting:
    """The input covariance Σ (D × D, zero on padded inputs), kept as a vector if diagonal."""

    def __init__(self, dim: int, d: int, cov: np.ndarray | None):
        self.diag: np.ndarray | None = None
        self.dense: np.ndarray | None = None
        if cov is None:
            self.diag = np.zeros(dim)
            self.diag[:d] = 1.0
        elif not np.any(cov - np.diag(np.diag(cov))):
            self.diag = np.zeros(dim)
            self.diag[:d] = np.diag(cov)
        else:
            self.dense = np.zeros((dim, dim))
            self.dense[:d, :d] = cov

    def right(self, x: np.ndarray) -> np.ndarray:
        """``x @ Σ``."""
        return x * self.diag if self.dense is None else x @ self.dense


def _solve(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Ridge-stabilised SPD solve (padded inputs make ``q`` singular)."""
    ridge = 1e-10 * max(float(np.trace(q)) / len(r), 1e-300)
    q = q + ridge * np.eye(len(r))
    try:
        return scipy.linalg.solve(q, r, assume_a="pos")
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(q, r, rcond=None)[0]


def _unit_rms(v: np.ndarray) -> np.ndarray:
    rms = math.sqrt(float(np.mean(v * v)))
    return v / rms if rms > 0 else v


class _BlockFit:
    """ALS for one block against its rows ``w`` (n_b × D) of the padded weight.

    With a dense Σ every ``D × D`` product is formed through transforms, never as a
    ``D³`` matrix product: ``P Σ Pᵀ`` (``P = Π H B``) serves the S step and the next G step,
    and ``MᵀM = H Πᵀ (G A G) Π H`` with the dyadic ``A = Hₙᵀ S² Hₙ`` serves the B step.
    """

    def __init__(self, w: np.ndarray, sigma: _Weighting, perm: np.ndarray, rng):
        self.w, self.sigma, self.perm = w, sigma, perm
        self.dim = w.shape[1]
        self.inv = np.argsort(perm)
        self.hn = _hadamard_rows(self.dim, w.shape[0])
        self.ws = sigma.right(w)                       # W Σ, fixed
        self.wsw = float(np.sum(self.ws * w))          # tr(W Σ Wᵀ)
        self.xor = _xor_table(self.dim)
        self.g = rng.standard_normal(self.dim)
        self.s = np.zeros(w.shape[0])
        self.set_b(rng.choice([-1.0, 1.0], self.dim))
        self.error = self._fit_s()

    def set(self, s: np.ndarray, g: np.ndarray, b: np.ndarray) -> None:
        """Start from given diagonals: G is refitted for them, then S."""
        self.s, self.g = np.array(s, np.float64), np.array(g, np.float64)
        self.set_b(np.array(b, np.float64))
        self._fit_g()
        self.error = self._fit_s()

    def set_b(self, b: np.ndarray) -> None:
        self.b = b
        if self.sigma.dense is None:                   # Π (H B Σ B H) Πᵀ
            psp = self._dyadic(b ** 2 * self.sigma.diag)
        else:
            psp = self._both(b[:, None] * self.sigma.dense * b[None, :])
        self.psp = psp[np.ix_(self.perm, self.perm)]

    def _hfwht(self, x: np.ndarray) -> np.ndarray:
        return fwht(x, axis=1) / math.sqrt(self.dim)

    def _both(self, x: np.ndarray) -> np.ndarray:
        """``H X H`` for a symmetric ``X`` (orthonormal H)."""
        return self._hfwht(self._hfwht(x).T)

    def _dyadic(self, v: np.ndarray) -> np.ndarray:
        """``H diag(v) H`` (orthonormal H): entry (k, l) is ``fwht(v)[k ⊕ l] / D``."""
        return (fwht(v) / self.dim)[self.xor]

    def _fit_s(self) -> float:
        """Exact S step; returns the relative Σ-weighted error after it."""
        f = self._hfwht((self.hn * self.g)[:, self.inv]) * self.b     # rows H G Π H B
        num = np.sum(f * self.ws, axis=1)
        if self.sigma.dense is None:
            den = np.sum(f * f * self.sigma.diag, axis=1)
        else:  # f_i Σ f_iᵀ = h_i (G P Σ Pᵀ G) h_iᵀ
            gpg = self.g[:, None] * self.psp * self.g[None, :]
            hn_gpg = fwht(gpg, axis=0)[:self.s.size] / math.sqrt(self.dim)
            den = np.sum(hn_gpg * self.hn, axis=1)
        ok = den > 1e-300 * max(self.wsw, 1e-300)
        self.s = np.where(ok, num / np.where(ok, den, 1.0), 0.0)
        resid = self.wsw - float(np.sum(np.where(ok, num * self.s, 0.0)))
        return math.sqrt(max(resid, 0.0) / self.wsw) if self.wsw > 0 else 0.0

    def _fit_g(self) -> None:
        a = self._dyadic(np.pad(self.s ** 2, (0, self.dim - self.s.size)))
        z = self._hfwht(self.ws * self.b)[:, self.perm]                 # rows of (P Σ Wᵀ)ᵀ
        r = np.sum(self.hn * self.s[:, None] * z, axis=0)
        self.g = _solve(a * self.psp, r)

    def _fit_b(self) -> None:
        m = self._hfwht(((self.hn * self.s[:, None]) * self.g)[:, self.inv])   # S Hₙ G Π H
        r = np.sum(m * self.ws, axis=0)
        if self.sigma.dense is None:
            q = self.sigma.diag * np.sum(m * m, axis=0)
            ok = q > 1e-12 * max(float(q.max()), 1e-300)
            b = np.where(ok, r / np.where(ok, q, 1.0), 0.0)
        else:
            a = self._dyadic(np.pad(self.s ** 2, (0, self.dim - self.s.size)))
            mtm = self._both((self.g[:, None] * a * self.g[None, :])[np.ix_(self.inv, self.inv)])
            b = _solve(mtm * self.sigma.dense, r)
        self.set_b(_unit_rms(b))

    def sweep(self) -> float:
        # G and B are kept at unit RMS (the next step absorbs the scale), so they cannot drift
        self._fit_g()
        self.g = _unit_rms(self.g)
        self._fit_b()
        self.error = self._fit_s()
        return self.error

    def block(self) -> FastfoodBlock:
        return FastfoodBlock(self.s.copy(), self.g.copy(), self.b.copy(), self.perm.copy())


def _sinkhorn(a: np.ndarray, iters: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Positive ``r, c`` with ``diag(r) a diag(c)`` of equal row sums and equal column sums."""
    r, c = np.ones(a.shape[0]), np.ones(a.shape[1])
    for _ in range(iters):
        r = a.shape[1] / np.maximum(a @ c, 1e-300)
        c = a.shape[0] / np.maximum(a.T @ r, 1e-300)
    return r, c


def _dyadic_signs(c: np.ndarray) -> np.ndarray:
    """Signs ``ε`` (ε₀ = 1) with ``c[i, i⊕a] = ε_i ε_{i⊕a} t_a`` read along the bits ``a = 2^m``."""
    eps = np.ones(c.shape[0])
    a = 1
    while a < c.shape[0]:
        j = np.arange(a)                      # j < a, so j ⊕ a = j + a
        eps[j + a] = eps[j] * np.where(c[j, j + a] < 0, -1.0, 1.0)
        a *= 2
    return eps


def _structural_start(w: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(s, b)`` read off a square block that is exactly Fastfood (None if not square).

    For ``W = S K B`` with ``K = H G Π H``: K has equal row norms and equal column norms, so
    matrix balancing of ``W∘W`` gives ``|s|`` and ``|b|``; ``K Kᵀ = H G² H`` and ``Kᵀ K`` are
    dyadic (XOR-)Toeplitz, which fixes the signs up to a Walsh function each; the Walsh pair
    is the one that makes ``H S⁻¹ W B⁻¹ H = G Π`` a scaled permutation on Π's known support.
    On a layer that is not Fastfood this is just another starting point for the ALS.
    """
    dim = w.shape[1]
    if w.shape[0] != dim or not np.all(np.isfinite(w)) or not np.any(w):
        return None
    r, c = _sinkhorn(w * w)
    s_abs, b_abs = 1 / np.sqrt(r), 1 / np.sqrt(c)
    v = w / s_abs[:, None] / b_abs
    eps, delta = _dyadic_signs(v @ v.T), _dyadic_signs(v.T @ v)
    cols = np.argmax(np.abs(fwht(fwht(eps[:, None] * v * delta, axis=1), axis=0)), axis=1)
    idx = np.arange(dim)
    shifts = np.arange(dim)
    # row i of G·Π sits at column perm[i ⊕ c] ⊕ e: try every row shift c, e follows from row 0
    hits = [np.count_nonzero((perm[idx ^ c] ^ cols[0] ^ perm[c]) == cols) for c in shifts]
    c = int(np.argmax(hits))
    e = int(cols[0] ^ perm[c])
    walsh = scipy.linalg.hadamard(dim)
    return s_abs * eps * walsh[c], b_abs * delta * walsh[e]


def _run(f: _BlockFit, sweeps: int, tol: float) -> int:
    """ALS sweeps until the relative error improves by less than ``tol``; returns sweeps run."""
    done = 0
    for done in range(1, sweeps + 1):
        before = f.error
        if before - f.sweep() <= tol * max(f.error, 1e-300):
            break
    return done


def _fit_blocks(w: np.ndarray, sigma: _Weighting, perms, rng, sweeps: int, tol: float,
                starts: list[FastfoodBlock] | None) -> tuple[list[FastfoodBlock], float, int]:
    """ALS on every block from a random start (and a structural one for square blocks), or
    from ``starts``; keeps each block's best. Returns blocks, layer error, most sweeps run."""
    dim = w.shape[1]
    best, most = [], 0
    for j, perm in enumerate(perms):
        rows = w[j * dim:(j + 1) * dim]
        tries = [_BlockFit(rows, sigma, perm, rng)]
        if starts is not None:
            tries[0].set(starts[j].s, starts[j].g, starts[j].b)
        else:
            sb = _structural_start(rows, perm)
            if sb is not None:
                f = _BlockFit(rows, sigma, perm, rng)
                f.set(sb[0], np.ones(dim), sb[1])
                if f.error < STRUCTURAL_KEEP:  # on a layer that is not Fastfood it starts near 1
                    tries.append(f)
        for f in tries:
            most = max(most, _run(f, sweeps, tol))
        best.append(min(tries, key=lambda f: f.error))
    total = sum(f.wsw for f in best)
    error = math.sqrt(sum(f.error ** 2 * f.wsw for f in best) / total) if total > 0 else 0.0
    return [f.block() for f in best], error, most


def _weighted_lowrank(r: np.ndarray, cov: np.ndarray | None, rank: int):
    """Best rank-``rank`` ``U Vᵗ`` minimising ``tr((R − U Vᵗ) Σ (R − U Vᵗ)ᵀ)``: the truncated
    SVD of the whitened residual ``R L`` mapped back by ``L⁺`` (``Σ = L Lᵀ``)."""
    if cov is None:
        return truncated_svd(r, rank)
    wh = whitener(cov)
    u, vt = truncated_svd(r @ wh.factor, min(rank, wh.factor.shape[1]))
    return u, vt @ wh.inverse


def fit_fastfood(w: np.ndarray, *, cov: np.ndarray | None = None, mean: np.ndarray | None = None,
                 rank: int = 0, sweeps: int = 100, tol: float = 1e-4, rounds: int = 2,
                 seed: int = 0, start: FastfoodFit | None = None) -> FastfoodFit:
    """Fit Adaptive Fastfood (plus an optional rank-``rank`` correction) to ``W`` (n × d).

    Args:
        w: the layer as ``y = W x`` (``n × d``).
        cov: input second moment (``d × d``, or a ``d`` vector for a diagonal one); None means
            Σ = I, i.e. match ``W`` in Frobenius norm (isotropic Gaussian inputs).
        mean: input mean (``d``): ``bias_shift`` then keeps the mean output exact (pass the
            centred covariance as ``cov``).
        rank: rank of the low-rank correction (0: plain Fastfood).
        sweeps: most ALS sweeps (G, B, S) per block and fit.
        tol: stop when a sweep improves the relative error by less than this fraction.
        rounds: alternations between the Fastfood fit and the correction (rank > 0).
        seed: seeds the permutations Π and the random start (B = ±1, G Gaussian).
        start: an earlier fit of the same layer and seed (e.g. without correction) to
            continue from instead of starting afresh.

    Raises:
        ValueError: the padded input size is over :data:`MAX_DIM`.
    """
    t0 = time.perf_counter()
    w = as_float64(w, 2)
    n, d = w.shape
    dim = next_pow2(d)
    if dim > MAX_DIM:
        raise ValueError(f"padded input size {dim} is over the fit's limit {MAX_DIM}")
    if cov is not None:
        cov = as_float64(cov, what="input covariance")
        cov = np.diag(cov) if cov.ndim == 1 else (cov + cov.T) / 2
    sigma = _Weighting(dim, d, cov)
    wp = np.zeros((n, dim))
    wp[:, :d] = w
    perms = permutations(-(-n // dim), dim, seed)
    rng = np.random.default_rng([seed, 1])
    rank = max(0, min(int(rank), n, d))
    if start is not None and (start.dim, start.n, len(start.blocks)) != (dim, n, len(perms)):
        raise ValueError("start is a fit of a layer of another shape")
    blocks, _, done = _fit_blocks(wp, sigma, perms, rng, sweeps, tol,
                                  start.blocks if start is not None else None)
    fit = FastfoodFit(blocks, dim, d, n, np.zeros(n))
    for _ in range(rounds if rank else 0):
        fit.u, fit.vt = _weighted_lowrank(w - fastfood_matrix(fit, correction=False), cov, rank)
        target = wp.copy()
        target[:, :d] -= fit.u @ fit.vt
        fit.blocks, _, more = _fit_blocks(target, sigma, perms, rng, sweeps, tol, fit.blocks)
        done += more
    if rank:  # the correction last, so that it is optimal for the final Fastfood part
        fit.u, fit.vt = _weighted_lowrank(w - fastfood_matrix(fit, correction=False), cov, rank)
    diff = fastfood_matrix(fit) - w
    fit.weight_error = float(np.linalg.norm(diff) / max(np.linalg.norm(w), 1e-300))
    spread = float(np.sum(sigma.right(wp)[:, :d] * w))
    resid = float(np.sum(sigma.right(np.pad(diff, ((0, 0), (0, dim - d))))[:, :d] * diff))
    fit.output_error = math.sqrt(max(resid, 0.0) / spread) if spread > 0 else 0.0
    if mean is not None:
        fit.bias_shift = -(diff @ as_float64(mean, 1, "input mean"))
    fit.sweeps, fit.seconds = done, time.perf_counter() - t0
    logger.debug("fastfood %dx%d: D=%d, %d blocks, rank %d, error %.4f after %d sweeps (%.2fs)",
                 n, d, dim, len(perms), rank, fit.output_error, done, fit.seconds)
    return fit
