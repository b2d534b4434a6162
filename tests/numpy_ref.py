"""float64 reference ops for the tests, independent of ONNX Runtime: obviously correct, slow."""
from __future__ import annotations

import itertools

import numpy as np


def conv_nd(x, w, b=None, strides=None, pads=None, dilations=None, group=1):
    """ONNX Conv in float64. x: (N, C, *spatial); w: (T, C/group, *k); pads [b1.., e1..]."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    d = x.ndim - 2
    strides = list(strides or [1] * d)
    dilations = list(dilations or [1] * d)
    pads = list(pads or [0] * 2 * d)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[d + i]) for i in range(d)])
    kernel = w.shape[2:]
    out_sp = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
              for i in range(d)]
    t, cg = w.shape[0], w.shape[1]
    tg = t // group
    y = np.zeros((x.shape[0], t, *out_sp))
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * tg:(g + 1) * tg]
        for offs in itertools.product(*[range(k) for k in kernel]):
            sl = tuple(slice(o * dl, o * dl + (n - 1) * s + 1, s)
                       for o, dl, n, s in zip(offs, dilations, out_sp, strides))
            patch = xs[(slice(None), slice(None)) + sl]           # (N, cg, *out)
            y[:, g * tg:(g + 1) * tg] += np.einsum("nc...,tc->nt...", patch,
                                                   ws[(slice(None), slice(None)) + offs])
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, t) + (1,) * d)
    return y


def gemm(a, b, c=None, alpha=1.0, beta=1.0, trans_a=False, trans_b=False):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    y = alpha * ((a.T if trans_a else a) @ (b.T if trans_b else b))
    return y if c is None else y + beta * np.asarray(c, np.float64)
