"""Tests of the pure-math decompositions (onnxlr.linalg) and of the numpy reference ops."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import scipy.signal
from hypothesis import given, settings
from hypothesis import strategies as st

from numpy_ref import conv_nd, gemm
from onnxlr.errors import OnnxlrError
from onnxlr.linalg import (CP, Tucker2, cp_conv, relative_error, singular_values, truncated_svd,
                           tucker2, unfolding_singular_values)
from onnxlr.linalg.cp import cp_to_tensor

KERNEL_SHAPES = [(6, 5, 3), (8, 6, 3, 3), (5, 4, 2, 3, 2)]


def rng(seed=0):
    return np.random.default_rng(seed)


def decaying_kernel(shape, seed=0):
    """A kernel with decaying channel spectra, like trained weights (random ones are flat)."""
    w = rng(seed).standard_normal(shape)
    t, s = shape[:2]
    w *= (1.0 + np.arange(t)).reshape((t,) + (1,) * (len(shape) - 1)) ** -1.0
    w *= (1.0 + np.arange(s)).reshape((1, s) + (1,) * (len(shape) - 2)) ** -1.0
    return w


def random_cp(shape, rank, seed=0):
    factors = [rng(seed).standard_normal((d, rank)) for d in shape]
    return cp_to_tensor(factors)


# ---------------------------------------------------------------- svd


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6), (1, 4)])
def test_truncated_svd_full_rank_is_exact(shape):
    w = rng().standard_normal(shape)
    a, b = truncated_svd(w, min(shape))
    assert a.dtype == b.dtype == np.float64
    assert a.shape == (shape[0], min(shape)) and b.shape == (min(shape), shape[1])
    assert relative_error(w, a @ b) < 1e-13
    np.testing.assert_allclose(a.T @ a, np.eye(min(shape)), atol=1e-13)


def test_truncated_svd_is_eckart_young_and_monotone():
    w = rng(1).standard_normal((12, 9)) @ np.diag(0.7 ** np.arange(9)) @ rng(2).standard_normal((9, 9))
    s = singular_values(w)
    exact = np.linalg.svd(w, compute_uv=False)
    # Gram-based: exact in energy (σ²) to ~ε·σ_max², not relatively for tiny σ
    np.testing.assert_allclose(s ** 2, exact ** 2, rtol=1e-10, atol=1e-13 * exact[0] ** 2)
    s = exact
    errors = []
    for k in range(1, 10):
        a, b = truncated_svd(w, k)
        err = relative_error(w, a @ b)
        expected = np.sqrt(np.sum(s[k:] ** 2) / np.sum(s ** 2))
        assert err == pytest.approx(expected, rel=1e-8, abs=1e-13)
        np.testing.assert_allclose(b, s[:k, None] * (a.T @ w / s[:k, None]), atol=1e-12)
        errors.append(err)
    assert all(e1 >= e2 for e1, e2 in zip(errors, errors[1:]))


def test_singular_values_descending_and_shape():
    w = rng().standard_normal((4, 10))
    s = singular_values(w)
    assert s.shape == (4,) and np.all(np.diff(s) <= 0)
    assert singular_values(w.T).shape == (4,)


def test_svd_input_errors():
    w = rng().standard_normal((4, 3))
    for k in (0, 4):
        with pytest.raises(ValueError):
            truncated_svd(w, k)
    with pytest.raises(ValueError):
        singular_values(np.zeros((2, 2, 2)))
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(OnnxlrError):
        truncated_svd(bad, 2)
    with pytest.raises(OnnxlrError):
        singular_values(bad)


def test_relative_error_zero_matrix():
    z = np.zeros((3, 3))
    assert relative_error(z, z) == 0.0
    assert relative_error(np.eye(2), np.eye(2)) == 0.0
    assert relative_error(np.eye(2), np.zeros((2, 2))) == pytest.approx(1.0)


# ---------------------------------------------------------------- tucker2


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_tucker2_full_rank_is_exact(shape):
    w = rng().standard_normal(shape)
    res = tucker2(w, shape[:2])
    assert isinstance(res, Tucker2)
    assert res.rel_error < 1e-12
    assert res.core.shape == shape
    np.testing.assert_array_equal(res.u_out, np.eye(shape[0]))
    np.testing.assert_array_equal(res.u_in, np.eye(shape[1]))
    assert relative_error(w, res.reconstruct()) < 1e-12


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_tucker2_shapes_orthonormal_and_error_is_true(shape):
    w = decaying_kernel(shape)
    r_out, r_in = shape[0] - 2, shape[1] - 1
    res = tucker2(w, (r_out, r_in))
    assert res.core.shape == (r_out, r_in) + shape[2:]
    assert res.u_out.shape == (shape[0], r_out) and res.u_in.shape == (shape[1], r_in)
    for u in (res.u_out, res.u_in):
        assert u.dtype == np.float64
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-12)
    assert res.rel_error == pytest.approx(relative_error(w, res.reconstruct()), rel=1e-10)
    # one mode at full rank: the other factor is the exact truncated SVD of its unfolding
    one = tucker2(w, (shape[0], r_in))
    s = unfolding_singular_values(w, 1)
    assert one.rel_error == pytest.approx(np.sqrt(np.sum(s[r_in:] ** 2) / np.sum(s ** 2)), rel=1e-8)


def test_tucker2_hooi_beats_hosvd_and_error_shrinks_with_rank():
    w = decaying_kernel((16, 12, 3, 3), seed=3) + 0.05 * rng(4).standard_normal((16, 12, 3, 3))
    for ranks in [(4, 3), (8, 6), (12, 9)]:
        hosvd = tucker2(w, ranks, n_iter_max=0)
        hooi = tucker2(w, ranks)
        assert hooi.rel_error <= hosvd.rel_error + 1e-12
    errors = [tucker2(w, (r, r)).rel_error for r in range(1, 13)]
    # HOOI finds a local optimum, so allow rounding-level slack only
    assert all(e2 <= e1 + 1e-9 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_tucker2_not_worse_than_tensorly():
    """tensorly's partial_tucker (HOOI on modes 0, 1) as an independent reference."""
    from tensorly.decomposition import partial_tucker
    w = decaying_kernel((10, 8, 3, 3), seed=5) + 0.05 * rng(6).standard_normal((10, 8, 3, 3))
    ranks = (5, 4)
    (core, (u_out, u_in)), _ = partial_tucker(w, ranks, modes=[0, 1], init="svd", n_iter_max=200,
                                              tol=1e-12)
    theirs = relative_error(w, np.einsum("oi...,to,si->ts...", core, u_out, u_in))
    ours = tucker2(w, ranks, n_iter_max=200, tol=1e-12).rel_error
    assert ours <= theirs + 1e-6


