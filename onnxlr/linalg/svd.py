"""Truncated SVD of a weight matrix, and the subspace helpers Tucker and CP share.

A fully connected layer ``y = W x`` with ``W`` of shape (m, n) is replaced by two
layers ``y = A (B x)`` with ``A`` (m, k) and ``B`` (k, n), which saves work when
``k (m + n) < m n``. The best rank-k approximation in the Frobenius norm is the
truncated SVD (Eckart–Young): with ``W = U S Vᵀ``,

    W ≈ U_k (S_k V_kᵀ),    ||W − W_k||_F² = Σ_{i>k} σ_i².

The split ``A = U_k``, ``B = S_k V_kᵀ`` is the one of Fast R-CNN (Girshick 2015,
"Fast R-CNN", arXiv 1504.08083, section 3.1).

Singular *values* and leading singular *subspaces* are computed here from the
Gram matrix of the shorter side (``W Wᵀ`` when m ≤ n), which costs one GEMM and
one small symmetric eigendecomposition instead of a full SVD of the long
matrix. The price is accuracy below about ``1e-8·σ_max`` (eigenvalues of the Gram
matrix carry an absolute error of order ``ε·σ_max²``): the energy of every
singular value is exact to that level, which is what rank selection and
truncation need. ``truncated_svd`` itself uses a LAPACK SVD, so its
factors are exactly what the formula above says.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

import numpy as np
import scipy.linalg

from onnxlr.errors import OnnxlrError

logger = logging.getLogger(__name__)

__all__ = ["singular_values", "truncated_svd", "relative_error"]


def check_finite(array: np.ndarray, what: str = "weight") -> None:
    """Raise :class:`OnnxlrError` when ``array`` holds NaN or ±inf.

    Non-finite weights are a property of the user's model, not a bug here, and
    every decomposition below would silently return garbage for them.
    """
    if not np.all(np.isfinite(array)):
        raise OnnxlrError(f"{what} of shape {tuple(array.shape)} contains NaN or inf values")


def as_float64(array: np.ndarray, ndim: int | None = None, what: str = "weight") -> np.ndarray:
    """``array`` as a finite float64 ndarray, checking its rank when ``ndim`` is given."""
    out = np.asarray(array, dtype=np.float64)
    if ndim is not None and out.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {out.shape}")
    check_finite(out, what)
    return out


def gram_eigh(mat: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` eigenpairs of ``mat @ mat.T``, descending: (σ² values, vectors).

    Args:
        mat: (p, q) float64 matrix.
        k: number of leading pairs; all p when None.

    Returns:
        ``(values, vectors)`` with ``values`` (k,) clipped at 0 and ``vectors``
        (p, k) orthonormal, columns in descending order of value. Each column's
        largest-magnitude entry is made positive so the result does not depend
        on LAPACK's sign choice.
    """
    p = mat.shape[0]
    k = p if k is None else k
    gram = mat @ mat.T
    if 4 * k < p:
        # A partial eigensolve is faster than the full one only when k ≪ p
        # (measured: slower at k = p/2 for p = 512).
        values, vectors = scipy.linalg.eigh(gram, subset_by_index=[p - k, p - 1])
    else:
        values, vectors = np.linalg.eigh(gram)
    values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    np.maximum(values, 0.0, out=values)  # rounding can make a zero eigenvalue slightly negative
    return values, _fix_signs(vectors)


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip columns so that each one's largest-magnitude entry is positive."""
    if vectors.size == 0:
        return vectors
    pivots = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[pivots, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def leading_left_subspace(mat: np.ndarray, k: int) -> np.ndarray:
    """Orthonormal (p, k) basis of the k leading left singular vectors of ``mat`` (p, q).

    When ``k == p`` the answer is the identity: any orthonormal basis of the
    whole space reconstructs exactly, and the identity does so with no
    rounding at all and tells the caller that the mode is not compressed.
    """
    p = mat.shape[0]
    if not 1 <= k <= p:
        raise ValueError(f"subspace rank must be in [1, {p}], got {k}")
    if k == p:
        return np.eye(p)
    return gram_eigh(mat, k)[1]


def singular_values(w: np.ndarray) -> np.ndarray:
    """Singular values of a 2-D matrix, descending, float64.

    Computed as square roots of the eigenvalues of the Gram matrix of the
    shorter side (see the module docstring for the accuracy this gives).

    Args:
        w: (m, n) matrix.

    Returns:
        (min(m, n),) float64 array, descending, non-negative.

    Raises:
        ValueError: ``w`` is not 2-D.
        OnnxlrError: ``w`` contains NaN or inf.
    """
    w = as_float64(w, 2)
    if w.shape[0] > w.shape[1]:
        w = w.T
    if w.size == 0:
        return np.zeros(0)
    values = np.linalg.eigvalsh(w @ w.T)[::-1]
    return np.sqrt(np.maximum(values, 0.0))


def truncated_svd(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-k factorisation ``w ≈ a @ b`` (Eckart–Young), Fast R-CNN's split.

    Args:
        w: (m, n) matrix.
        k: rank, ``1 <= k <= min(m, n)``; ``k = min(m, n)`` reproduces ``w``
            to rounding.

    Returns:
        ``(a, b)``: ``a = U_k`` (m, k) with orthonormal columns, ``b = S_k V_kᵀ``
        (k, n), float64. Singular vector signs are fixed (largest-magnitude
        entry of each column of ``a`` positive) so the result is reproducible.

    Raises:
        ValueError: ``w`` is not 2-D or ``k`` is out of range.
        OnnxlrError: ``w`` contains NaN or inf.
    """
    w = as_float64(w, 2)
    m, n = w.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"SVD rank must be in [1, {min(m, n)}] for a {m}×{n} matrix, got {k}")
    if min(m, n) >= GRAM_MIN_DIM and max(m, n) >= 2 * min(m, n) and k < min(m, n):
        return _truncated_via_gram(w, k)
    u, s, vt = _full_svd(w)
    u, vt = u[:, :k], vt[:k]
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(k)])
    signs[signs == 0] = 1.0
    a = u * signs
    b = (s[:k] * signs)[:, None] * vt
    return a, b


#: Factorisations kept for the next rank of the same matrix: a search factorises each layer
#: at four ranks, and on NudeNet recomputing the SVD per rank was 83 of its 119 s of timing
#: factors (the HOSVD's eigenbases another 25 s). Bounded (bytes in all; a bigger one is
#: not kept) so a big model's one-rank-per-layer pass holds nothing extra worth speaking of.
SVD_CACHE_BYTES = 256 << 20
_svd_cache: OrderedDict = OrderedDict()


def array_key(kind: str, a: np.ndarray, *extra) -> tuple:
    """A cache key for a result computed from ``a`` (its shape and a digest of its bytes)."""
    return (kind, *extra, a.shape,
            hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest())


def _remembered(kind: str, w: np.ndarray, compute) -> tuple:
    """``compute(w)`` (a tuple of arrays), remembered for the same matrix, read-only."""
    key = array_key(kind, w)
    if key in _svd_cache:
        _svd_cache.move_to_end(key)
        return _svd_cache[key]
    out = compute(w)
    if sum(x.nbytes for x in out) <= SVD_CACHE_BYTES // 4:
        for x in out:
            x.flags.writeable = False  # shared by every caller: nobody may change it
        _svd_cache[key] = out
        while sum(x.nbytes for v in _svd_cache.values() for x in v) > SVD_CACHE_BYTES:
            _svd_cache.popitem(last=False)
    return out


def _full_svd(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``scipy.linalg.svd(w, full_matrices=False)``, remembered for the same matrix."""
    def compute(w):
        # gesdd is LAPACK's fast driver; gesvd is the slower, more robust fallback
        # for the rare matrices on which gesdd fails to converge.
        try:
            return scipy.linalg.svd(w, full_matrices=False, lapack_driver="gesdd")
        except np.linalg.LinAlgError:
            logger.warning("gesdd did not converge on a %d×%d matrix; retrying with gesvd",
                           *w.shape)
            return scipy.linalg.svd(w, full_matrices=False, lapack_driver="gesvd")
    return _remembered("svd", w, compute)


def cached_leading_left_subspace(mat: np.ndarray, k: int) -> np.ndarray:
    """:func:`leading_left_subspace` for a matrix asked again at other ranks (the HOSVD
    start of every Tucker rung of one layer): one full eigendecomposition, remembered."""
    p = mat.shape[0]
    if not 1 <= k <= p:
        raise ValueError(f"subspace rank must be in [1, {p}], got {k}")
    if k == p:
        return np.eye(p)
    (vectors,) = _remembered("left", mat, lambda m: (gram_eigh(m)[1],))
    return np.array(vectors[:, :k])


#: Long matrices at least this wide take the Gram route in ``truncated_svd``.
GRAM_MIN_DIM = 1024


def _truncated_via_gram(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``truncated_svd`` for a big, long matrix: the leading subspace from the short side's Gram
    matrix (one GEMM + a partial symmetric eigensolve), the other factor by projecting ``w``.

    Why: LAPACK's full SVD of VGG-16's fc6 (4096×25088) took minutes on a 2-core machine and
    computes all 4096 triplets to keep a few hundred; this takes seconds. The projection makes
    the result the best approximation within the computed subspace, so its error exceeds the
    Eckart–Young optimum only by the subspace's rounding (relative ~1e-8 of σ_max, see the
    module docstring), far below any rank that saves work.
    """
    m, n = w.shape
    if m <= n:
        _, u = gram_eigh(w, k)                       # (m, k) orthonormal
        b = u.T @ w                                   # = S_k V_kᵀ up to rounding
        return u, b
    values, v = gram_eigh(w.T, k)                     # (n, k) right singular vectors
    s = np.sqrt(values)
    a = w @ v
    nz = s > 0
    a[:, nz] /= s[nz]
    a = _fix_signs(a)
    b = (a.T @ w)                                     # projection: best within span(a)
    return a, b


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    """``||w − approx||_F / ||w||_F``; 0 when ``w`` is zero (and ``approx`` too).

    If ``w`` is zero but ``approx`` is not, the ratio is undefined and ``inf``
    is returned so that no caller mistakes it for a good approximation.
    """
    w = np.asarray(w, dtype=np.float64)
    approx = np.asarray(approx, dtype=np.float64)
    if w.shape != approx.shape:
        raise ValueError(f"shapes differ: {w.shape} vs {approx.shape}")
    norm = float(np.linalg.norm(w))
    diff = float(np.linalg.norm(w - approx))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm
