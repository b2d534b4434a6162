"""The Adaptive Fastfood structure itself: blocks, the fast Walsh–Hadamard transform,
applying a fit and expanding it to a dense matrix. What the fit produces and what the
graph surgery reads; :mod:`onnxlr.linalg.fastfood` gives the math."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

def next_pow2(d: int) -> int:
    return 1 << max(0, (int(d) - 1).bit_length())


@functools.lru_cache(maxsize=16)
def _sylvester(r: int) -> np.ndarray:
    return scipy.linalg.hadamard(r).astype(np.float64)


def fwht(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unnormalised fast Walsh–Hadamard transform along ``axis`` (Sylvester order), float64.

    Equals ``scipy.linalg.hadamard(D) @ x`` along that axis. ``H_D = H_r1 ⊗ H_r2 ⊗ …``, so
    the axis is viewed as ``[r1, r2, …]`` (each ``r ≤ 32``) and each factor is one BLAS
    product on the last axis, which is then rotated to the front of the factors: ``D·Σr``
    multiply-adds in large GEMMs run ~10× faster in numpy than the ``D·log2 D`` butterfly
    additions done one stage at a time.
    """
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"FWHT length must be a power of two, got {d}")
    lead = x.shape[:-1]
    bits = d.bit_length() - 1
    stages = max(1, -(-bits // 5))
    sizes = [2 ** (bits // stages + (i < bits % stages)) for i in range(stages)]
    y = x.reshape((-1,) + tuple(sizes))
    for r in reversed(sizes):
        y = np.ascontiguousarray(np.moveaxis(y @ _sylvester(r), -1, 1))
    return np.moveaxis(y.reshape(lead + (d,)), -1, axis)


def permutations(n_blocks: int, dim: int, seed: int) -> list[np.ndarray]:
    """The fixed permutations Π_j (seeded, so a fit and a rebuild agree)."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(dim) for _ in range(n_blocks)]


@dataclass
class FastfoodBlock:
    """One block ``S·H·G·Π·H·B`` with orthonormal ``H``; ``s`` has one entry per kept row.

    ``perm`` acts as ONNX ``Gather``: ``(Π z)[i] = z[perm[i]]``.
    """

    s: np.ndarray
    g: np.ndarray
    b: np.ndarray
    perm: np.ndarray

    def matrix(self) -> np.ndarray:
        """The block's kept rows as a dense ``len(s) × D`` matrix (float64)."""
        dim = self.g.size
        rows = _hadamard_rows(dim, self.s.size) * self.g
        rows = rows[:, np.argsort(self.perm)]          # X·Π = X[:, Π⁻¹]
        return self.s[:, None] * fwht(rows, axis=1) / math.sqrt(dim) * self.b

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x`` (rows × D) → rows × len(s), through fast transforms only."""
        dim = self.g.size
        z = fwht(x * self.b, axis=-1) / math.sqrt(dim)
        z = fwht(z[..., self.perm] * self.g, axis=-1) / math.sqrt(dim)
        return z[..., :self.s.size] * self.s


@dataclass
class FastfoodFit:
    """Fitted Adaptive Fastfood for a ``d → n`` layer (``W`` is ``n × d``).

    Attributes:
        blocks: ``⌈n/D⌉`` blocks; their kept rows stack to ``n``.
        dim: padded input size ``D`` (power of two).
        d, n: the layer's input and output sizes.
        bias_shift: add to the layer's bias (``−(V − W) μ``; zeros without a mean).
        u, vt: low-rank correction ``u @ vt`` (``n × k``, ``k × d``), or None.
        weight_error: ``‖V − W‖_F / ‖W‖_F``.
        output_error: ``√(tr((V−W)Σ(V−W)ᵀ) / tr(WΣWᵀ))``, the relative RMS output error
            on inputs with covariance Σ (equals ``weight_error`` when Σ = I).
    """

    blocks: list[FastfoodBlock]
    dim: int
    d: int
    n: int
    bias_shift: np.ndarray
    u: np.ndarray | None = None
    vt: np.ndarray | None = None
    weight_error: float = math.nan
    output_error: float = math.nan
    sweeps: int = 0
    seconds: float = 0.0

    @property
    def rank(self) -> int:
        return 0 if self.u is None else self.u.shape[1]


def fastfood_matrix(fit: FastfoodFit, correction: bool = True) -> np.ndarray:
    """The dense ``n × d`` matrix the fit represents (Fastfood plus correction)."""
    v = np.concatenate([blk.matrix() for blk in fit.blocks], axis=0)[:, :fit.d]
    if correction and fit.u is not None:
        v = v + fit.u @ fit.vt
    return v


def fastfood_apply(fit: FastfoodFit, x: np.ndarray) -> np.ndarray:
    """``x`` (…, d) → (…, n) without the bias, via fast transforms (reference for the graph)."""
    x = np.asarray(x, np.float64)
    xp = np.zeros(x.shape[:-1] + (fit.dim,))
    xp[..., :fit.d] = x
    y = np.concatenate([blk.apply(xp) for blk in fit.blocks], axis=-1)
    if fit.u is not None:
        y = y + (x @ fit.vt.T) @ fit.u.T
    return y


def _hadamard_rows(dim: int, rows: int) -> np.ndarray:
    return scipy.linalg.hadamard(dim)[:rows].astype(np.float64) / math.sqrt(dim)
