"""Thin layers (Lu et al. 2017): SOMP row selection, the next layer's compensation, the pass.

Known answers: rows that are combinations of other rows cost nothing — SOMP must
keep a basis, and the next layer must absorb the dropped rows exactly (data-free
through a linear chain, by least squares on calibration data otherwise).
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from conftest import init, make_model, vinfo
from numpy_ref import conv_nd, gemm
from onnx import helper, numpy_helper

from onnxlr.graph import to_graph, to_model
from onnxlr.linalg.somp import somp
from onnxlr.passes.factorize import FactorizeConfig
from onnxlr.passes.thin import ThinPass
from onnxlr.rank import parse_rank
from onnxlr.records import PRUNED

R = np.random.default_rng(7)


def run_thin(model, calib=None, rank="0.5", **kw):
    graph = to_graph(model)
    result = ThinPass(FactorizeConfig(methods={}, rank=parse_rank(rank)), calibration=calib,
                      **kw)(graph)
    out = to_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, {r.name: r for r in result.records}


def node_input(model, node_name, i):
    node = next(n for n in model.graph.node if n.name == node_name)
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return w[node.input[i]]


def run(model, x):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def dependent_rows(d=8, m=6, basis=5, seed=0):
    """d rows of which the last d − basis are combinations of the first ``basis``."""
    r = np.random.default_rng(seed)
    b = r.standard_normal((basis, m))
    mix = r.standard_normal((d - basis, basis))
    return np.vstack([b, mix @ b])


# --- SOMP ----------------------------------------------------------------------------------------

def test_somp_selects_a_basis_of_duplicate_rows():
    b = R.standard_normal((4, 12))
    w = np.vstack([b, 3 * b[0], b[1] - b[2], np.zeros(12), -b[3], 0.5 * b[0] + b[3]])
    result = somp(w, 4)
    assert np.linalg.matrix_rank(w[result.selected]) == 4
    assert 6 not in result.selected  # the zero row is never a basis element
    assert result.error < 1e-12
    assert np.allclose(result.coef @ w[result.selected], w, atol=1e-10)


def test_somp_extra_rows_beyond_the_rank_are_free():
    w = dependent_rows(d=10, m=7, basis=3)
    result = somp(w, 5)
    assert len(result.selected) == 5 and result.error < 1e-12


def test_somp_is_near_the_best_subset():
    w = R.standard_normal((9, 6)) @ np.diag([3, 2, 1, 0.5, 0.2, 0.1])
    for keep in (2, 3, 4):
        result = somp(w, keep)
        best = min(np.linalg.norm(w - w @ np.linalg.pinv(w[list(s)]) @ w[list(s)])
                   for s in itertools.combinations(range(9), keep)) / np.linalg.norm(w)
        assert result.error <= 1.3 * best + 1e-12, (keep, result.error, best)


def test_somp_rejects_bad_counts():
    with pytest.raises(ValueError):
        somp(np.ones((3, 2)), 0)


# --- the pass ------------------------------------------------------------------------------------

def gemm_chain():
    """x → Gemm1 (8 outputs, 3 of them combinations of the others) → Gemm2 → y, no activation."""
    b1 = dependent_rows(d=8, m=6).astype(np.float32)          # transB=1: rows are outputs
    c1 = (0.1 * R.standard_normal(8)).astype(np.float32)
    b2 = R.standard_normal((8, 5)).astype(np.float32)           # transB=0: (in, out)
    c2 = (0.1 * R.standard_normal(5)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "B1", "C1"], ["h"], name="fc1", transB=1),
             helper.make_node("Gemm", ["h", "B2", "C2"], ["y"], name="fc2", alpha=0.5)]
    inits = [init("B1", b1), init("C1", c1), init("B2", b2), init("C2", c2)]
    model = make_model(nodes, [vinfo("x", ["N", 6])], [vinfo("y", ["N", 5])], inits)
    return model, (b1, c1, b2, c2)


def test_thin_data_free_through_a_linear_chain_is_exact():
    model, (b1, c1, b2, c2) = gemm_chain()
    out, records = run_thin(model, rank="5")
    rec = records["fc1"]
    assert rec.status == PRUNED and rec.method == "thin" and rec.kept_channels == 5
    assert rec.ranks is None and rec.weight_error is None
    # data-free: nothing was fitted; SOMP's row error says the kept rows span the rest
    assert rec.fit_error is None and rec.extra["somp_error"] < 1e-6 and "compensation" in rec.extra
    assert node_input(out, "fc1", 1).shape == (5, 6)
    assert node_input(out, "fc2", 1).shape == (5, 5)
    assert "graph output" in records["fc2"].reason
    x = R.standard_normal((20, 6)).astype(np.float32)
    ref = gemm(gemm(x, b1, c1, trans_b=True), b2, c2, alpha=0.5)
    assert rel(run(out, x), ref) < 1e-5


def matmul_chain(seq=4):
    """x [N, S, 6] → MatMul → Add(bias) → MatMul: channel-last, rank 3."""
    w1 = dependent_rows(d=8, m=6, seed=2).T.astype(np.float32)   # (6, 8): columns are outputs
    bias = (0.2 * R.standard_normal(8)).astype(np.float32)
    w2 = R.standard_normal((8, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj1"),
             helper.make_node("Add", ["h", "bias"], ["hb"], name="bias1"),
             helper.make_node("MatMul", ["hb", "w2"], ["y"], name="proj2")]
    inits = [init("w1", w1), init("bias", bias), init("w2", w2)]
    model = make_model(nodes, [vinfo("x", ["N", seq, 6])], [vinfo("y", None)], inits)
    return model, (w1, bias, w2)


def test_thin_with_calibration_refits_the_next_layer_exactly():
    """An affine chain (MatMul + bias → MatMul): least squares on calibration data absorbs the
    dropped outputs, bias included (an Add is inserted after the bias-less MatMul)."""
    model, (w1, bias, w2) = matmul_chain()
    x = R.standard_normal((64, 4, 6)).astype(np.float32)
    out, records = run_thin(model, [{"x": x}], rank="5")
    rec = records["proj1"]
    assert rec.status == PRUNED and rec.kept_channels == 5 and rec.ranks is None, rec.reason
    kept = sorted(set(range(8)) - set(rec.extra["removed"]))
    assert np.linalg.matrix_rank(w1[:, kept]) == 5
    assert np.array_equal(node_input(out, "bias1", 1), bias[kept])
    assert node_input(out, "proj2", 1).shape == (5, 3)
    x_test = R.standard_normal((16, 4, 6)).astype(np.float32)
    ref = (x_test.astype(np.float64) @ w1 + bias) @ w2
    assert rel(run(out, x_test), ref) < 1e-5
    assert rec.fit_error < 1e-5 and rec.weight_error is None


def test_thin_data_free_affine_chain_drops_columns():
    """An Add of a constant between the layers: not linear, so data-free thinning only drops
    the next layer's columns (no compensation)."""
    model, _ = matmul_chain()
    out, records = run_thin(model, rank="5")
    rec = records["proj1"]
    assert rec.status == PRUNED and "compensation" not in rec.extra
    kept = sorted(set(range(8)) - set(rec.extra["removed"]))
    assert np.array_equal(node_input(out, "proj2", 1), node_input(model, "proj2", 1)[kept])