def test_unfolding_singular_values():
    w = rng().standard_normal((6, 4, 3, 2))
    s0 = unfolding_singular_values(w, 0)
    s1 = unfolding_singular_values(w, 1)
    np.testing.assert_allclose(s0, np.linalg.svd(w.reshape(6, -1), compute_uv=False), rtol=1e-9)
    np.testing.assert_allclose(s1, np.linalg.svd(np.moveaxis(w, 1, 0).reshape(4, -1),
                                                 compute_uv=False), rtol=1e-9)
    with pytest.raises(ValueError):
        unfolding_singular_values(w, 2)


@pytest.mark.parametrize("ranks", [(0, 2), (2, 0), (7, 2), (2, 5)])
def test_tucker2_rejects_bad_ranks(ranks):
    with pytest.raises(ValueError):
        tucker2(rng().standard_normal((6, 4, 3, 3)), ranks)


def test_tucker2_rejects_non_finite_and_bad_shapes():
    w = rng().standard_normal((4, 4, 3, 3))
    w[1, 2, 0, 0] = np.inf
    with pytest.raises(OnnxlrError):
        tucker2(w, (2, 2))
    with pytest.raises(ValueError):
        tucker2(np.ones((4, 4)), (2, 2))


def test_tucker2_zero_kernel():
    res = tucker2(np.zeros((4, 3, 3, 3)), (2, 2))
    assert res.rel_error == 0.0 and np.all(np.isfinite(res.core))


# ---------------------------------------------------------------- cp


