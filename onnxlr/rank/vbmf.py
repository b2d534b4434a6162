r"""Rank selection by empirical variational Bayesian matrix factorisation (EVBMF).

Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of
fully-observed variational Bayesian matrix factorization", JMLR 14 (2013),
give the exact EVB solution of :math:`Y = BA^\top + E` for an :math:`L \times M`
matrix (:math:`L \le M`, :math:`\alpha = L/M`) with Gaussian noise of variance
:math:`\sigma^2`, from the singular values :math:`\gamma_1 \ge \dots \ge \gamma_L`
of :math:`Y` alone. Kim et al., "Compression of deep convolutional neural
networks for fast and low power mobile applications" (arXiv:1511.06530) use
the number of components it keeps as the Tucker rank of each unfolding.

With :math:`x_h = \gamma_h^2 / (M\sigma^2)`:

* Threshold. Component :math:`h` survives iff
  :math:`\gamma_h > \underline\gamma = \sqrt{M\sigma^2\,\underline x}`,
  :math:`\underline x = (1+\underline\tau)(1+\alpha/\underline\tau)`, where
  :math:`\underline\tau` is the zero of the decreasing function
  :math:`\Xi(\tau;\alpha) = \Phi(\tau) + \Phi(\tau/\alpha)`,
  :math:`\Phi(z) = \log(1+z)/z - 1/2`. Often approximated by
  :math:`\underline\tau \approx 2.5129\sqrt\alpha` (exact at :math:`\alpha = 1`);
  we solve for the exact zero, which keeps the free energy continuous.
* Posterior singular values of the kept components:
  :math:`\hat\gamma_h = \frac{\gamma_h}{2}\bigl(1 - \frac{(L+M)\sigma^2}{\gamma_h^2}
  + \sqrt{(1 - \frac{(L+M)\sigma^2}{\gamma_h^2})^2 - \frac{4LM\sigma^4}{\gamma_h^4}}\bigr)`.
* Noise variance. :math:`\hat\sigma^2` minimises, up to constants, the free energy

  .. math::

     \Omega(\sigma^2) = \sum_{h=1}^{L} \Bigl(\frac{\gamma_h^2}{M\sigma^2} + \log\sigma^2\Bigr)
       + \sum_{h:\,x_h > \underline x} \psi_1(x_h), \qquad
     \psi_1(x) = \log(\tau+1) + \alpha\log(\tau/\alpha + 1) - \tau,

  :math:`\tau(x) = \tfrac12\bigl(x-(1+\alpha)+\sqrt{(x-(1+\alpha))^2-4\alpha}\bigr)`,
  over :math:`[\underline\sigma^2, \overline\sigma^2]` with
  :math:`\overline\sigma^2 = \sum_h \gamma_h^2/(LM)` and
  :math:`\underline\sigma^2 = \max\bigl(\gamma_{\bar H+1}^2/(M\underline x),\,
  \sum_{h>\bar H}\gamma_h^2/(M(L-\bar H))\bigr)`,
  :math:`\bar H = \lceil L/(1+\alpha)\rceil - 1`.

Scale invariance: :math:`\Omega` is invariant under :math:`\gamma \to c\gamma,
\sigma^2 \to c^2\sigma^2` up to a constant, but the widely copied reference code
(CasvandenBogaard/VBMF) runs a bounded Brent search with an *absolute*
tolerance on a non-convex :math:`\Omega`, so its rank depends on the units of
the weights. Here the spectrum is first divided by
:math:`\sqrt{\sum\gamma_h^2/(LM)}` (so :math:`\overline\sigma^2 = 1`), and
:math:`\Omega` is minimised in :math:`\log\sigma^2` by a dense grid over the
whole admissible interval followed by bounded refinement of the best local
minima; the result is mapped back to the input's units. Singular values at
or below the rank tolerance :math:`\gamma_1 M \epsilon` are SVD round-off and
are taken as exact zeros, so an exactly low-rank matrix gets its rank.

Rank range: since :math:`\underline\sigma^2 \ge \gamma_{\bar H+1}^2/(M\underline x)`,
the EVB rank never exceeds :math:`\bar H < L` (about :math:`L/2` for a square
matrix). It is 0 when nothing stands out of the noise, and always 0 when
:math:`\bar H = 0` (a vector, :math:`L = 1`, or a 2×2 matrix); callers treat a
mode of dimension 1 as unfactorised.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from onnxlr.errors import OnnxlrError

logger = logging.getLogger(__name__)

# Grid points over [log lower, log upper]; Omega is piecewise smooth with one
# kink per component crossing the threshold, so a dense grid finds the basin
# of the global minimum and the refinement only polishes it.
_GRID_POINTS = 1024
# Number of lowest grid local minima refined by bounded Brent search.
_REFINE_CANDIDATES = 4


@dataclass(frozen=True)
class EvbmfResult:
    """EVBMF solution for one matrix.

    Attributes:
        rank: number of components above the EVB threshold, in ``[0, rank_bound]``.
        sigma2: estimated noise variance per entry, in the (squared) units of the input.
        threshold: EVB threshold on singular values, in the units of the input;
            ``rank == sum(s > threshold)``.
        posterior: EVB posterior singular values of the kept components (shrunk
            towards 0), shape ``(rank,)``, descending.
        rank_bound: largest rank EVBMF can return for this shape,
            ``ceil(L / (1 + alpha)) - 1``.
    """

    rank: int
    sigma2: float
    threshold: float
    posterior: np.ndarray
    rank_bound: int


@functools.lru_cache(maxsize=256)
def _tau_bar(alpha: float) -> float:
    r"""Zero of :math:`\Xi(\tau;\alpha)`; about :math:`2.5129\sqrt\alpha`."""

    def xi(tau: float) -> float:
        return math.log1p(tau) / tau + math.log1p(tau / alpha) / (tau / alpha) - 1.0

    # Xi -> 1 as tau -> 0 and -> -1 as tau -> inf, and is decreasing, so this
    # bracket always holds a single sign change.
    guess = 2.5129 * math.sqrt(alpha)
    return float(brentq(xi, guess / 16.0, guess * 16.0 + 16.0, xtol=1e-14, rtol=1e-14))


def _kept_cost(x: np.ndarray, alpha: float) -> np.ndarray:
    """``x + psi_1(x)``: the free-energy term of a component kept above the threshold.

    Evaluated without forming ``x - tau`` directly: for a strong component
    ``x`` can be 1e14 while the noise terms that decide sigma2 are O(1), and
    the naive difference cancels them away (an exactly low-rank float32
    weight then came out at rank 51 instead of 7).
    """
    b = x - (1.0 + alpha)
    # x > x_bar >= (1 + sqrt(alpha))^2, so b > 0 and the discriminant is positive;
    # clipping only guards against rounding at the boundary.
    root = np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0))
    tau = 0.5 * (b + root)
    # x - tau = ((x+1+alpha) - root) / 2, rationalised.
    x_minus_tau = 2.0 * (x * (1.0 + alpha) + alpha) / ((x + 1.0 + alpha) + root)
    return x_minus_tau + np.log1p(tau) + alpha * np.log1p(tau / alpha)


def _free_energy(log_sigma2: np.ndarray, s2: np.ndarray, tail: float, big_l: int,
                 big_m: int, x_bar: float) -> np.ndarray:
    """Omega (up to constants) at each log noise variance.

    Args:
        log_sigma2: candidate log noise variances, any shape.
        s2: squared singular values that may cross the threshold (the first H_bar).
        tail: sum of the remaining squared singular values (never above it).
        big_l: L, the smaller dimension.
        big_m: M, the larger dimension.
        x_bar: normalised EVB threshold.

    Returns:
        Omega for each candidate, same shape as ``log_sigma2``.
    """
    t = np.asarray(log_sigma2, dtype=np.float64)
    alpha = big_l / big_m
    sigma2 = np.exp(t)
    # psi_0(x) = x - log x; its -log(gamma_h^2) part is constant in sigma2 and
    # dropped, which also keeps exact zero singular values finite.
    base = tail / (big_m * sigma2) + big_l * t
    x = s2[None, :] / (big_m * sigma2.reshape(-1, 1))
    head = np.where(x > x_bar, _kept_cost(np.maximum(x, x_bar), alpha), x).sum(axis=1)
    return base + head.reshape(t.shape)


def _minimise_log_sigma2(lo: float, hi: float, s2: np.ndarray, tail: float,
                         big_l: int, big_m: int, x_bar: float) -> float:
    """Global minimiser of Omega over log sigma2 in [lo, hi]."""
    if hi - lo <= 1e-12:
        return hi
    grid = np.linspace(lo, hi, _GRID_POINTS)
    values = _free_energy(grid, s2, tail, big_l, big_m, x_bar)
    padded = np.concatenate(([np.inf], values, [np.inf]))
    is_min = (values <= padded[:-2]) & (values <= padded[2:])
    candidates = np.flatnonzero(is_min)
    candidates = candidates[np.argsort(values[candidates])][:_REFINE_CANDIDATES]
    best_t, best_f = float(grid[np.argmin(values)]), float(values.min())
    step = grid[1] - grid[0]
    for i in candidates:
        a, b = max(lo, grid[i] - step), min(hi, grid[i] + step)
        res = minimize_scalar(
            lambda t: float(_free_energy(np.array([t]), s2, tail, big_l, big_m, x_bar)[0]),
            bounds=(a, b), method="bounded", options={"xatol": 1e-12 * max(1.0, abs(lo))})
        if res.fun < best_f:
            best_t, best_f = float(res.x), float(res.fun)
    return best_t


def evbmf(s: np.ndarray, m: int, n: int, *, eps: float | None = None) -> EvbmfResult:
    """Solve EVBMF for an ``m × n`` matrix given its singular values.

    Args:
        s: singular values of the matrix, ``len(s) == min(m, n)``; sorted here
            into descending order if they are not already.
        m: number of rows.
        n: number of columns.
        eps: relative resolution of the matrix entries. Singular values at or
            below ``s.max() * max(m, n) * eps`` (numpy's ``matrix_rank``
            tolerance) are round-off and treated as exact zeros. Defaults to
            float64 epsilon, right for a float64 SVD of any weights; pass
            ``np.finfo(np.float32).eps`` to also count float32 storage
            round-off as zero, so an exactly low-rank float32 weight gets its
            rank (its relative round-off is not white noise, and EVBMF would
            otherwise keep a few components of it).

    Returns:
        The EVB rank, noise variance, threshold and posterior singular values.
        An all-zero matrix gives rank 0 with ``sigma2 == threshold == 0``.

    Raises:
        ValueError: ``s`` has the wrong length or negative entries, a dimension
            is negative, or ``eps`` is negative.
        OnnxlrError: ``s`` contains NaN or infinity (the weights do).
    """
    s = np.asarray(s, dtype=np.float64).ravel()
    if m < 0 or n < 0:
        raise ValueError(f"matrix shape must be non-negative, got {m}x{n}")
    big_l, big_m = min(m, n), max(m, n)
    if s.size != big_l:
        raise ValueError(f"expected {big_l} singular values for a {m}x{n} matrix, got {s.size}")
    if not np.all(np.isfinite(s)):
        raise OnnxlrError(f"EVBMF: singular values of a {m}x{n} weight are not finite (NaN/inf in weights)")
    if np.any(s < 0):
        raise ValueError("singular values must be non-negative")
    if eps is not None and not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    s = np.sort(s)[::-1]
    empty = np.zeros(0)
    if big_l == 0:
        return EvbmfResult(0, 0.0, 0.0, empty, 0)
    alpha = big_l / big_m
    h_bar = max(math.ceil(big_l / (1.0 + alpha)) - 1, 0)
    s_max = float(s[0])
    if s_max == 0.0:
        return EvbmfResult(0, 0.0, 0.0, empty, h_bar)
    # Singular values below the double-precision rank tolerance (numpy's
    # matrix_rank convention) are SVD round-off, not noise: its tail is not
    # Gaussian-like and would pass for signal. Treat them as exact zeros.
    resolution = np.finfo(np.float64).eps if eps is None else float(eps)
    s = np.where(s > s_max * big_m * resolution, s, 0.0)

    # Normalise so the upper bound of sigma2 is exactly 1; dividing by s_max
    # first keeps the squares clear of overflow/underflow for any weight scale.
    scale = s_max * math.sqrt(float(np.sum((s / s_max) ** 2)) / (big_l * big_m))
    g = s / scale
    g2 = g * g
    total = float(np.sum(g2))  # == L * M up to rounding
    tau_bar = _tau_bar(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    upper = total / (big_l * big_m)
    if h_bar == 0:
        sigma2 = upper  # lower == upper: everything is noise
    else:
        tail = g2[h_bar:]
        lower = max(float(tail[0]) / (big_m * x_bar), float(np.mean(tail)) / big_m)
        # An exactly low-rank matrix has lower == 0 (Omega decreases without
        # bound as sigma2 -> 0, keeping every nonzero component); any floor
        # far below the round-off level gives that same rank.
        lower = min(max(lower, upper * np.finfo(np.float64).eps ** 2), upper)
        t = _minimise_log_sigma2(math.log(lower), math.log(upper), g2[:h_bar],
                                 float(np.sum(g2[h_bar:])), big_l, big_m, x_bar)
        sigma2 = math.exp(t)

    threshold = math.sqrt(big_m * sigma2 * x_bar)
    rank = int(np.count_nonzero(g > threshold))
    kept = g[:rank]
    ratio = (big_l + big_m) * sigma2 / kept**2
    disc = np.maximum((1.0 - ratio) ** 2 - 4.0 * big_l * big_m * sigma2**2 / kept**4, 0.0)
    posterior = kept / 2.0 * (1.0 - ratio + np.sqrt(disc))
    logger.debug("EVBMF %dx%d: rank %d (bound %d), sigma2 %.3g", m, n, rank, h_bar,
                 sigma2 * scale**2)
    return EvbmfResult(rank, sigma2 * scale**2, threshold * scale, posterior * scale, h_bar)


def evbmf_rank(s: np.ndarray, m: int, n: int, *, eps: float | None = None) -> int:
    """EVBMF rank of an ``m × n`` matrix from its singular values.

    Args:
        s: singular values (descending) of the matrix, ``len(s) == min(m, n)``.
        m: number of rows.
        n: number of columns.
        eps: relative resolution of the entries; see :func:`evbmf`.

    Returns:
        The number of components above the EVB threshold, in
        ``[0, ceil(L / (1 + L/M)) - 1]`` with ``L = min(m, n)``, ``M = max(m, n)``:
        0 when no singular value stands out of the noise (always for ``L <= 1``
        and for 2×2), and never full rank.
    """
    return evbmf(s, m, n, eps=eps).rank
