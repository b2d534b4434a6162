r"""Row subset selection by simultaneous orthogonal matching pursuit (SOMP).

Thin layers, Lu et al., "Fully-adaptive Feature Sharing in Multi-Task Networks"
(CVPR 2017, arXiv 1611.05377, §3.2): a layer with weight W (d rows = output
neurons or filters, m columns) keeps d' rows ω chosen so that every row is
close to a combination of the kept ones,

    min_{ω, A} ‖W − A W_ω‖_F   with |ω| = d',

solved greedily by SOMP (Tropp, Gilbert & Strauss 2006): the rows of W are both
the signals and (normalised) the dictionary. Each step picks the atom with the
largest ℓ2 norm of correlations with all residuals (the one that removes most
residual energy), then projects every row onto the span of the picked atoms.

Implementation: the correlations M = R Φᵀ (d × d, residual rows against unit
atoms) are updated by a rank-one term per step with the new orthonormal
direction q, ``M ← M − (W q)(Φ q)ᵀ``, so a step costs O(d² + d·m) and the whole
selection O(d'·(d² + d·m)); no least-squares solve until the final A.
A row that is zero or already in the span of the picked rows is never picked
while another row still adds something.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = ["SompResult", "somp"]

#: a row whose residual norm is below this fraction of its own norm adds nothing new
SPAN_TOL = 1e-10


@dataclass
class SompResult:
    """Rows kept by SOMP and how every row is rebuilt from them.

    Attributes:
        selected: indices of the kept rows, sorted.
        coef: A, (d, d') with ``W ≈ A @ W[selected]`` (least squares).
        error: ``‖W − A W_ω‖_F / ‖W‖_F``.
        order: the kept rows in the order SOMP picked them.
    """

    selected: np.ndarray
    coef: np.ndarray
    error: float
    order: np.ndarray


def somp(weight: np.ndarray, keep: int) -> SompResult:
    """Select ``keep`` rows of ``weight`` (d × m; higher-rank arrays are flattened per row).

    Raises:
        ValueError: ``keep`` outside [1, d].
    """
    w = np.asarray(weight, np.float64).reshape(len(weight), -1)
    d = w.shape[0]
    if not 1 <= keep <= d:
        raise ValueError(f"keep must be in [1, {d}], got {keep}")
    norms = np.linalg.norm(w, axis=1)
    live = norms > 0
    phi = np.zeros_like(w)
    phi[live] = w[live] / norms[live, None]
    corr = w @ phi.T                       # residual rows (initially W) against unit atoms
    atom_left = live.astype(np.float64)    # squared norm of each atom outside the picked span
    q_basis: list[np.ndarray] = []
    order: list[int] = []
    chosen = np.zeros(d, bool)
    for _ in range(keep):
        score = np.einsum("ij,ij->j", corr, corr)
        eligible = ~chosen & (atom_left > SPAN_TOL)
        if eligible.any():
            j = int(np.flatnonzero(eligible)[np.argmax(score[eligible])])
        else:  # every row is already in the span: the rest are free, take the largest
            j = int(np.flatnonzero(~chosen)[np.argmax(norms[~chosen])])
        chosen[j] = True
        order.append(j)
        if atom_left[j] <= SPAN_TOL:
            continue
        q = phi[j] - sum((b @ phi[j]) * b for b in q_basis) if q_basis else phi[j].copy()
        for b in q_basis:  # second Gram-Schmidt pass keeps the basis orthonormal
            q -= (b @ q) * b
        q /= np.linalg.norm(q)
        q_basis.append(q)
        pq = phi @ q
        corr -= np.outer(w @ q, pq)
        atom_left = np.maximum(atom_left - pq ** 2, 0.0)
    selected = np.sort(np.array(order, dtype=int))
    coef = scipy.linalg.lstsq(w[selected].T, w.T, cond=1e-12)[0].T
    total = np.linalg.norm(w)
    error = float(np.linalg.norm(w - coef @ w[selected]) / total) if total > 0 else 0.0
    return SompResult(selected, coef, error, np.array(order, dtype=int))