def check_cp_layout(res, shape, rank):
    assert isinstance(res, CP)
    assert res.out_factor.shape == (shape[0], rank)
    assert res.in_factor.shape == (shape[1], rank)
    assert [f.shape for f in res.spatial] == [(k, rank) for k in shape[2:]]
    for f in [res.in_factor, *res.spatial]:
        assert f.dtype == np.float64
        np.testing.assert_allclose(np.linalg.norm(f, axis=0), 1.0, rtol=1e-12)
    lam = np.linalg.norm(res.out_factor, axis=0)
    assert np.all(np.diff(lam) <= 1e-12 * lam[0])  # sorted by decreasing weight


@pytest.mark.parametrize("shape,rank", [
    ((16, 12, 3, 3), 8),        # 2-D, R > spatial dims (direct GEVD start)
    ((10, 8, 5), 4),            # 1-D
    ((9, 7, 3, 2, 3), 6),       # 3-D
    ((24, 20, 3, 3), 20),       # R = S
])
def test_cp_recovers_exact_cp_kernel(shape, rank):
    w = random_cp(shape, rank, seed=sum(shape))
    res = cp_conv(w, rank)
    check_cp_layout(res, shape, rank)
    assert res.rel_error < 1e-6
    assert relative_error(w, res.reconstruct()) == pytest.approx(res.rel_error, rel=1e-6, abs=1e-12)


def test_cp_recovers_when_rank_exceeds_a_channel_dim():
    """R > S: no direct start, so random-start ALS (with line search) must get there."""
    shape, rank = (8, 6, 3, 3, 3), 7
    w = random_cp(shape, rank, seed=7)
    res = cp_conv(w, rank, max_iter=500)
    check_cp_layout(res, shape, rank)
    assert res.rel_error < 1e-6


def test_cp_general_kernel_improves_with_rank_and_restarts():
    w = decaying_kernel((12, 10, 3, 3), seed=8)
    e2 = cp_conv(w, 2).rel_error
    e10 = cp_conv(w, 10).rel_error
    assert 0 < e10 < e2 < 1
    one = cp_conv(w, 6, n_restarts=1)
    three = cp_conv(w, 6, n_restarts=3)
    assert three.rel_error <= one.rel_error + 1e-12
    assert three.iterations >= one.iterations


def test_cp_is_deterministic():
    w = decaying_kernel((10, 9, 3, 3), seed=9)
    a, b = cp_conv(w, 12, n_restarts=2, seed=3), cp_conv(w, 12, n_restarts=2, seed=3)
    for fa, fb in zip([a.out_factor, a.in_factor, *a.spatial], [b.out_factor, b.in_factor, *b.spatial]):
        np.testing.assert_array_equal(fa, fb)
    assert a.rel_error == b.rel_error


def test_cp_respects_max_seconds():
    w = rng(10).standard_normal((96, 96, 3, 3))
    t0 = time.perf_counter()
    res = cp_conv(w, 90, max_iter=10**6, max_seconds=0.5, tol=0.0, n_restarts=5)
    wall = time.perf_counter() - t0
    assert res.iterations < 10**6
    assert res.iterations >= 1
    # one sweep here takes a few ms, so 10**6 sweeps would take an hour: stopping at all is
    # the limit working; the bound on the wall time is loose because a loaded 2-core machine
    # stretches the set-up and the final error (2.5 s measured under load 7)
    assert res.seconds < 15 and wall < 20
    assert np.isfinite(res.rel_error) and res.rel_error < 1.0


def test_cp_rank_larger_than_kernel():
    w = rng(11).standard_normal((4, 3, 3))
    res = cp_conv(w, 20, max_iter=300)
    check_cp_layout(res, w.shape, 20)
    assert res.rel_error < 1e-3


def test_cp_one_by_one_kernel_is_matrix_factorisation():
    w = rng(12).standard_normal((9, 7, 1, 1))
    res = cp_conv(w, 3, max_iter=500, tol=1e-12)
    s = np.linalg.svd(w.reshape(9, 7), compute_uv=False)
    assert res.rel_error == pytest.approx(np.sqrt(np.sum(s[3:] ** 2) / np.sum(s ** 2)), rel=1e-4)


