"""Each method's rewrite: structure, numerics against float64 numpy references, checker.

Full rank must reproduce the layer to float32 precision; at reduced rank the
chain must compute exactly the layer with the reconstructed (low-rank) weight.
The builders are driven directly so full rank (normally declined as "no
saving") can be checked.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from conftest import conv_model, gemm_model, matmul_model, ort_run
from numpy_ref import conv_nd, gemm

from onnxlr.graph import NameScope, to_graph, to_model
from onnxlr.methods import METHODS
from onnxlr.records import Declined
from onnxlr.sites import find_site


def rewrite(model, method, ranks):
    """Apply one method at given ranks to the model's only candidate; return (model, factors)."""
    graph = to_graph(model)
    node = next(n for n in graph.nodes if n.op in ("Gemm", "MatMul", "Conv"))
    site = find_site(node)
    assert not isinstance(site, Declined), site
    m = METHODS[method]()
    factors = m.decompose(site, ranks)
    m.build(graph, site, factors, NameScope(graph))
    out = to_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, factors


def ops(model):
    return [n.op_type for n in model.graph.node]


def close(actual, expected, tol=2e-5):
    scale = max(np.abs(expected).max(), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


# --- Gemm -------------------------------------------------------------------------------------

@pytest.mark.parametrize("trans_a,trans_b,with_c", list(itertools.product([0, 1], [0, 1], [0, 1])))
def test_gemm_full_rank_all_transposes(rng, trans_a, trans_b, with_c):
    m, k, n = 5, 12, 7
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32) if with_c else None
    model = gemm_model(b, c, a_shape=a.shape, transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3)
    out, _ = rewrite(model, "svd", (min(k, n),))
    assert ops(out) == ["Gemm", "Gemm"]
    expected = gemm(a.astype(np.float64), b.astype(np.float64), c, 0.7, 1.3 if with_c else 1.0,
                    bool(trans_a), bool(trans_b))
    close(ort_run(out, {"a": a})[0], expected)
    close(ort_run(model, {"a": a})[0], expected)


def test_gemm_low_rank_equals_reconstructed_weight(rng):
    b = rng.standard_normal((16, 10)).astype(np.float32)
    a = rng.standard_normal((3, 10)).astype(np.float32)
    out, f = rewrite(gemm_model(b, a_shape=a.shape, transB=1), "svd", (4,))
    u, svt = f.arrays   # matrix is B^T (10 × 16): in × out
    close(ort_run(out, {"a": a})[0], a.astype(np.float64) @ (u @ svt))
    assert out.graph.initializer[0].dims[-1] == 4 or out.graph.initializer[1].dims[0] == 4


# --- MatMul -----------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape", [(6, 12), (2, 5, 12), (2, 3, 4, 12)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_nd_full_rank(rng, x_shape, with_bias):
    w = rng.standard_normal((12, 8)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32) if with_bias else None
    out, _ = rewrite(matmul_model(w, x_shape, bias), "svd", (8,))
    assert ops(out) == ["MatMul", "MatMul"] + (["Add"] if with_bias else [])
    x = rng.standard_normal(x_shape).astype(np.float32)
    expected = x.astype(np.float64) @ w + (0 if bias is None else bias)
    close(ort_run(out, {"x": x})[0], expected)


# --- Conv -------------------------------------------------------------------------------------

