"""Adaptive Fastfood: FWHT and fit math, the ONNX graph, counts, and the pipeline.

References are float64 numpy (``scipy.linalg.hadamard``, ``numpy_ref.gemm``); the ONNX
Hadamard subgraph is checked for exact equality on integer inputs, the rewritten layers
against the fitted operator evaluated in float64, and an exactly representable layer
(built from known S, G, B, Π) must be recovered to float32 precision.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import scipy.linalg
from conftest import gemm_model, matmul_model, ort_run
from numpy_ref import gemm

from onnxlr.errors import OnnxlrError
from onnxlr.graph import NameScope, to_graph, to_model
from onnxlr.linalg.fastfood import (FastfoodBlock, FastfoodFit, fastfood_apply, fastfood_matrix,
                                    fit_fastfood, fwht, permutations)
from onnxlr.linalg.whiten import LayerStats
from onnxlr.methods import METHODS, parse_method
from onnxlr.methods.fastfood import FastfoodGraph, stage_sizes
from onnxlr.pipeline import optimize
from onnxlr.rank import FixedRank
from onnxlr.records import FACTORISED, REVERTED, Declined
from onnxlr.sites import find_site

TRANSFORM_OPS = {"Reshape", "Slice", "Add", "Sub", "Concat", "MatMul", "Transpose"}


def known_fastfood(rng, dim: int, n: int, d: int, seed: int = 0) -> np.ndarray:
    """An ``n × d`` matrix that is exactly Adaptive Fastfood with the fit's permutations."""
    perms = permutations(-(-n // dim), dim, seed)
    blocks = [FastfoodBlock(rng.standard_normal(min(dim, n - j * dim)), rng.standard_normal(dim),
                            rng.standard_normal(dim), p) for j, p in enumerate(perms)]
    return fastfood_matrix(FastfoodFit(blocks, dim, d, n, np.zeros(n)))


def rewrite(model, method="fastfood", ranks=(0,), stats=None, unknown_rank=False, **kw):
    """Decompose and build one layer directly (ranks the pass would decline included);
    ``unknown_rank`` forgets the shape of the layer's input (an intermediate tensor)."""
    graph = to_graph(model)
    node = next(n for n in graph.nodes if n.op in ("Gemm", "MatMul"))
    if unknown_rank:
        node.inputs[0].shape = None
    site = find_site(node, graph)
    assert not isinstance(site, Declined), site
    m = METHODS[method](**kw)
    factors = m.decompose(site, ranks, stats=stats)
    cost = m.cost(site, ranks)
    m.build(graph, site, factors, NameScope(graph))
    out = to_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, factors, cost


# --- the Walsh–Hadamard transform -----------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 2, 16, 128])
def test_numpy_fwht_equals_scipy_hadamard(rng, dim):
    x = rng.integers(-9, 10, size=(3, dim, 2)).astype(np.float64)
    np.testing.assert_array_equal(fwht(x, axis=1),
                                  np.einsum("ij,njk->nik", scipy.linalg.hadamard(dim), x))


def hadamard_model(dim: int, blocks: int, radix: int, lead: tuple[int, ...]) -> onnx.ModelProto:
    x = gs.Variable("x", dtype=np.float32, shape=list(lead) + [blocks * dim])
    graph = gs.Graph(inputs=[x], opset=17)
    fg = FastfoodGraph(graph, NameScope(graph), "h", np.float32, len(lead), radix)
    y = fg.hadamard("H", x, blocks * dim, dim)
    y.dtype, y.shape = np.float32, list(lead) + [blocks * dim]
    graph.outputs = [y]
    model = gs.export_onnx(graph.cleanup().toposort())
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("dim,blocks,radix,lead", [
    (2, 1, 2, (3,)), (64, 1, 2, (3,)), (16, 3, 2, (2, 3)), (64, 2, 4, (3,)),
    (128, 1, 16, (3,)), (32, 3, 8, (2, 2)), (8, 1, 64, (1,))])
def test_onnx_hadamard_subgraph_is_exact(rng, dim, blocks, radix, lead):
    model = hadamard_model(dim, blocks, radix, lead)
    ops = {n.op_type for n in model.graph.node}
    assert ops <= TRANSFORM_OPS
    if radix == 2:  # butterflies: log2(D) stages of Add and Sub, no product at all
        assert "MatMul" not in ops
        assert sum(n.op_type == "Sub" for n in model.graph.node) == int(math.log2(dim))
    else:
        assert sum(n.op_type == "MatMul" for n in model.graph.node) == len(stage_sizes(dim, radix))
    biggest = max((int(np.prod(t.dims)) for t in model.graph.initializer), default=0)
    assert biggest < dim * dim or dim <= 2   # never a dense D × D matrix
    x = rng.integers(-8, 9, size=lead + (blocks * dim,)).astype(np.float32)
    expected = (x.reshape(lead + (blocks, dim)).astype(np.float64)
                @ scipy.linalg.hadamard(dim)).reshape(x.shape)
    np.testing.assert_array_equal(ort_run(model, {"x": x})[0], expected)


def test_stage_sizes_multiply_to_the_length():
    for dim in (1, 2, 8, 512, 4096):
        for radix in (2, 4, 16, 64):
            sizes = stage_sizes(dim, radix)
            assert math.prod(sizes) == dim and all(s <= max(radix, 2) for s in sizes)


# --- the fit --------------------------------------------------------------------------------

@pytest.mark.parametrize("dim,n", [(16, 16), (64, 128), (256, 256)])
def test_fit_recovers_an_exactly_representable_layer(rng, dim, n):
    w = known_fastfood(rng, dim, n, dim)
    fit = fit_fastfood(w)
    assert fit.weight_error < 1e-6
    np.testing.assert_allclose(fastfood_matrix(fit), w, atol=1e-6 * np.abs(w).max())


def test_fit_error_is_the_frobenius_error_and_sweeps_do_not_hurt(rng):
    w = rng.standard_normal((24, 40))
    short, long = fit_fastfood(w, sweeps=2), fit_fastfood(w, sweeps=60)
    for fit in (short, long):
        rel = np.linalg.norm(fastfood_matrix(fit) - w) / np.linalg.norm(w)
        assert fit.weight_error == pytest.approx(rel) == pytest.approx(fit.output_error)
    assert long.weight_error <= short.weight_error + 1e-12
    assert 0.3 < long.weight_error < 1.0   # 3·64 numbers cannot hold a random 24×40 matrix


def test_low_rank_correction_is_least_squares_for_the_residual(rng):
    w = rng.standard_normal((20, 30))
    base, corrected = fit_fastfood(w), fit_fastfood(w, rank=3)
    assert corrected.weight_error < base.weight_error
    resid = w - fastfood_matrix(corrected, correction=False)
    s = np.linalg.svd(resid, compute_uv=False)   # Eckart–Young for the final Fastfood part
    assert corrected.weight_error * np.linalg.norm(w) == pytest.approx(np.sqrt(np.sum(s[3:] ** 2)))


def test_calibrated_fit_weighs_the_inputs_and_keeps_the_mean(rng):
    n, d = 12, 32
    w = rng.standard_normal((n, d))
    x = rng.standard_normal((400, 8)) @ rng.standard_normal((8, d)) + rng.standard_normal(d)
    mean, cov = x.mean(0), np.cov(x.T, bias=True)
    plain, aware = fit_fastfood(w), fit_fastfood(w, cov=cov, mean=mean)

    def out_err(fit):
        y, ref = x @ fastfood_matrix(fit).T + fit.bias_shift, x @ w.T
        return np.linalg.norm(y - ref) / np.linalg.norm(ref - ref.mean(0))

    assert out_err(aware) < 0.5 * out_err(plain)
    assert out_err(aware) == pytest.approx(aware.output_error, rel=1e-6)
    np.testing.assert_allclose((x @ fastfood_matrix(aware).T + aware.bias_shift).mean(0),
                               (x @ w.T).mean(0), atol=1e-9)


# --- the graph ------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n,trans_a,trans_b,with_c,rank,radix", [
    (12, 7, 0, 0, 0, 0, 2), (12, 7, 1, 1, 1, 2, 2), (16, 40, 0, 1, 1, 0, 2),
    (20, 70, 1, 0, 1, 3, 2), (20, 70, 0, 1, 1, 1, 8), (16, 5, 1, 0, 0, 0, 16)])