def test_cp_input_errors_and_zero_kernel():
    w = rng().standard_normal((4, 4, 3, 3))
    with pytest.raises(ValueError):
        cp_conv(w, 0)
    with pytest.raises(ValueError):
        cp_conv(w, 2, n_restarts=0)
    with pytest.raises(ValueError):
        cp_conv(np.ones((3, 3)), 2)
    bad = w.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(OnnxlrError):
        cp_conv(bad, 2)
    zero = cp_conv(np.zeros((4, 3, 2, 2)), 2)
    assert zero.rel_error == 0.0 and np.all(zero.reconstruct() == 0)


# ---------------------------------------------------------------- numpy_ref


def conv_loop(x, w, b, strides, pads, dilations, group):
    """Conv by the definition, one output element at a time (independent of conv_nd)."""
    n, c = x.shape[:2]
    d = x.ndim - 2
    t, cg = w.shape[:2]
    k = w.shape[2:]
    out = [(x.shape[2 + i] + pads[i] + pads[d + i] - dilations[i] * (k[i] - 1) - 1) // strides[i] + 1
           for i in range(d)]
    y = np.zeros((n, t, *out))
    tg = t // group
    for bi, ti in itertools.product(range(n), range(t)):
        g = ti // tg
        for o in itertools.product(*map(range, out)):
            acc = 0.0 if b is None else float(b[ti])
            for ci in range(cg):
                for kk in itertools.product(*map(range, k)):
                    pos = [o[i] * strides[i] - pads[i] + kk[i] * dilations[i] for i in range(d)]
                    if all(0 <= p < x.shape[2 + i] for i, p in enumerate(pos)):
                        acc += x[(bi, g * cg + ci, *pos)] * w[(ti, ci, *kk)]
            y[(bi, ti, *o)] = acc
    return y


@pytest.mark.parametrize("d,strides,pads,dilations,group", [
    (1, [2], [1, 2], [1], 1),
    (2, [1, 1], [0, 0, 0, 0], [1, 1], 1),
    (2, [2, 1], [1, 0, 2, 1], [1, 2], 2),
    (2, [1, 2], [1, 1, 1, 1], [2, 1], 4),   # depthwise
    (3, [1, 2, 1], [1, 0, 0, 0, 1, 1], [1, 1, 2], 2),
])
def test_conv_nd_matches_loop(d, strides, pads, dilations, group):
    r = rng(d + group)
    c, t = 4, 4 if group == 4 else 6
    x = r.standard_normal((2, c) + (7, 6, 5)[:d])
    w = r.standard_normal((t, c // group) + (3, 2, 2)[:d])
    b = r.standard_normal(t)
    expected = conv_loop(x, w, b, strides, pads, dilations, group)
    got = conv_nd(x, w, b, strides, pads, dilations, group)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 2), stride=st.integers(1, 3), pad=st.integers(0, 2), dil=st.integers(1, 2),
       group=st.sampled_from([1, 2]), k=st.integers(1, 3), seed=st.integers(0, 1000))