CONV_CASES = [
    # (kernel, x spatial, attrs)
    ((3,), (11,), {}),
    ((3,), (12,), {"strides": [2], "pads": [1, 2], "dilations": [2]}),
    ((5,), (13,), {"auto_pad": "SAME_UPPER", "strides": [2]}),
    ((3, 3), (9, 9), {"pads": [1, 1, 1, 1]}),
    ((3, 3), (10, 9), {"strides": [2, 1], "pads": [0, 1, 2, 1], "dilations": [1, 2]}),
    ((3, 2), (8, 7), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ((3, 3), (8, 8), {"auto_pad": "VALID"}),
    ((2, 3, 3), (5, 6, 6), {"pads": [0, 1, 1, 1, 1, 0], "strides": [1, 2, 1]}),
]


def _explicit_pads(x_spatial, kernel, attrs):
    """ONNX auto_pad → explicit pads, for the numpy reference."""
    d = len(kernel)
    mode = attrs.get("auto_pad", "NOTSET")
    strides = attrs.get("strides", [1] * d)
    dil = attrs.get("dilations", [1] * d)
    if mode == "NOTSET":
        return attrs.get("pads", [0] * 2 * d)
    if mode == "VALID":
        return [0] * 2 * d
    begin, end = [], []
    for size, k, s, dl in zip(x_spatial, kernel, strides, dil):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * dl + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return begin + end


def _conv_reference(x, w, b, kernel, x_spatial, attrs):
    d = len(kernel)
    return conv_nd(x.astype(np.float64), w, b, attrs.get("strides", [1] * d),
                   _explicit_pads(x_spatial, kernel, attrs), attrs.get("dilations", [1] * d))


@pytest.mark.parametrize("method", ["tucker", "cp", "svd"])
@pytest.mark.parametrize("kernel,x_spatial,attrs", CONV_CASES)
def test_conv_full_rank_reproduces_layer(rng, method, kernel, x_spatial, attrs):
    t, s = 6, 5
    if method == "cp":  # a kernel of known CP rank 4: exactly representable by the chain
        factors = [rng.standard_normal((n, 4)) for n in (t, s) + kernel]
        w = np.einsum("tr,sr," + ",".join(f"{c}r" for c in "abc"[: len(kernel)]) + "->ts" + "abc"[: len(kernel)],
                      *factors).astype(np.float32)
        ranks = (4,)
    else:
        w = rng.standard_normal((t, s) + kernel).astype(np.float32)
        ranks = (t, s) if method == "tucker" else (min(t, s * int(np.prod(kernel))),)
    b = rng.standard_normal(t).astype(np.float32)
    x = rng.standard_normal((2, s) + x_spatial).astype(np.float32)
    model = conv_model(w, b, x.shape, **attrs)
    out, f = rewrite(model, method, ranks)
    expected = _conv_reference(x, w, b, kernel, x_spatial, attrs)
    tol = 1e-4 if method == "cp" else 2e-5
    assert f.weight_error < (1e-5 if method == "cp" else 1e-6)
    close(ort_run(out, {"x": x})[0], expected, tol)
    close(ort_run(model, {"x": x})[0], expected)


def test_tucker_structure_and_low_rank_numerics(rng):
    w = rng.standard_normal((16, 12, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    x = rng.standard_normal((1, 12, 10, 10)).astype(np.float32)
    attrs = {"strides": [2, 2], "pads": [1, 1, 1, 1]}
    out, f = rewrite(conv_model(w, b, x.shape, **attrs), "tucker", (8, 6))
    assert ops(out) == ["Conv", "Conv", "Conv"]
    shapes = [tuple(i.dims) for i in out.graph.initializer]
    assert (6, 12, 1, 1) in shapes and (8, 6, 3, 3) in shapes and (16, 8, 1, 1) in shapes
    tk = f.arrays
    w_k = np.einsum("oi...,to,si->ts...", tk.core, tk.u_out, tk.u_in)
    close(ort_run(out, {"x": x})[0], _conv_reference(x, w_k, b, (3, 3), (10, 10), attrs))
    assert 0 < f.weight_error < 1


def test_tucker_unfactorised_mode_emits_no_square_conv(rng):
    """An RGB-like input mode (S = 3) kept at full rank: only core + output 1×1."""
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    out, _ = rewrite(conv_model(w, None, (1, 3, 8, 8), pads=[1, 1, 1, 1]), "tucker", (4, 3))
    assert ops(out) == ["Conv", "Conv"]


def test_cp_structure_depthwise_per_axis(rng):
    w = rng.standard_normal((8, 6, 3, 5)).astype(np.float32)
    out, f = rewrite(conv_model(w, None, (1, 6, 9, 9), strides=[2, 1], pads=[1, 2, 1, 2]), "cp", (4,))
    assert ops(out) == ["Conv"] * 4
    nodes = out.graph.node
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in nodes]
    assert groups == [1, 4, 4, 1]
    kernels = [list(next(a.ints for a in n.attribute if a.name == "kernel_shape")) for n in nodes]
    assert kernels == [[1, 1], [3, 1], [1, 5], [1, 1]]
    strides = [list(next(a.ints for a in n.attribute if a.name == "strides")) for n in nodes]
    assert strides == [[1, 1], [2, 1], [1, 1], [1, 1]]


@pytest.mark.parametrize("spatial", [(1,), (1, 1), (1, 1, 1)])
def test_conv1x1_svd_any_spatial_rank(rng, spatial):
    w = rng.standard_normal((10, 8) + spatial).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    xs = (2, 8) + (5,) * len(spatial)
    x = rng.standard_normal(xs).astype(np.float32)
    out, _ = rewrite(conv_model(w, b, xs), "svd", (8,))
    assert ops(out) == ["Conv", "Conv"]
    d = len(spatial)
    close(ort_run(out, {"x": x})[0], conv_nd(x.astype(np.float64), w, b, [1] * d, [0] * 2 * d, [1] * d))


def test_fp16_weights_written_back_in_fp16(rng):
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float16)
    model = conv_model(w, None, (1, 6, 7, 7))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    model.graph.ClearField("output")
    model.graph.output.append(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, None))
    out, _ = rewrite(model, "tucker", (8, 6))
    assert {i.data_type for i in out.graph.initializer} == {onnx.TensorProto.FLOAT16}
    x = rng.standard_normal((1, 6, 7, 7)).astype(np.float16)
    close(ort_run(out, {"x": x})[0].astype(np.float64), ort_run(model, {"x": x})[0].astype(np.float64), 5e-3)


