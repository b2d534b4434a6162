"""A LASSO in Gram form, and the λ path that keeps exactly ``keep`` coefficients.

``argmin_β ½βᵀGβ − bᵀβ + λ‖β‖₁`` with ``G`` a C × C channel Gram: the channel selection of
:mod:`onnxlr.linalg.channel_select` (He et al. 2017) solves it for a decreasing λ until the
wanted number of channels is in. FISTA (vectorised: one C×C product per iteration) rather
than coordinate descent, whose per-coordinate Python loop measured 17-80× slower here
(C = 64: 1.0 s vs 0.06 s; C = 256: 5.6 s vs 0.07 s, same support).
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ["lasso_gram", "lasso_select"]


def lasso_gram(g: np.ndarray, b: np.ndarray, lam: float, beta: np.ndarray | None = None, *,
               tol: float = 1e-9, max_iter: int = 20000) -> np.ndarray:
    """``argmin_β ½βᵀGβ − bᵀβ + λ‖β‖₁`` by FISTA (Beck & Teboulle 2009) with adaptive restart
    (O'Donoghue & Candès 2015): one C×C product per iteration, step 1/λ_max(G).

    Stops when an iteration moves no contribution by more than ``tol``·√max(G_cc).
    """
    c = len(b)
    beta = np.zeros(c) if beta is None else np.array(beta, np.float64)
    diag = np.maximum(np.diag(g), 0.0)
    lip = float(scipy.linalg.eigvalsh(g, subset_by_index=[c - 1, c - 1])[0]) if c else 0.0
    if lip <= 0:
        return np.zeros(c)
    scale = tol * np.sqrt(diag.max())
    weight = np.sqrt(diag)
    z, t = beta.copy(), 1.0
    for _ in range(max_iter):
        u = z - (g @ z - b) / lip
        new = np.sign(u) * np.maximum(np.abs(u) - lam / lip, 0.0)
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        if (new - beta) @ (z - new) > 0:   # momentum points uphill: restart it
            t_next, z = 1.0, new.copy()
        else:
            z = new + (t - 1) / t_next * (new - beta)
        moved = float(np.max(np.abs(new - beta) * weight))
        beta, t = new, t_next
        if moved <= scale:
            break
    return beta


def lasso_select(g: np.ndarray, b: np.ndarray, keep: int, *, shrink: float = 0.8,
                 max_bisect: int = 60) -> tuple[np.ndarray, np.ndarray, float]:
    """Exactly ``keep`` channels from the LASSO path (see the module docstring, item 4).

    Returns:
        (sorted support, β at the chosen λ, λ).
    """
    c = len(b)
    live = np.flatnonzero(np.diag(g) > 0)
    if keep >= len(live):
        extra = [j for j in np.argsort(-np.diag(g)) if j not in set(live)][:keep - len(live)]
        return np.sort(np.concatenate([live, extra]).astype(int)), np.ones(c), 0.0
    lam_hi = float(np.max(np.abs(b)))
    beta_hi = np.zeros(c)
    lam, beta = lam_hi, beta_hi
    while True:  # geometric path down from λ_max until enough channels are in
        lam *= shrink
        beta = lasso_gram(g, b, lam, beta_hi)
        nnz = np.count_nonzero(beta)
        if nnz >= keep or lam < 1e-14 * lam_hi:
            break
        lam_hi, beta_hi = lam, beta
    lam_lo, beta_lo = lam, beta
    for _ in range(max_bisect if nnz != keep else 0):
        mid = np.sqrt(lam_lo * lam_hi)
        beta = lasso_gram(g, b, mid, beta_hi)
        nnz = np.count_nonzero(beta)
        if nnz == keep:
            lam_lo, beta_lo = mid, beta
            break
        if nnz > keep:
            lam_lo, beta_lo = mid, beta
        else:
            lam_hi, beta_hi = mid, beta
        if lam_hi - lam_lo <= 1e-12 * lam_hi:
            break
    strength = np.abs(beta_lo) * np.sqrt(np.maximum(np.diag(g), 0.0))
    support = np.argsort(-strength, kind="stable")[:keep]
    return np.sort(support), beta_lo, float(lam_lo)