def test_conv_nd_matches_loop_property(d, stride, pad, dil, group, k, seed):
    r = rng(seed)
    x = r.standard_normal((1, 4) + (6,) * d)
    w = r.standard_normal((4, 4 // group) + (k,) * d)
    args = ([stride] * d, [pad] * d + [pad + 1] * d, [dil] * d, group)
    np.testing.assert_allclose(conv_nd(x, w, None, *args), conv_loop(x, w, None, *args),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_conv_nd_matches_scipy_correlate(d):
    r = rng(20 + d)
    x = r.standard_normal((1, 1) + (6, 5, 4)[:d])
    w = r.standard_normal((1, 1) + (3, 2, 2)[:d])
    expected = scipy.signal.correlate(x[0, 0], w[0, 0], mode="valid")
    np.testing.assert_allclose(conv_nd(x, w)[0, 0], expected, rtol=1e-12, atol=1e-12)
    full = scipy.signal.correlate(x[0, 0], w[0, 0], mode="full")
    pads = [k - 1 for k in w.shape[2:]] * 2
    np.testing.assert_allclose(conv_nd(x, w, pads=pads)[0, 0], full, rtol=1e-12, atol=1e-12)


def test_gemm():
    r = rng(30)
    a, b, c = r.standard_normal((3, 4)), r.standard_normal((5, 4)), r.standard_normal(5)
    np.testing.assert_allclose(gemm(a, b, c, 0.5, 2.0, trans_b=True), 0.5 * a @ b.T + 2.0 * c)
    np.testing.assert_allclose(gemm(a.T, b.T, None, trans_a=True), a @ b.T)
    np.testing.assert_allclose(gemm(a, b.T), a @ b.T)


@pytest.mark.parametrize("shape", [(40, 130), (130, 40)])
def test_truncated_svd_gram_route_matches_lapack(monkeypatch, shape):
    """Big long matrices take the Gram route; it must give the Eckart–Young optimum too."""
    import onnxlr.linalg.svd as svd_mod
    r = np.random.default_rng(3)
    w = r.standard_normal(shape) @ np.diag(np.geomspace(1, 1e-3, shape[1]))
    k = 12
    a_ref, b_ref = svd_mod.truncated_svd(w, k)
    monkeypatch.setattr(svd_mod, "GRAM_MIN_DIM", 16)
    a, b = svd_mod.truncated_svd(w, k)
    np.testing.assert_allclose(a @ b, a_ref @ b_ref, atol=1e-9 * np.abs(w).max())
    np.testing.assert_allclose(a.T @ a, np.eye(k), atol=1e-10)
    s = np.linalg.svd(w, compute_uv=False)
    assert np.linalg.norm(w - a @ b) == pytest.approx(np.sqrt((s[k:] ** 2).sum()), rel=1e-9)


def test_truncated_svd_reuses_one_full_svd_per_matrix_and_stays_bounded(monkeypatch):
    """Ranks of the same matrix share one LAPACK SVD (a search asks for four); the factors
    handed out are the caller's own arrays, and the cache never holds more than its bound."""
    import scipy.linalg
    from onnxlr.linalg import svd as svd_mod
    calls = []
    real = scipy.linalg.svd
    monkeypatch.setattr(svd_mod.scipy.linalg, "svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(svd_mod, "_svd_cache", svd_mod.OrderedDict())
    w = np.random.default_rng(3).standard_normal((40, 60))
    for k in (4, 8, 16):
        a, b = svd_mod.truncated_svd(w, k)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        ref = (u[:, :k] * s[:k]) @ vt[:k]
        np.testing.assert_allclose(a @ b, ref, atol=1e-10)
        a[:] = 0.0  # the caller's copy: the cached SVD must not change
    assert len(calls) == 1
    a, b = svd_mod.truncated_svd(w, 8)
    np.testing.assert_allclose(a @ b, (u[:, :8] * s[:8]) @ vt[:8], atol=1e-10)
    monkeypatch.setattr(svd_mod, "SVD_CACHE_BYTES", 3 * 8 * (40 * 40 + 40 + 40 * 60))
    for seed in range(5):
        svd_mod.truncated_svd(np.random.default_rng(seed).standard_normal((40, 60)), 4)
    assert sum(x.nbytes for v in svd_mod._svd_cache.values() for x in v) <= svd_mod.SVD_CACHE_BYTES


def test_output_error_matches_samples_in_float64():
    """The calibration output error from the statistics equals the one computed on the
    samples themselves (numpy float64 reference)."""
    from onnxlr.linalg.whiten import LayerStats, output_error
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12)) + 0.3
    a = rng.standard_normal((7, 12))
    approx = a + 0.1 * rng.standard_normal((7, 12))
    stats = LayerStats(x.T @ x / len(x), x.mean(0), len(x))
    y, yh = x @ a.T, x @ approx.T
    ref = np.sqrt(np.mean(np.sum((y - yh) ** 2, 1)) / np.mean(np.sum((y - y.mean(0)) ** 2, 1)))
    assert output_error(a, approx, stats) == pytest.approx(ref, rel=1e-9)
    shift = (a - approx) @ x.mean(0)
    ref2 = np.sqrt(np.mean(np.sum((y - yh - shift) ** 2, 1)) / np.mean(np.sum((y - y.mean(0)) ** 2, 1)))
    assert output_error(a, approx, stats, shift) == pytest.approx(ref2, rel=1e-9)
    assert output_error(a, approx, stats) == pytest.approx(ref, rel=1e-9)  # cached spread
