r"""Adaptive Fastfood fitted to a dense layer after training (pure numpy, no ONNX).

Yang et al., "Deep Fried Convnets" (ICCV 2015, arXiv 1412.7149) replace a dense
``d → n`` layer by stacked Adaptive Fastfood blocks. With ``D`` the input size
padded to a power of two and ``H`` the orthonormal Walsh–Hadamard matrix
(``scipy.linalg.hadamard(D) / √D``), block ``j`` is the ``D × D`` matrix

    V_j = S_j · H · G_j · Π_j · H · B_j        (S, G, B diagonal, Π_j a fixed permutation)

and the layer becomes the first ``n`` rows of ``[V_1; V_2; …]`` (``⌈n/D⌉`` blocks):
``3·D`` numbers per block instead of ``n·d``, and ``O(n log D)`` operations per
input row instead of ``O(n·d)``. The paper learns ``S, G, B`` end to end; here they are
fitted after training to an existing weight ``W`` (``n × d``), which is a much harder
problem: ``3D`` numbers cannot represent a general ``n × d`` matrix, and the fit error
on trained layers is large. It is reported as it is.

**The fit.** Given the input covariance ``Σ`` (identity when no calibration data exists:
then the objective is ``‖V − W‖_F²``, the expected output error on isotropic Gaussian
inputs), minimise ``tr((V − W) Σ (V − W)ᵀ)``. ``V`` is linear in each of ``S``, ``G`` and
``B`` with the other two fixed, so alternating least squares solves each group exactly:

* ``S``: one scalar per output row, ``s_i = f_i Σ w_iᵀ / f_i Σ f_iᵀ``.
* ``G``: normal matrix ``(Hₙᵀ diag(s²) Hₙ) ⊙ (P Σ Pᵀ)`` with ``P = Π H B``; both factors
  are dyadic (XOR-)Toeplitz when ``Σ`` is diagonal, so they cost ``O(D²)``, then one
  ``D × D`` Cholesky solve.
* ``B``: normal matrix ``(MᵀM) ⊙ Σ`` with ``M = S Hₙ G Π H``: diagonal when ``Σ`` is.

Each step cannot increase the objective. Blocks own disjoint output rows, so each is
fitted on its own. With an input mean ``μ`` the output bias absorbs ``−(V − W) μ``.

**Starts.** From a random start (B = ±1, G Gaussian) the ALS stalls in a poor local
minimum on about 5 of 6 exactly representable blocks (measured at D = 16…256; joint
L-BFGS did no better). For a square block (``n_b = d = D``) :func:`_structural_start`
reads S and B off the matrix itself and recovers such blocks to ~1e-10; each block keeps
the better of the two starts.

**Low-rank correction** (optional): ``V + U Vᵗ`` with ``U Vᵗ`` of rank ``k``, fitted by
alternating the Fastfood fit on ``W − U Vᵗ`` and the Σ-weighted truncated SVD of
``W − V`` (the best rank-``k`` correction for fixed ``V``).

numpy and scipy have no fast Walsh–Hadamard transform (scipy only builds the dense
matrix), hence :func:`fwht`.

Two modules: ``structure`` (the blocks, :func:`fwht`, applying and expanding a fit) and
``fit`` (:func:`fit_fastfood`); everything is re-exported here.
"""
from __future__ import annotations

from onnxlr.linalg.fastfood.fit import MAX_DIM, STRUCTURAL_KEEP, fit_fastfood
from onnxlr.linalg.fastfood.structure import (FastfoodBlock, FastfoodFit, fastfood_apply,
                                              fastfood_matrix, fwht, next_pow2, permutations)

__all__ = ["MAX_DIM", "STRUCTURAL_KEEP", "FastfoodBlock", "FastfoodFit", "fastfood_apply",
           "fastfood_matrix", "fit_fastfood", "fwht", "next_pow2", "permutations"]