def test_find_site_declines_with_a_typed_reason(rng):
    """A node that is no candidate comes back as a Declined (a str subclass, so its text reads
    as the reason) carrying the reason; a candidate as a LayerSite."""
    from onnxlr.records import Declined
    from onnxlr.sites import LayerSite

    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    grouped = to_graph(conv_model(w, x_shape=(1, 4, 9, 9), group=2))
    declined = find_site(grouped.nodes[0], grouped)
    assert isinstance(declined, Declined) and isinstance(declined, str)
    assert declined.reason == "grouped convolution (group=2) is not factorised"
    plain = to_graph(conv_model(w[:, :1].repeat(4, axis=1)))
    assert isinstance(find_site(plain.nodes[0], plain), LayerSite)


def test_choose_ranks_declines_with_a_typed_reason(rng):
    """Every built-in method's ``choose_ranks`` says no with a :class:`Declined` (not a bare
    string), and the factorise pass records its reason."""
    from onnxlr.passes.factorize import Factorize, FactorizeConfig
    from onnxlr.rank import FixedRank, RatioRank, VbmfRank
    from onnxlr.records import Declined

    noise = find_site(to_graph(gemm_model(rng.standard_normal((64, 64)).astype(np.float32),
                                          a_shape=(1, 64))).nodes[0])
    declined = METHODS["svd"]().choose_ranks(noise, VbmfRank(), 1)
    assert isinstance(declined, Declined) and "rank 0" in declined.reason
    conv = find_site(to_graph(conv_model(rng.standard_normal((6, 4, 3, 3)).astype(np.float32)))
                     .nodes[0])
    for name in ("tucker", "cp"):
        declined = METHODS[name]().choose_ranks(conv, RatioRank(1.0), 1)
        assert isinstance(declined, Declined) and "full rank" in declined.reason, name
    big = find_site(to_graph(gemm_model(np.zeros((5000, 3), np.float32), a_shape=(1, 5000)))
                    .nodes[0])
    for name in ("fastfood", "fastfood_svd"):
        declined = METHODS[name]().choose_ranks(big, FixedRank(1), 1)
        assert isinstance(declined, Declined) and "limit" in declined.reason, name
    assert not isinstance(METHODS["tucker"]().choose_ranks(conv, RatioRank(0.5), 1), Declined)

    graph = to_graph(conv_model(rng.standard_normal((6, 4, 3, 3)).astype(np.float32)))
    config = FactorizeConfig(methods={"conv": "tucker"}, rank=RatioRank(1.0))
    (record,) = Factorize(config)(graph).records
    assert record.status == "declined" and "full rank" in record.reason
    assert type(record.reason) is str  # the record holds the plain reason, not the type


def test_a_fixed_rank_skips_the_spectrum_but_not_the_finiteness_check(monkeypatch, rng):
    from onnxlr.errors import OnnxlrError
    from onnxlr.methods import svd
    from onnxlr.rank import parse_rank

    def no_spectrum(_):
        raise AssertionError("a fixed rank needs no singular values")
    monkeypatch.setattr(svd, "singular_values", no_spectrum)
    w = rng.standard_normal((12, 10)).astype(np.float32)
    site = find_site(to_graph(matmul_model(w, [3, 12])).nodes[0])
    assert svd.SvdMethod().choose_ranks(site, parse_rank("4"), 1) == (4,)
    assert svd.SvdMethod().choose_ranks(site, parse_rank("0.5"), 8) == (8,)
    w[3, 4] = np.nan
    site = find_site(to_graph(matmul_model(w, [3, 12])).nodes[0])
    with pytest.raises(OnnxlrError, match="NaN"):
        svd.SvdMethod().choose_ranks(site, parse_rank("4"), 1)
