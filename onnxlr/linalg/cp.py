"""CP (canonical polyadic) decomposition of a conv kernel, for the CP conv chain.

A conv kernel ``W`` of shape (T, S, k₁, …, k_d) is approximated by R rank-one terms

    W[t, s, κ₁, …, κ_d] ≈ Σ_r A_out[t, r] · A_in[s, r] · Π_i A_i[κ_i, r],

which turns the layer into a 1×1 conv (S→R), one depthwise conv per spatial
axis and a 1×1 conv (R→T) (Lebedev et al. 2015, "Speeding-up Convolutional
Neural Networks Using Fine-tuned CP-Decomposition", arXiv 1412.6553).

Algorithm, chosen to bound time and memory on large kernels (tensorly issue
#526: ``parafac(init='svd')`` on a 512×512×3×3 kernel tried to allocate TiBs,
and plain ALS at rank 256 took ~400 s for 100 iterations):

1. **Compression** (CANDELINC; Carroll, Pruzansky & Kruskal 1980; Bro &
   Andersson 1998, "Improving the speed of multiway algorithms: Part II.
   Compression"). A sequentially truncated HOSVD (Vannieuwenhoven, Vandebril &
   Meerbergen 2012) gives orthonormal ``U_n`` with ranks
   ``c_n = min(dim_n, R, Π_{m≠n} dim_m)`` and the core ``G = W ×_n U_nᵀ``.
   A rank-R CP tensor has multilinear ranks ≤ R, so for it this step loses
   nothing, and a CP of ``G`` maps to a CP of ``W`` by ``A_n = U_n B_n``.
2. **CP-ALS on the core** (Carroll & Chang 1970; Harshman 1970; Kolda &
   Bader 2009, "Tensor Decompositions and Applications", section 3.4). Each
   factor in turn solves its normal equations
   ``A_n V_n = M_n``, with ``V_n = ⊛_{m≠n} A_mᵀA_m`` (Hadamard product of Gram
   matrices, R×R) and ``M_n`` the MTTKRP. The MTTKRP is never formed through
   a Khatri–Rao product of all other factors: one GEMM contracts the largest
   other mode, leaving (R × the rest), and the small modes are contracted
   from that. Because that intermediate does not depend on the factor being
   updated, one GEMM is shared by all modes but the largest (a two-level
   dimension tree), so a sweep costs two GEMMs of ``size(W)·R`` flops (three
   with the line search below).
   Each sweep ends with a line search (extrapolation of the last step,
   kept only if it lowers the error) against ALS's slow plateaus.
   Starts (``n_restarts``, seeded) compete and the lowest error wins. The
   first start is a direct CP of the core by a generalised eigendecomposition
   of two mixtures of its spatial slices (Leurgans, Ross & Abel 1993) when
   R ≤ T and R ≤ S, which is exact for an exact CP kernel; the others (and
   the first when R exceeds a channel dim) are Gaussian random.
3. **Refinement**: the expanded factors are polished by a few ALS sweeps on
   the full kernel, which removes the restriction to the HOSVD subspaces
   (only when step 1 actually truncated something).

Memory is O(3·size(W) + size(W)/min(T, S)·R + (T + S + Σk)·R + R²); time is
bounded by ``max_seconds``, checked after every sweep. Measured on a
512×512×3×3 kernel, single-threaded BLAS on a 2-core machine, with the
defaults (100 sweeps on the core + 10 on the kernel): rank 256 in 12 s, rank
64 in 1.3 s, peak RSS ~200 MB. The CP weights
(λ) are absorbed into ``out_factor``; ``in_factor`` and ``spatial`` have unit
columns; components are sorted by decreasing λ.

Step 2's solver (ALS sweeps, dimension tree, line search) is :mod:`onnxlr.linalg.cp_als`;
this module compresses, chooses the starts, refines and returns the factors.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from onnxlr.linalg.cp_als import _Als
from onnxlr.linalg.svd import as_float64, leading_left_subspace
from onnxlr.linalg.tucker import unfold

logger = logging.getLogger(__name__)

__all__ = ["CP", "cp_conv", "cp_to_tensor"]

# Sweeps on the full kernel after the compressed fit; each costs as much as
# (dims / compressed dims)² sweeps on the core, so only a few.
_REFINE_SWEEPS = 10


@dataclass
class CP:
    """Result of :func:`cp_conv`; ``W ≈ Σ_r out[:,r] ⊗ in[:,r] ⊗ spatial₁[:,r] ⊗ …``.

    Attributes:
        out_factor: (T, R) float64; carries the CP weights λ.
        in_factor: (S, R) float64, unit-norm columns.
        spatial: one (k_i, R) float64 factor per spatial axis, unit-norm columns.
        rel_error: ``||W − Ŵ||_F / ||W||_F`` from the reconstruction.
        iterations: ALS sweeps done in total (all restarts and refinement).
        seconds: wall time of the whole call.
    """

    out_factor: np.ndarray
    in_factor: np.ndarray
    spatial: list[np.ndarray] = field(default_factory=list)
    rel_error: float = 0.0
    iterations: int = 0
    seconds: float = 0.0

    @property
    def factors(self) -> list[np.ndarray]:
        """All factors in kernel-mode order: out, in, spatial₁, …"""
        return [self.out_factor, self.in_factor, *self.spatial]

    def reconstruct(self) -> np.ndarray:
        """The approximated kernel, (T, S, k₁, …, k_d)."""
        return cp_to_tensor(self.factors)


def _khatri_rao(mats: list[np.ndarray]) -> np.ndarray:
    """Column-wise Kronecker product, first matrix varying slowest (C order)."""
    rank = mats[0].shape[1]
    out = np.ones((1, rank))
    for m in mats:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, rank)
    return out


def cp_to_tensor(factors: list[np.ndarray]) -> np.ndarray:
    """Σ_r ⊗_n factors[n][:, r] as a dense tensor (one GEMM)."""
    shape = tuple(f.shape[0] for f in factors)
    return (factors[0] @ _khatri_rao(factors[1:]).T).reshape(shape)


def _compress(kernel: np.ndarray, rank: int) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """ST-HOSVD with ranks ``min(dim_n, R, Π other dims)``; ``None`` for an untouched mode."""
    core = kernel
    bases: list[np.ndarray | None] = [None] * kernel.ndim
    # Largest modes first: each truncation shrinks the tensor the next Gram is built from.
    for n in sorted(range(kernel.ndim), key=lambda m: -kernel.shape[m]):
        dim = core.shape[n]
        others = core.size // dim
        c = min(dim, rank, others)
        if c >= dim:
            continue
        u = leading_left_subspace(unfold(core, n), c)
        bases[n] = u
        core = np.moveaxis(np.tensordot(core, u, axes=([n], [0])), -1, n)
    return np.ascontiguousarray(core), bases


def _rank_one_batch(stack: np.ndarray, sweeps: int = 10) -> list[np.ndarray]:
    """Rank-one fits of R small tensors at once: ``stack[r] ≈ v₁[r] ⊗ v₂[r] ⊗ …``.

    Args:
        stack: (R, k₁, …, k_d).

    Returns:
        d arrays (R, k_i); the scale is on the first. HOSVD start (leading
        singular vector of each unfolding) then a few higher-order power
        sweeps (De Lathauwer et al. 2000), which is exact for d ≤ 2.
    """
    rank, dims = stack.shape[0], stack.shape[1:]
    if len(dims) == 1:
        return [stack.copy()]
    vectors = []
    for i in range(len(dims)):
        unf = np.moveaxis(stack, i + 1, 1).reshape(rank, dims[i], -1)
        vectors.append(np.linalg.svd(unf, full_matrices=False)[0][:, :, 0])
    letters = "abc"[: len(dims)]
    for _ in range(sweeps if len(dims) > 2 else 0):
        for i in range(len(dims)):
            others = [j for j in range(len(dims)) if j != i]
            subs = "r" + letters + "".join(f",r{letters[j]}" for j in others) + f"->r{letters[i]}"
            v = np.einsum(subs, stack, *[vectors[j] for j in others])
            norm = np.linalg.norm(v, axis=1, keepdims=True)
            vectors[i] = v / np.where(norm > 0, norm, 1.0)
    scale_subs = "r" + letters + "".join(f",r{c}" for c in letters[1:]) + "->ra"
    vectors[0] = np.einsum(scale_subs, stack, *vectors[1:])
    return vectors


def _gevd_init(core: np.ndarray, rank: int, rng: np.random.Generator) -> list[np.ndarray] | None:
    """Direct CP of the core by a generalised eigendecomposition, when R ≤ both channel dims.

    With the channel modes compressed to exactly R, every spatial slice of the
    core is ``G_κ = A diag(c_κ) Bᵀ`` with square A, B. Two random mixtures of
    the slices, ``P = A D₁ Bᵀ`` and ``Q = A D₂ Bᵀ``, give ``P Q⁻¹ = A (D₁D₂⁻¹) A⁻¹``
    and ``(Q⁻¹P)ᵀ = B (D₁D₂⁻¹) B⁻¹``: A and B are eigenvectors, paired by
    eigenvalue (Leurgans, Ross & Abel 1993, "A decomposition for three-way
    arrays"; Sanchez & Kowalski 1990). Exact for an exact CP tensor and a good
    start otherwise; the spatial factors are rank-one fits of the
    least-squares spatial columns. Returns None when not applicable or when
    the eigenproblem is degenerate.
    """
    if core.shape[0] != rank or core.shape[1] != rank or core.ndim < 3:
        return None
    spatial_shape = core.shape[2:]
    kk = math.prod(spatial_shape)
    if kk < 2:
        return None
    slices = core.reshape(rank, rank, kk)
    w = rng.standard_normal((kk, 2))
    p, q = slices @ w[:, 0], slices @ w[:, 1]
    try:
        vals_a, vecs_a = np.linalg.eig(np.linalg.solve(q.T, p.T).T)   # P Q⁻¹
        vals_b, vecs_b = np.linalg.eig(np.linalg.solve(q, p).T)       # (Q⁻¹P)ᵀ
    except np.linalg.LinAlgError:
        return None
    # For a noisy (non-CP) core some eigenvalues come in complex pairs; the
    # real parts still make a usable start for ALS.
    a = np.real(vecs_a[:, np.argsort(np.real(vals_a), kind="stable")])
    b = np.real(vecs_b[:, np.argsort(np.real(vals_b), kind="stable")])
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    mttkrp = np.einsum("ijk,ir,jr->kr", slices, a, b)
    gram = (a.T @ a) * (b.T @ b)
    try:
        c = np.linalg.lstsq(gram, mttkrp.T, rcond=None)[0].T  # (K, R)
    except np.linalg.LinAlgError:
        return None
    spatial = _rank_one_batch(c.T.reshape((rank,) + spatial_shape))
    factors = [a, b] + [v.T for v in spatial]
    if not all(np.all(np.isfinite(f)) for f in factors):
        return None
    return factors


def _random_factors(shape: tuple[int, ...], rank: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal((dim, rank)) for dim in shape]


def cp_conv(kernel: np.ndarray, rank: int, *, max_iter: int = 100, max_seconds: float = 60.0,
            tol: float = 1e-7, n_restarts: int = 1, seed: int = 0) -> CP:
    """Rank-R CP of a conv kernel with bounded time and memory.

    Args:
        kernel: (T, S, k₁, …, k_d), d = 1, 2 or 3.
        rank: CP rank R >= 1 (may exceed any dimension).
        max_iter: ALS sweeps per random start on the compressed core; the
            refinement on the full kernel adds at most ``min(max_iter, 10)``.
        max_seconds: wall-time budget for the whole call, checked after each
            sweep (at least one sweep is always done); the best state so far is
            returned when it runs out.
        tol: stop a run when a sweep changes the relative error by less.
        n_restarts: number of seeded random starts (>= 1); the best is kept.
        seed: seed of the random starts; equal inputs give equal outputs.

    Returns:
        :class:`CP` with float64 factors, λ absorbed into ``out_factor``,
        components sorted by decreasing λ.

    Raises:
        ValueError: bad kernel shape, ``rank < 1`` or ``n_restarts < 1``.
        OnnxlrError: the kernel contains NaN or inf.
    """
    t0 = time.perf_counter()
    deadline = t0 + max_seconds
    kernel = as_float64(kernel, what="conv kernel")
    if not 3 <= kernel.ndim <= 5:
        raise ValueError(f"conv kernel must be (T, S, k1[, k2[, k3]]), got shape {kernel.shape}")
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"CP rank must be >= 1, got {rank}")
    if n_restarts < 1:
        raise ValueError(f"n_restarts must be >= 1, got {n_restarts}")
    kernel = np.ascontiguousarray(kernel)
    norm2 = float(np.vdot(kernel, kernel))
    if norm2 == 0.0:
        zeros = [np.zeros((d, rank)) for d in kernel.shape]
        return CP(zeros[0], zeros[1], zeros[2:], 0.0, 0, time.perf_counter() - t0)

    core, bases = _compress(kernel, rank)
    compressed = any(b is not None for b in bases)
    core_als = _Als(core)
    rng = np.random.default_rng(seed)
    best: tuple[list[np.ndarray], float] | None = None
    iterations = 0
    for start in range(n_restarts):
        if start > 0 and time.perf_counter() >= deadline:
            break
        init = _gevd_init(core, rank, rng) if start == 0 else None
        if init is None:
            init = _random_factors(core.shape, rank, rng)
        factors, rel, done = core_als.run(init, max_iter, tol, deadline)
        iterations += done
        logger.debug("CP start %d on core %s: %d sweeps, rel_error %.3g (of the core)",
                     start, core.shape, done, rel)
        if best is None or rel < best[1]:
            best = (factors, rel)
    assert best is not None
    factors = [f if b is None else b @ f for f, b in zip(best[0], bases)]

    if logger.isEnabledFor(logging.DEBUG):
        # orthonormal bases: ‖W − Ŵ‖² = (‖W‖² − ‖G‖²) + ‖G − Ĝ‖²
        full = math.sqrt(max(norm2 - core_als.norm2, 0.0) + best[1] ** 2 * core_als.norm2) / math.sqrt(norm2)
        logger.debug("CP after the compressed fit: rel_error %.4g of the kernel", full)
    if compressed and time.perf_counter() < deadline:
        full_als = _Als(kernel)
        factors, _, done = full_als.run(factors, min(max_iter, _REFINE_SWEEPS), tol, deadline)
        iterations += done

    result = _finalise(factors, kernel, norm2)
    result.iterations = iterations
    result.seconds = time.perf_counter() - t0
    logger.debug("cp_conv %s rank %d: %d sweeps, %.2f s, rel_error %.3g",
                 kernel.shape, rank, iterations, result.seconds, result.rel_error)
    return result


def _finalise(factors: list[np.ndarray], kernel: np.ndarray, norm2: float) -> CP:
    """Normalise, order and sign-fix the factors and measure the true error."""
    factors = [np.array(f, dtype=np.float64) for f in factors]
    scale = np.ones(factors[0].shape[1])
    for n in range(1, len(factors)):
        norms = np.linalg.norm(factors[n], axis=0)
        safe = np.where(norms > 0, norms, 1.0)
        factors[n] /= safe
        scale *= safe
        # sign convention: largest-magnitude entry of each unit factor positive,
        # the sign moves to out_factor (the product is unchanged)
        pivot = factors[n][np.argmax(np.abs(factors[n]), axis=0), np.arange(factors[n].shape[1])]
        signs = np.where(pivot < 0, -1.0, 1.0)
        factors[n] *= signs
        scale *= signs
    factors[0] = factors[0] * scale
    order = np.argsort(-np.linalg.norm(factors[0], axis=0), kind="stable")
    factors = [f[:, order] for f in factors]
    diff = kernel - cp_to_tensor(factors)
    rel = math.sqrt(float(np.vdot(diff, diff)) / norm2)
    if not math.isfinite(rel):
        raise ArithmeticError("CP result is not finite")  # cannot happen: every kept state is finite
    return CP(out_factor=factors[0], in_factor=factors[1], spatial=factors[2:], rel_error=rel)
