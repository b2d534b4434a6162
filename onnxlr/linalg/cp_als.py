"""CP-ALS on one dense tensor: the solver behind :func:`onnxlr.linalg.cp.cp_conv`.

Each factor in turn solves its normal equations ``A_n V_n = M_n`` (Kolda & Bader 2009,
section 3.4), with ``V_n`` the Hadamard product of the other factors' Gram matrices and
``M_n`` the MTTKRP, computed through a two-level dimension tree (one GEMM contracts the
largest other mode and is shared by all modes but that one); each sweep ends with a line
search (extrapolating the last step, kept only if it lowers the error) against ALS's slow
plateaus. :mod:`onnxlr.linalg.cp` gives the why and the measurements.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import scipy.linalg

from onnxlr.linalg.tucker import unfold

logger = logging.getLogger(__name__)


class _Diverged(ArithmeticError):
    """An ALS update produced NaN or inf."""


class _Als:
    """CP-ALS on one dense tensor with a two-level dimension tree for the MTTKRPs.

    ``lead`` is the largest mode. Its MTTKRP contracts the second largest mode
    (``second``) with a GEMM first. All other MTTKRPs start from
    ``Y = A_leadᵀ X_(lead)`` (R × the other dims), computed once per sweep right
    after ``A_lead`` is updated.
    """

    def __init__(self, tensor: np.ndarray):
        self.shape = tensor.shape
        self.ndim = tensor.ndim
        self.norm2 = float(np.vdot(tensor, tensor))
        order = sorted(range(self.ndim), key=lambda n: -self.shape[n])
        self.lead, self.second = order[0], order[1]
        # Contiguous unfoldings so that both contractions are plain GEMMs; at
        # most two copies of the tensor.
        self.unf_lead = np.ascontiguousarray(unfold(tensor, self.lead))
        self.unf_second = np.ascontiguousarray(unfold(tensor, self.second))
        self.rest_lead = [m for m in range(self.ndim) if m != self.lead]
        self.rest_second = [m for m in range(self.ndim) if m != self.second]
        # update order: the lead mode first, so that Y serves all the others
        self.order = [self.lead] + self.rest_lead

    def _mttkrp_from(self, y: np.ndarray, modes: list[int], factors: list[np.ndarray],
                     n: int) -> np.ndarray:
        """Contract ``y`` (R, dims of ``modes``) with every factor but ``n``'s: (dim_n, R)."""
        rank = y.shape[0]
        r_label = self.ndim
        operands: list = [y, [r_label] + modes]
        for m in modes:
            if m != n:
                operands += [factors[m], [m, r_label]]
        out = np.einsum(*operands, [n, r_label], optimize="greedy")
        return out.reshape(self.shape[n], rank)

    @staticmethod
    def _solve(gram: np.ndarray, mttkrp: np.ndarray) -> np.ndarray:
        """``A = M V⁻¹`` for SPD ``V``; least squares when V is (numerically) singular."""
        rank = gram.shape[0]
        # A tiny ridge keeps Cholesky alive for rank-deficient V (R larger
        # than what the data supports) at a relative bias of ~1e-13.
        ridge = 1e-13 * float(np.max(np.diag(gram), initial=0.0)) + 1e-300
        try:
            c = scipy.linalg.cho_factor(gram + ridge * np.eye(rank), check_finite=False)
            out = scipy.linalg.cho_solve(c, mttkrp.T, check_finite=False).T
        except np.linalg.LinAlgError:
            out = np.linalg.lstsq(gram, mttkrp.T, rcond=None)[0].T
        return out

    def sweep(self, factors: list[np.ndarray], grams: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """One ALS sweep in place; returns (weights λ, squared residual estimate).

        Factors are left with unit columns; λ holds the scale of the last
        updated factor, so the model is ``[[λ; factors]]``.
        """
        y = None
        weights = np.ones(factors[0].shape[1])
        err2 = 0.0
        for n in self.order:
            if n == self.lead:
                z = factors[self.second].T @ self.unf_second  # (R, other dims)
                m_n = self._mttkrp_from(z.reshape((-1,) + tuple(self.shape[m] for m in self.rest_second)),
                                        self.rest_second, factors, n)
            else:
                m_n = self._mttkrp_from(y, self.rest_lead, factors, n)
            v_n = np.ones_like(grams[0])
            for m in range(self.ndim):
                if m != n:
                    v_n *= grams[m]
            a = self._solve(v_n, m_n)
            if not np.all(np.isfinite(a)):
                raise _Diverged(f"mode {n} update is not finite")
            if n == self.order[-1]:
                # ‖X − X̂‖² = ‖X‖² − 2⟨X, X̂⟩ + ‖X̂‖² with X̂ = [[a; others]]:
                # ⟨X, X̂⟩ = Σ a∘M and ‖X̂‖² = Σ (aᵀa)∘V, both cheap.
                err2 = self.norm2 - 2.0 * float(np.vdot(a, m_n)) + float(np.vdot(a.T @ a, v_n))
            weights = np.linalg.norm(a, axis=0)
            safe = np.where(weights > 0, weights, 1.0)
            a /= safe
            factors[n] = a
            grams[n] = a.T @ a
            if n == self.lead:
                shape = (-1,) + tuple(self.shape[m] for m in self.rest_lead)
                y = (a.T @ self.unf_lead).reshape(shape)
        return weights, max(err2, 0.0)

    def rel(self, err2: float) -> float:
        return math.sqrt(err2 / self.norm2) if self.norm2 > 0 else 0.0

    def residual2(self, factors: list[np.ndarray]) -> float:
        """``‖X − [[factors]]‖²`` without forming the model: one GEMM and a small contraction."""
        n = self.order[-1]
        y = (factors[self.lead].T @ self.unf_lead).reshape(
            (-1,) + tuple(self.shape[m] for m in self.rest_lead))
        m_n = self._mttkrp_from(y, self.rest_lead, factors, n)
        gram = np.ones((factors[0].shape[1],) * 2)
        for f in factors:
            gram *= f.T @ f
        return max(self.norm2 - 2.0 * float(np.vdot(factors[n], m_n)) + float(gram.sum()), 0.0)

    def _absorbed(self, factors: list[np.ndarray], weights: np.ndarray) -> list[np.ndarray]:
        """The model as plain factors, λ folded into the last updated mode."""
        out = list(factors)
        out[self.order[-1]] = out[self.order[-1]] * weights
        return out

    def run(self, factors: list[np.ndarray], max_iter: int, tol: float, deadline: float,
            ) -> tuple[list[np.ndarray], float, int]:
        """ALS with line search until ``tol``, ``max_iter`` or ``deadline``.

        Line search (Bro 1998, "Multi-way analysis in the food industry",
        section 4.3; as in tensorly's ``parafac(linesearch=True)``): after each
        sweep the step from the previous sweep is extrapolated by
        ``sweep^(1/e)`` and kept when it lowers the error; a failed jump raises
        ``e`` to make later jumps shorter. It shortens the long plateaus
        ("swamps") of plain ALS, typical when R exceeds a kernel dimension.

        Returns:
            ``(factors, relative error estimate, sweeps done)`` for the best
            state seen, λ absorbed into the factors.
        """
        norms = [np.linalg.norm(f, axis=0) for f in factors]
        factors = [f / np.where(nm > 0, nm, 1.0) for f, nm in zip(factors, norms)]
        grams = [f.T @ f for f in factors]
        best_factors, best_rel = list(factors), math.inf
        previous: list[np.ndarray] | None = None
        prev_rel = math.inf
        ls_exp = 3.0
        done = 0
        while done < max_iter:
            try:
                weights, err2 = self.sweep(factors, grams)
            except _Diverged as exc:
                # Keep the best finite state; the caller may try another start.
                logger.warning("CP-ALS diverged after %d sweeps (%s); keeping the best state", done, exc)
                break
            done += 1
            current = self._absorbed(factors, weights)
            rel = self.rel(err2)
            if previous is not None and done > 2:
                jump = done ** (1.0 / ls_exp)
                candidate = [p + jump * (c - p) for p, c in zip(previous, current)]
                cand_rel = self.rel(self.residual2(candidate))
                if cand_rel < rel:
                    current, rel = candidate, cand_rel
                    norms = [np.linalg.norm(f, axis=0) for f in candidate]
                    factors[:] = [f / np.where(nm > 0, nm, 1.0) for f, nm in zip(candidate, norms)]
                    # λ back into the last mode so the next sweep starts from the same model
                    lam = np.prod(norms, axis=0)
                    factors[self.order[-1]] = factors[self.order[-1]] * lam
                    grams[:] = [f.T @ f for f in factors]
                else:
                    ls_exp += 1.0
            if not math.isfinite(rel):
                logger.warning("CP-ALS error became non-finite after %d sweeps", done)
                break
            if rel <= best_rel:
                best_factors, best_rel = current, rel
            previous = current
            if abs(prev_rel - rel) < tol or time.perf_counter() >= deadline:
                break
            prev_rel = rel
        return best_factors, best_rel, done
