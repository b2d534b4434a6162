"""Property-based tests (hypothesis) over random Conv / Gemm / MatMul layers.

For random shapes and attributes (1-D/2-D/3-D convs, strides, pads, auto_pad,
dilations, bias; Gemm transposes, alpha, beta, C shapes; N-D MatMul):
- at full rank every method's chain computes the original layer (float32 tolerance);
- every rewritten model passes ``onnx.checker`` (full check) and runs in ONNX Runtime;
- the error never grows with the rank. For SVD the *output* error: with
  W − W_k = Σ_{i>k} σ_i u_i v_iᵀ and orthonormal u_i (v_i), the residual's squared
  norm is Σ_{i>k} σ_i² ‖X u_i‖² (‖v_i ⋆ x‖² for a conv), a sum that loses terms as k
  grows. For Tucker-2 the *weight* error, which is what it minimises;
- ``optimize`` on such a layer never fails with anything but a user error.
Few examples, no deadline, derandomised: fast and reproducible on CI.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from conftest import conv_model, gemm_model, matmul_model, ort_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_methods import rewrite

from onnxlr.pipeline import optimize
from onnxlr.records import FACTORISED

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


@st.composite
def conv_layers(draw):
    """(weight, bias, input shape, attrs) of a valid ONNX Conv with a non-empty output."""
    d = draw(st.integers(1, 3))
    t, s = draw(st.integers(2, 6)), draw(st.integers(1, 5))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(d))
    strides = [draw(st.integers(1, 2)) for _ in range(d)]
    dilations = [draw(st.integers(1, 2)) for _ in range(d)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    attrs = {"strides": strides, "dilations": dilations}
    if auto_pad == "NOTSET":
        attrs["pads"] = [draw(st.integers(0, k - 1)) for k in kernel] * 2
    else:
        attrs["auto_pad"] = auto_pad
        if auto_pad != "VALID":  # ORT: "Dilation not supported for AutoPadType::SAME_*"
            attrs["dilations"] = dilations = [1] * d
    spatial = tuple(draw(st.integers((k - 1) * dl + 1, (k - 1) * dl + 5))
                    for k, dl in zip(kernel, dilations))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((t, s) + kernel).astype(np.float32)
    b = rng.standard_normal(t).astype(np.float32) if draw(st.booleans()) else None
    return w, b, (draw(st.integers(1, 2)), s) + spatial, attrs, seed


@st.composite
def gemm_layers(draw):
    m, k, n = draw(st.integers(1, 6)), draw(st.integers(2, 12)), draw(st.integers(2, 12))
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c_shape = draw(st.sampled_from([None, (n,), (m, n), (1, n)]))
    c = None if c_shape is None else rng.standard_normal(c_shape).astype(np.float32)
    attrs = {"transA": trans_a, "transB": trans_b,
             "alpha": draw(st.sampled_from([1.0, 0.5, -2.0])),
             "beta": draw(st.sampled_from([1.0, 0.0, 3.0]))}
    return b, c, (k, m) if trans_a else (m, k), attrs, rng


@st.composite
def matmul_layers(draw):
    lead = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3))))
    k, n = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return rng.standard_normal((k, n)).astype(np.float32), lead + (k,), rng


def cp_kernel(w: np.ndarray, rank: int, seed: int) -> np.ndarray:
    """A kernel of the same shape with exact CP rank ``rank``: CP's 'full rank' case."""
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((n, rank)) for n in w.shape]
    letters = "abcde"[: w.ndim]
    spec = ",".join(f"{c}r" for c in letters) + "->" + letters
    return np.einsum(spec, *factors).astype(np.float32)


def full_ranks(method: str, w: np.ndarray) -> tuple[int, ...]:
    if method == "tucker":
        return tuple(w.shape[:2])
    if method == "cp":
        return (3,)
    return (min(w.shape[0], int(np.prod(w.shape[1:]))),)


@SETTINGS
@given(conv_layers(), st.sampled_from(["svd", "tucker", "cp"]))
def test_conv_full_rank_is_the_original(layer, method):
    w, b, x_shape, attrs, seed = layer
    if method == "tucker" and all(k == 1 for k in w.shape[2:]):
        method = "svd"  # a 1×1 conv is an SVD layer, not a Tucker one
    if method == "cp":
        w = cp_kernel(w, 3, seed)
    model = conv_model(w, b, x_shape, **attrs)
    out, _ = rewrite(model, method, full_ranks(method, w))  # full onnx.checker inside
    x = np.random.default_rng(seed + 1).standard_normal(x_shape).astype(np.float32)
    expected = ort_run(model, {"x": x})[0]
    actual = ort_run(out, {"x": x})[0]
    assert actual.shape == expected.shape
    assert rel(expected, actual) < (1e-4 if method == "cp" else 1e-5)