def test_gemm_graph_computes_the_fitted_operator(rng, k, n, trans_a, trans_b, with_c, rank, radix):
    m = 5
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32) if with_c else None
    model = gemm_model(b, c, a_shape=a.shape, transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3)
    out, factors, _ = rewrite(model, ranks=(rank,), radix=radix)
    fit = factors.arrays[0]
    rows = (a.T if trans_a else a).astype(np.float64)
    expected = 0.7 * fastfood_apply(fit, rows) + (1.3 * c if with_c else 0.0)
    got = ort_run(out, {"a": a})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    assert fit.rank == rank and len(fit.blocks) == -(-n // fit.dim)
    assert "Frobenius" in factors.notes


@pytest.mark.parametrize("radix,known_rank", [(2, True), (8, True), (16, False)])
def test_matmul_nd_graph_computes_the_fitted_operator(rng, radix, known_rank):
    w = rng.standard_normal((24, 10)).astype(np.float32)
    model = matmul_model(w, (2, 3, 24))
    if not known_rank:  # e.g. after an op shape inference does not know: flattened at run time
        relu = onnx.helper.make_node("Relu", ["x"], ["x_relu"], name="relu")
        model.graph.node[0].input[0] = "x_relu"
        model.graph.node.insert(0, relu)
    out, factors, _ = rewrite(model, ranks=(1,), radix=radix, unknown_rank=not known_rank)
    assert ("Shape" in {n.op_type for n in out.graph.node}) != known_rank
    x = rng.standard_normal((2, 3, 24)).astype(np.float32)
    expected = fastfood_apply(factors.arrays[0], (x if known_rank else np.maximum(x, 0))
                              .astype(np.float64))
    got = ort_run(out, {"x": x})[0]
    assert got.shape == (2, 3, 10)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_exact_layer_is_recovered_through_onnx(rng):
    dim, n = 32, 64
    w = known_fastfood(rng, dim, n, dim).astype(np.float32)      # two full blocks, y = W x
    bias = rng.standard_normal(n).astype(np.float32)
    a = rng.standard_normal((6, dim)).astype(np.float32)
    model = gemm_model(w, bias, a_shape=a.shape, transB=1)
    out, factors, _ = rewrite(model)
    assert factors.weight_error < 1e-5
    expected = gemm(a.astype(np.float64), w.astype(np.float64), bias, 1.0, 1.0, False, True)
    np.testing.assert_allclose(ort_run(out, {"a": a})[0], expected, rtol=0,
                               atol=1e-4 * np.abs(expected).max())


def counted(model: onnx.ModelProto) -> tuple[int, int]:
    """(stored numbers, MACs at batch 1) read off the graph: float and int32 constants;
    Mul/Add/Sub one per output element, MatMul K per output element; the bias Add excluded."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    inits = {t.name: t for t in model.graph.initializer}
    params = sum(int(np.prod(t.dims)) for t in inits.values()
                 if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT32))
    macs = 0
    for node in model.graph.node:
        out = int(np.prod(shapes[node.output[0]]))
        if node.op_type in ("Mul", "Sub") or (node.op_type == "Add" and "/bias" not in node.name):
            macs += out
        elif node.op_type == "MatMul":
            k = inits[node.input[1]].dims[0] if node.input[1] in inits else None
            macs += out * k
    return params, macs


@pytest.mark.parametrize("d,n,rank,radix,with_c", [(20, 70, 3, 2, True), (16, 10, 0, 8, False),
                                                   (100, 30, 2, 16, True)])
def test_parameter_and_mac_counts_are_as_predicted(rng, d, n, rank, radix, with_c):
    w = rng.standard_normal((n, d)).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32) if with_c else None
    out, _, (params, macs) = rewrite(gemm_model(w, c, a_shape=(1, d), transB=1), ranks=(rank,),
                                     radix=radix)
    assert counted(out) == (params, macs)
    dim, blocks = 1 << (d - 1).bit_length(), -(-n // (1 << (d - 1).bit_length()))
    if radix == 2:  # the prediction: O(n) numbers, O(n log d) work
        assert params == blocks * (d + 2 * dim) + n + rank * (d + n) + (n if with_c else 0)
        assert macs == (blocks * (d + dim + 2 * dim * int(math.log2(dim))) + n
                        + (rank * (d + n) + n if rank else 0))


# --- methods, rank rules, pipeline ----------------------------------------------------------

def test_method_spec_and_declines(rng):
    plan = parse_method("fastfood")
    assert plan["gemm"] == plan["matmul"] == "fastfood" and plan["conv"] is None
    assert parse_method("gemm=fastfood,matmul=fastfood_svd")["matmul"] == "fastfood_svd"
    with pytest.raises(OnnxlrError, match="cannot factorise conv"):
        parse_method("conv=fastfood")
    big = find_site(to_graph(gemm_model(np.zeros((5000, 3), np.float32), a_shape=(1, 5000)))
                    .nodes[0])
    assert "limit" in METHODS["fastfood"]().choose_ranks(big, FixedRank(1), 1)
    small = find_site(to_graph(gemm_model(rng.standard_normal((8, 3)).astype(np.float32),
                                          a_shape=(1, 8))).nodes[0])
    assert METHODS["fastfood"]().choose_ranks(small, FixedRank(5), 1) == (0,)
    combined = METHODS["fastfood_svd"]()
    assert combined.choose_ranks(small, FixedRank(2), 1) == (2,)
    # the correction continues from the Fastfood fit made while choosing its rank
    corrected, plain = combined.decompose(small, (2,)), combined.decompose(small, (0,))
    assert corrected.weight_error < plain.weight_error


def test_pipeline_accepts_an_exact_layer_and_declines_a_random_one(rng):
    dim = 64
    good = gemm_model(known_fastfood(rng, dim, dim, dim).astype(np.float32), a_shape=(4, dim),
                      transB=1)
    _, report = optimize(good, method="fastfood", max_error=0.01)
    (rec,) = report.records
    assert rec.status == FACTORISED and rec.ranks == (0,) and rec.weight_error < 1e-5
    assert rec.params_after < rec.params_before
    bad = gemm_model(rng.standard_normal((dim, dim)).astype(np.float32), a_shape=(4, dim),
                     transB=1)
    _, report = optimize(bad, method="fastfood", max_error=0.01)
    (rec,) = report.records
    # the back-off grew the low-rank correction until it stopped saving, then reverted
    assert rec.status == REVERTED and rec.ranks[0] > 0 and report.comparison.worst_rel_l2 == 0


def test_data_aware_fit_through_the_method(rng):
    n, d = 10, 24
    w = rng.standard_normal((d, n)).astype(np.float32)
    x = (rng.standard_normal((300, 2)) @ rng.standard_normal((2, d)) + 1.0).astype(np.float32)
    x64 = x.astype(np.float64)
    stats = LayerStats(x64.T @ x64 / len(x), x64.mean(0), len(x))
    model = gemm_model(w, np.zeros(n, np.float32), a_shape=x.shape)
    expected = x64 @ w.astype(np.float64)
    errors = {}
    for key, st in (("plain", None), ("aware", stats)):
        out, factors, _ = rewrite(model, stats=st)
        got = ort_run(out, {"a": x})[0]
        errors[key] = np.linalg.norm(got - expected) / np.linalg.norm(expected - expected.mean(0))
    assert "calibration" in factors.notes
    assert errors["aware"] < 0.5 * errors["plain"]
