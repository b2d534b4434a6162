"""float64 reference ops for the tests, independent of ONNX Runtime: obviously correct, slow.

``conv_nd`` follows the ONNX ``Conv`` operator (a cross-correlation, as in every
deep-learning framework) and ``gemm`` the ONNX ``Gemm`` operator; both compute
in float64 so that they can serve as ground truth for float32 runtimes.
``tests/test_linalg.py`` checks ``conv_nd`` against a per-output-pixel loop and
against ``scipy.signal.correlate``.
"""
from __future__ import annotations

import itertools

import numpy as np


def conv_nd(x, w, b=None, strides=None, pads=None, dilations=None, group=1) -> np.ndarray:
    """ONNX Conv (1-D, 2-D or 3-D) in float64.

    Args:
        x: input (N, C, *spatial).
        w: kernel (T, C/group, *k).
        b: optional bias (T,).
        strides, dilations: one int per spatial axis; default 1.
        pads: ONNX order ``[x1_begin, x2_begin, …, x1_end, x2_end, …]``; default 0.
        group: number of groups; C and T must be divisible by it.

    Returns:
        (N, T, *out) float64 with ``out_i = (in_i + pad_b + pad_e − dil·(k−1) − 1) // stride + 1``.
    """
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    d = x.ndim - 2
    if w.ndim != d + 2:
        raise ValueError(f"x {x.shape} and w {w.shape} disagree on the number of spatial axes")
    strides = list(strides or [1] * d)
    dilations = list(dilations or [1] * d)
    pads = list(pads or [0] * 2 * d)
    if len(strides) != d or len(dilations) != d or len(pads) != 2 * d:
        raise ValueError("strides/dilations need one value per spatial axis, pads two")
    t, cg = w.shape[0], w.shape[1]
    if x.shape[1] != cg * group or t % group:
        raise ValueError(f"channels: x has {x.shape[1]}, w {w.shape} with group={group}")
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[d + i]) for i in range(d)])
    kernel = w.shape[2:]
    out_sp = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
              for i in range(d)]
    if min(out_sp, default=1) < 1:
        raise ValueError(f"empty output {out_sp}")
    tg = t // group
    y = np.zeros((x.shape[0], t, *out_sp))
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * tg:(g + 1) * tg]
        # one strided view of the input per kernel offset: y += x[offset-shifted] · w[:, :, offset]
        for offs in itertools.product(*[range(k) for k in kernel]):
            sl = tuple(slice(o * dl, o * dl + (n - 1) * s + 1, s)
                       for o, dl, n, s in zip(offs, dilations, out_sp, strides))
            patch = xs[(slice(None), slice(None)) + sl]           # (N, cg, *out)
            y[:, g * tg:(g + 1) * tg] += np.einsum("nc...,tc->nt...", patch,
                                                   ws[(slice(None), slice(None)) + offs])
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, t) + (1,) * d)
    return y


def gemm(a, b, c=None, alpha=1.0, beta=1.0, trans_a=False, trans_b=False) -> np.ndarray:
    """ONNX Gemm in float64: ``alpha · op(a) @ op(b) + beta · c`` (c broadcast, optional)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    y = alpha * ((a.T if trans_a else a) @ (b.T if trans_b else b))
    return y if c is None else y + beta * np.asarray(c, np.float64)