@SETTINGS
@given(gemm_layers())
def test_gemm_full_rank_is_the_original(layer):
    b, c, a_shape, attrs, rng = layer
    model = gemm_model(b, c, a_shape=a_shape, **attrs)
    k = min(b.shape)
    out, _ = rewrite(model, "svd", (k,))
    a = rng.standard_normal(a_shape).astype(np.float32)
    expected, actual = ort_run(model, {"a": a})[0], ort_run(out, {"a": a})[0]
    assert rel(expected, actual) < 1e-5 or np.abs(expected - actual).max() < 1e-5


@SETTINGS
@given(matmul_layers())
def test_matmul_full_rank_is_the_original(layer):
    w, x_shape, rng = layer
    model = matmul_model(w, x_shape)
    out, _ = rewrite(model, "svd", (min(w.shape),))
    x = rng.standard_normal(x_shape).astype(np.float32)
    assert rel(ort_run(model, {"x": x})[0], ort_run(out, {"x": x})[0]) < 1e-5


def _errors_by_rank(model, feeds, method, ranks_list):
    expected = ort_run(model, feeds)[0]
    errors = []
    for ranks in ranks_list:
        out, _ = rewrite(model, method, ranks)  # checker-valid at every rank
        errors.append(rel(expected, ort_run(out, feeds)[0]))
    return errors


def _non_increasing(errors, slack=2e-5):
    assert all(b <= a + slack for a, b in zip(errors, errors[1:])), errors


@SETTINGS
@given(st.one_of(conv_layers().map(lambda l: ("conv", l)),
                 gemm_layers().map(lambda l: ("gemm", l)),
                 matmul_layers().map(lambda l: ("matmul", l))))
def test_svd_output_error_never_grows_with_rank(case):
    kind, layer = case
    if kind == "conv":
        w, b, x_shape, attrs, seed = layer
        model = conv_model(w, b, x_shape, **attrs)
        feeds = {"x": np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)}
        full = min(w.shape[0], int(np.prod(w.shape[1:])))
    elif kind == "gemm":
        b, c, a_shape, attrs, rng = layer
        model = gemm_model(b, c, a_shape=a_shape, **attrs)
        feeds = {"a": rng.standard_normal(a_shape).astype(np.float32)}
        full = min(b.shape)
    else:
        w, x_shape, rng = layer
        model = matmul_model(w, x_shape)
        feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
        full = min(w.shape)
    errors = _errors_by_rank(model, feeds, "svd", [(k,) for k in range(1, full + 1)])
    _non_increasing(errors)
    assert errors[-1] < 1e-5


@SETTINGS
@given(conv_layers())
def test_tucker_weight_error_never_grows_with_rank(layer):
    """Tucker-2 ranks grown together along (r_out, r_in). What Tucker minimises is the weight's
    error (the output error on one input may wobble: the factors are not nested across ranks)."""
    w, b, x_shape, attrs, _ = layer
    t, s = w.shape[:2]
    steps = max(t, s)
    ranks = sorted({(max(1, math.ceil(t * i / steps)), max(1, math.ceil(s * i / steps)))
                    for i in range(1, steps + 1)})
    model = conv_model(w, b, x_shape, **attrs)
    errors = [rewrite(model, "tucker", r)[1].weight_error for r in ranks]
    _non_increasing(errors, slack=1e-6)
    assert errors[-1] < 1e-6


@SETTINGS
@given(conv_layers(), st.sampled_from(["0.3", "0.6", "energy:0.9", "vbmf", "2"]),
       st.sampled_from(["auto", "cp", "svd"]))
def test_optimize_on_random_layers_is_valid_or_declines(layer, rank, method):
    w, b, x_shape, attrs, _ = layer
    model = conv_model(w, b, x_shape, **attrs)
    out, report = optimize(model, method, rank, max_error=None, cp_max_seconds=2.0)
    onnx.checker.check_model(out, full_check=True)
    (rec,) = report.records
    assert rec.status == FACTORISED or rec.reason
    assert report.comparison is not None and np.isfinite(report.output_error)
