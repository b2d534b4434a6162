"""Activation-aware factorisation on synthetic layers whose answer is known.

Whitened SVD (onnxlr.linalg.whiten) must reproduce a layer's outputs exactly at
rank r when its inputs span an r-dimensional subspace, where weight SVD cannot;
the Tucker/CP refit must lower the layer's output error on calibration data.
References are float64 numpy (tests/numpy_ref.py) or the original model in ORT.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import init, make_model, ort_run, vinfo
from numpy_ref import conv_nd
from onnx import helper

from onnxlr.activations import collect_layer_stats, conv_geometry, conv_patches
from onnxlr.graph import to_graph, to_model
from onnxlr.linalg.whiten import LayerStats, output_error, whitened_svd, whitener
from onnxlr.methods import parse_method
from onnxlr.passes.factorize import Factorize, FactorizeConfig
from onnxlr.rank import parse_rank
from onnxlr.sites import find_site


def factorise(model, method, rank, stats=None):
    config = FactorizeConfig(methods=parse_method(method), rank=parse_rank(rank),
                             calibration=stats)
    graph = to_graph(model)
    result = Factorize(config)(graph)
    out = to_model(graph, model)
    onnx.checker.check_model(out)
    return out, result.records


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def subspace_rows(rng, n, dim, r, offset=1.0):
    """n rows in an r-dimensional linear subspace of R^dim, with a non-zero mean."""
    basis = rng.standard_normal((r, dim))
    return ((rng.standard_normal((n, r)) + offset) @ basis).astype(np.float32)


def gemm_layer(rng, k=16, n=12, trans_b=True):
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    node = helper.make_node("Gemm", ["a", "B", "C"], ["y"], name="fc", transB=int(trans_b))
    return make_model([node], [vinfo("a", ["N", k])], [vinfo("y", ["N", n])],
                      [init("B", w), init("C", c)])


def matmul_layer(rng, k=16, n=12):
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")
    return make_model([node], [vinfo("x", ["N", 5, k])], [vinfo("y", ["N", 5, n])],
                      [init("W", rng.standard_normal((k, n)).astype(np.float32))])


@pytest.mark.parametrize("trans_b", [True, False])
def test_whitened_svd_exact_on_input_subspace_gemm(rng, trans_b):
    model = gemm_layer(rng, trans_b=trans_b)
    rows = subspace_rows(rng, 400, 16, 3)
    calib, test = {"a": rows[:300]}, rows[300:]
    stats = collect_layer_stats(model, calib)
    assert set(stats) == {"fc"} and stats["fc"].count == 300
    ref = ort_run(model, {"a": test})[0]
    aware, records = factorise(model, "svd", "3", stats)
    free, _ = factorise(model, "svd", "3")
    assert records[0].ranks == (3,) and records[0].extra["data_aware"]
    assert "eigen fallback" in records[0].extra["notes"]  # covariance of rank 3 of 16
    assert rel(ort_run(aware, {"a": test})[0], ref) < 1e-5
    assert rel(ort_run(free, {"a": test})[0], ref) > 0.05


def test_whitened_svd_exact_on_input_subspace_matmul(rng):
    model = matmul_layer(rng)
    x = subspace_rows(rng, 60 * 5, 16, 4, offset=0.0).reshape(60, 5, 16)
    stats = collect_layer_stats(model, {"x": x[:40]})
    aware, records = factorise(model, "svd", "4", stats)
    free, _ = factorise(model, "svd", "4")
    ref = ort_run(model, {"x": x[40:]})[0]
    assert rel(ort_run(aware, {"x": x[40:]})[0], ref) < 1e-5
    assert rel(ort_run(free, {"x": x[40:]})[0], ref) > 0.05
    # a bare MatMul has no bias to absorb a shift: nothing but two MatMuls is emitted
    assert [n.op_type for n in aware.graph.node] == ["MatMul", "MatMul"]


def test_rank_rule_applies_to_the_whitened_spectrum(rng):
    model = gemm_layer(rng)
    stats = collect_layer_stats(model, {"a": subspace_rows(rng, 200, 16, 3)})
    site = find_site(to_graph(model).nodes[0])
    from onnxlr.methods.svd import SvdMethod
    energy = parse_rank("energy:0.999")
    assert SvdMethod().choose_ranks(site, energy, 1, stats=stats["fc"]) == (3,)
    assert SvdMethod().choose_ranks(site, energy, 1)[0] > 3


def test_output_error_formula_matches_samples(rng):
    """The second-moment error equals the error measured on the rows themselves."""
    x = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8)) + 2.0
    stats = LayerStats(x.T @ x / len(x), x.mean(axis=0), len(x))
    a = rng.standard_normal((6, 8))
    for centred in (True, False):
        ws = whitened_svd(a, stats, 3, centred=centred)
        approx = ws.left @ ws.right
        shift = ws.shift if centred else np.zeros(6)
        resid = x @ (a - approx).T - shift
        spread = (x - x.mean(axis=0)) @ a.T
        expect = np.sqrt((resid ** 2).sum() / (spread ** 2).sum())
        assert ws.output_error == pytest.approx(expect, rel=1e-8)
        assert output_error(a, approx, stats, ws.shift) == pytest.approx(expect, rel=1e-8)
    # the whitened optimum beats weight SVD in the output metric, at the same rank
    u, s, vt = np.linalg.svd(a)
    weight_svd = (u[:, :3] * s[:3]) @ vt[:3]
    best = whitened_svd(a, stats, 3, centred=True)
    assert best.output_error < output_error(a, weight_svd, stats, (a - weight_svd) @ stats.mean)


def test_whitener_cholesky_and_fallbacks(rng):
    m = rng.standard_normal((6, 6))
    cov = m @ m.T + np.eye(6)
    wh = whitener(cov)
    assert wh.method == "cholesky"
    np.testing.assert_allclose(wh.factor, np.linalg.cholesky(cov), rtol=1e-10)
    low = rng.standard_normal((6, 2))
    for bad in (low @ low.T, low @ low.T + 1e-13 * np.eye(6)):  # singular, ill-conditioned
        wh = whitener(bad)
        assert wh.method.startswith("eigen fallback") and "4 of 6 eigenvalues floored" in wh.method
        np.testing.assert_allclose(wh.factor @ wh.factor.T, low @ low.T, atol=1e-8)
        np.testing.assert_allclose(wh.inverse @ wh.factor, np.eye(6), atol=1e-8)
    # a direction never seen in calibration maps to the output projected on the kept
    # subspace (what weight SVD would do with it), not to zero
    x = rng.standard_normal((300, 2)) @ low.T
    stats = LayerStats(x.T @ x / 300, x.mean(axis=0), 300)
    a = rng.standard_normal((5, 6))
    ws = whitened_svd(a, stats, 2, centred=False)
    unseen = np.linalg.svd(low.T)[2][-1]  # orthogonal to the calibration subspace
    proj = ws.left @ ws.left.T
    np.testing.assert_allclose(ws.left @ ws.right @ unseen, proj @ a @ unseen, atol=1e-6)
    assert np.linalg.norm(proj @ a @ unseen) > 0.1
    dead = LayerStats(np.zeros((6, 6)), np.zeros(6), 10)  # an input that never varies
    ws = whitened_svd(rng.standard_normal((4, 6)), dead, 2, centred=True)
    assert np.all(ws.left == 0) and np.all(ws.right == 0) and ws.output_error == 0.0


@pytest.mark.parametrize("shape,attrs", [
    ((2, 3, 9, 8), dict(kernel_shape=[3, 3], pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2])),
    ((2, 3, 9, 8), dict(kernel_shape=[3, 2], auto_pad="SAME_UPPER", strides=[2, 2])),
    ((2, 3, 11), dict(kernel_shape=[4], pads=[2, 1], strides=[3])),
    ((1, 2, 5, 4, 6), dict(kernel_shape=[2, 3, 2], pads=[1, 1, 0, 0, 1, 1], dilations=[2, 1, 1])),
])
def test_conv_patches_reproduce_the_conv(rng, shape, attrs):
    s, kernel = shape[1], attrs["kernel_shape"]
    w = rng.standard_normal([5, s] + kernel).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", **attrs)
    model = make_model([node], [vinfo("x", list(shape))], [vinfo("y", None)], [init("W", w)])
    site = find_site(to_graph(model).nodes[0])
    g = conv_geometry(site, shape[2:])
    rows = conv_patches(x.astype(np.float64), g["kernel"], g["strides"], g["dilations"], g["pads"])
    ref = conv_nd(x, w, strides=g["strides"], pads=list(g["pads"]), dilations=g["dilations"])
    got = rows @ w.reshape(5, -1).astype(np.float64).T  # (N·P, T)
    np.testing.assert_allclose(got, np.moveaxis(ref, 1, -1).reshape(-1, 5), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ort_run(model, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)
    # sampled positions are a seeded subset of those rows
    sub = conv_patches(x.astype(np.float64), g["kernel"], g["strides"], g["dilations"], g["pads"],
                       max_positions=3, rng=np.random.default_rng(1))
    per = rows.shape[0] // shape[0]
    assert sub.shape == (3 * shape[0], rows.shape[1])
    for i, row in enumerate(sub):
        block = rows[(i // 3) * per:(i // 3 + 1) * per]
        assert np.min(np.abs(block - row).max(axis=1)) == 0


def correlated_conv(rng, t=12, s=8, bias=True):
    """A 3×3 conv and inputs whose channels mix 3 sources plus a mean (like real features)."""
    w = rng.standard_normal((t, s, 3, 3)).astype(np.float32)
    b = rng.standard_normal(t).astype(np.float32) if bias else None
    inputs = ["x", "W"] + (["B"] if bias else [])
    inits = [init("W", w)] + ([init("B", b)] if bias else [])
    node = helper.make_node("Conv", inputs, ["y"], name="conv", pads=[1, 1, 1, 1])
    model = make_model([node], [vinfo("x", ["N", s, 8, 8])], [vinfo("y", None)], inits)
    mix = rng.standard_normal((s, 3))
    src = rng.standard_normal((40, 3, 8, 8)) + 0.5
    x = (np.einsum("sc,nchw->nshw", mix, src) + 0.1 * rng.standard_normal((40, s, 8, 8)))
    return model, x.astype(np.float32)


def refit_reference(model, x, stage, bias):
    """Least-squares fit [U, b'] of the conv's outputs on the stage's outputs, every position,
    float64 (numpy lstsq on the rows, independent of the second-moment code)."""
    site = find_site(to_graph(model).nodes[0])
    g = conv_geometry(site, x.shape[2:])
    rows = conv_patches(x.astype(np.float64), g["kernel"], g["strides"], g["dilations"], g["pads"])
    w = site.weight.reshape(site.weight.shape[0], -1).astype(np.float64)
    y = rows @ w.T + bias
    z = np.hstack([rows @ stage.T, np.ones((len(rows), 1))])
    coef = np.linalg.lstsq(z, y, rcond=None)[0]
    return z @ coef, y, rows


def chain_error(model, aware, free, x, calib_n=30):
    """(data-aware, data-free) output errors on the calibration and the held-out samples."""
    ref = ort_run(model, {"x": x})[0]
    out = []
    for part in (slice(0, calib_n), slice(calib_n, None)):
        out.append((rel(ort_run(aware, {"x": x[part]})[0], ref[part]),
                    rel(ort_run(free, {"x": x[part]})[0], ref[part])))
    return out


def test_tucker_refit_is_least_squares_and_the_better_candidate_is_kept(rng):
    from onnxlr.linalg.tucker import tucker2
    from onnxlr.methods.tucker import refit_tucker
    model, x = correlated_conv(rng)
    stats = collect_layer_stats(model, {"x": x[:30]}, max_positions=None)
    site = find_site(to_graph(model).nodes[0])
    tk = tucker2(site.weight.astype(np.float64), (4, 4))
    refit, before, after = refit_tucker(site, tk, stats["conv"])
    stage = np.einsum("oikl,si->oskl", tk.core, tk.u_in).reshape(4, -1)
    bias = site.bias.astype(np.float64)
    fit, y, rows = refit_reference(model, x[:30], stage, bias)
    got = rows @ (refit.u_out @ stage).T + bias + refit.bias_shift
    np.testing.assert_allclose(got, fit, rtol=1e-7, atol=1e-7)  # the least-squares solution
    assert after < before
    aware, rec = factorise(model, "tucker", "4", stats)
    free, rec_f = factorise(model, "tucker", "4")
    assert rec[0].ranks == rec_f[0].ranks == (4, 4)
    for err_a, err_f in chain_error(model, aware, free, x):
        assert err_a < 0.95 * err_f, (err_a, err_f)
    note = rec[0].extra["notes"]
    whitened = float(note.split("whitened ")[1].split(";")[0])
    assert note.endswith("whitened" if whitened < after else "refit")


def test_whitened_tucker_exact_when_inputs_span_r_in_channels(rng):
    from onnxlr.linalg.tucker import mode_products, tucker2
    from onnxlr.methods.tucker import whitened_tucker
    model, _ = correlated_conv(rng, t=6, s=8)
    mix = rng.standard_normal((8, 3))
    x = np.einsum("sc,nchw->nshw", mix, rng.standard_normal((20, 3, 8, 8)) + 0.5)
    stats = collect_layer_stats(model, {"x": x.astype(np.float32)}, max_positions=None)["conv"]
    site = find_site(to_graph(model).nodes[0])
    w, b = site.weight.astype(np.float64), site.bias.astype(np.float64)
    ref = conv_nd(x, w, b, pads=[1, 1, 1, 1])
    tk, _ = whitened_tucker(site, (6, 3), stats)
    approx = mode_products(tk.core, tk.u_out, tk.u_in)
    assert rel(conv_nd(x, approx, b + tk.bias_shift, pads=[1, 1, 1, 1]), ref) < 1e-5
    free = tucker2(w, (6, 3)).reconstruct()
    assert rel(conv_nd(x, free, b, pads=[1, 1, 1, 1]), ref) > 0.05


def test_cp_refit_reaches_the_least_squares_error(rng):
    from onnxlr.linalg.cp import cp_to_tensor
    from onnxlr.methods import METHODS
    model, x = correlated_conv(rng)
    stats = collect_layer_stats(model, {"x": x[:30]}, max_positions=None)
    aware, rec_a = factorise(model, "cp", "6", stats)
    free, rec_f = factorise(model, "cp", "6")
    assert rec_a[0].ranks == rec_f[0].ranks and rec_a[0].macs_after == rec_f[0].macs_after
    site = find_site(to_graph(model).nodes[0])
    cp = METHODS["cp"]().decompose(site, rec_f[0].ranks).arrays  # data-free, as refit
    stage = cp_to_tensor([np.eye(6), cp.in_factor, *cp.spatial]).reshape(6, -1)
    fit, y, _ = refit_reference(model, x[:30], stage, site.bias.astype(np.float64))
    got = np.moveaxis(ort_run(aware, {"x": x[:30]})[0], 1, -1).reshape(-1, y.shape[1])
    # CP's stage is nearly rank-deficient here (singular values over 5 decades) and the
    # refit carries a tiny ridge: the same error as least squares, not the same coefficients
    assert rel(got, y) <= 1.01 * rel(fit, y) + 1e-6
    for err_a, err_f in chain_error(model, aware, free, x):
        assert err_a < 0.95 * err_f, (err_a, err_f)
    note = rec_a[0].extra["notes"]
    before, after = (float(v) for v in note.split("output error ")[1].split(" -> "))
    assert after < before


def test_svd_conv_whitened_beats_weight_only(rng):
    model, x = correlated_conv(rng)
    stats = collect_layer_stats(model, {"x": x[:30]}, max_positions=None)
    ref = ort_run(model, {"x": x[30:]})[0]
    aware, rec = factorise(model, "svd", "4", stats)
    free, _ = factorise(model, "svd", "4")
    err_a = rel(ort_run(aware, {"x": x[30:]})[0], ref)
    err_f = rel(ort_run(free, {"x": x[30:]})[0], ref)
    assert err_a < 0.8 * err_f, (err_a, err_f)


def test_tucker_refit_of_the_core_when_output_mode_is_full(rng):
    """Ranks (T, 2): no output 1×1 is emitted, so the core itself is refit."""
    model, x = correlated_conv(rng, t=4, s=8)
    stats = collect_layer_stats(model, {"x": x[:30]}, max_positions=None)
    ref = ort_run(model, {"x": x[30:]})[0]
    aware, rec = factorise(model, "tucker", "2", stats)
    free, _ = factorise(model, "tucker", "2")
    assert rec[0].ranks in ((4, 2), (2, 2))
    assert rel(ort_run(aware, {"x": x[30:]})[0], ref) < rel(ort_run(free, {"x": x[30:]})[0], ref)


def test_conv_without_bias_gets_one(rng):
    model, x = correlated_conv(rng, bias=False)
    stats = collect_layer_stats(model, {"x": x}, max_positions=16)
    aware, _ = factorise(model, "svd", "4", stats)
    last = [n for n in aware.graph.node if n.op_type == "Conv"][-1]
    assert len(last.input) == 3  # the mean's share of the error went into a new bias


def test_optimize_with_calib_verifies_on_held_out_samples(rng):
    from onnxlr.pipeline import optimize
    model = gemm_layer(rng)
    rows = subspace_rows(rng, 200, 16, 3)
    feeds = [{"a": rows[i:i + 50]} for i in range(0, 200, 50)]
    _, report = optimize(model, "svd", "3", calib=feeds, max_error=0.01, measure_latency=False,
                         latency_cache=None)
    assert "40 held-out calibration samples" in report.verify_inputs
    rec = report.records[0]
    assert rec.status == "factorised" and rec.extra.get("data_aware")
    assert report.comparison.worst_rel_l2 < 1e-4


def test_cli_calib_bad_file_is_one_line(rng, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(gemm_layer(rng), path)
    np.savez(tmp_path / "c.npz", wrong=np.zeros((4, 16), np.float32))
    done = subprocess.run([sys.executable, "-m", "onnxlr", "optimize", str(path), "-o",
                           str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "c.npz")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "c.npz lacks input(s) 'a'" in done.stderr
    assert not (tmp_path / "o.onnx").exists()