def conv_pair(n=40):
    w1 = R.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b1 = (0.1 * R.standard_normal(6)).astype(np.float32)
    w1[4], b1[4] = 3 * w1[0], 3 * b1[0]       # positive multiple: survives the ReLU
    w1[5], b1[5] = 0.25 * w1[2], 0.25 * b1[2]
    w2 = R.standard_normal((3, 6, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vinfo("x", ["N", 2, 6, 6])], [vinfo("y", None)],
                       [init("w1", w1), init("b1", b1), init("w2", w2)])
    return model, R.standard_normal((n, 2, 6, 6)).astype(np.float32), (w1, b1, w2)


def test_thin_conv_with_calibration_exact_for_rescaled_filters():
    model, x, (w1, b1, w2) = conv_pair()
    out, records = run_thin(model, [{"x": x}], rank="4")
    rec = records["conv1"]
    assert rec.status == PRUNED
    removed = set(rec.extra["removed"])
    assert len(removed & {0, 4}) == 1 and len(removed & {2, 5}) == 1
    ref = conv_nd(np.maximum(conv_nd(x, w1, b1, pads=[1, 1, 1, 1]), 0), w2, pads=[1, 1, 1, 1])
    assert rel(run(out, x), ref) < 2e-5


def test_thin_conv_data_free_drops_columns():
    model, x, (w1, _, w2) = conv_pair()
    out, records = run_thin(model, rank="3")
    rec = records["conv1"]
    kept = sorted(set(range(6)) - set(rec.extra["removed"]))
    assert rec.status == PRUNED and "compensation" not in rec.extra
    assert np.array_equal(node_input(out, "conv1", 1), w1[kept])
    assert np.array_equal(node_input(out, "conv2", 1), w2[:, kept])
    assert run(out, x).shape == (len(x), 3, 6, 6)
