"""Unusual but legitimate models: fp16/bf16, quantized, dynamic dims, old and new opsets,
subgraphs, custom ops, several outputs, no shapes, IR 3 weights-as-inputs, big models.

Each model is factorised where that is possible and left alone, with the reason, where it is
not; the result passes the checks and runs in ONNX Runtime, or verification says clearly that
it could not run.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from conftest import conv_model, gemm_model, init, make_model, matmul_model, ort_run, vinfo
from numpy_ref import conv_nd, gemm
from onnx import TensorProto, helper, numpy_helper
from test_methods import rewrite

from onnxlr import verify
from onnxlr.errors import OnnxlrError
from onnxlr.io import check_model, load_model, save_model
from onnxlr.pipeline import optimize
from onnxlr.records import DECLINED, FACTORISED

F16 = TensorProto.FLOAT16


def by_name(report):
    return {r.name: r for r in report.records}


def as_fp16(model):
    """Switch a float32 single-layer model's input, output and initializers to float16."""
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = F16
    for i, t in enumerate(model.graph.initializer):
        model.graph.initializer[i].CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    return model


def close_fp16(actual, expected):
    """fp16 keeps ~3 significant digits; a factorised chain rounds its intermediates too."""
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=0, atol=1e-2 * scale)


# --- fp16 and bf16 ------------------------------------------------------------------------

@pytest.mark.parametrize("method,ranks", [("svd", (8,)), ("tucker", (12, 8)), ("cp", (6,))])
def test_fp16_conv_full_rank_matches_float64_reference(rng, method, ranks):
    if method == "cp":  # a kernel of exact CP rank 6
        f = [rng.standard_normal((n, 6)) for n in (12, 8, 3, 3)]
        w = np.einsum("tr,sr,ar,br->tsab", *f).astype(np.float16)
    else:
        w = rng.standard_normal((12, 8, 3, 3)).astype(np.float16)
    b = rng.standard_normal(12).astype(np.float16)
    model = as_fp16(conv_model(w, b, (1, 8, 9, 9), pads=[1, 1, 1, 1], strides=[2, 1]))
    full = (min(12, 8 * 9),) if method == "svd" else ranks
    out, factors = rewrite(model, method, full)
    assert {t.data_type for t in out.graph.initializer} == {F16}  # written back in fp16
    assert out.graph.input[0].type.tensor_type.elem_type == F16
    arrays = factors.arrays if isinstance(factors.arrays, tuple) else vars(factors.arrays).values()
    assert all(a.dtype == np.float64 for a in arrays if isinstance(a, np.ndarray))  # in float64
    x = rng.standard_normal((1, 8, 9, 9)).astype(np.float16)
    expected = conv_nd(x, w, b, [2, 1], [1, 1, 1, 1])
    close_fp16(ort_run(out, {"x": x})[0], expected)


def test_fp16_gemm_and_matmul_full_rank_match_float64_reference(rng):
    b = rng.standard_normal((20, 12)).astype(np.float16)
    c = rng.standard_normal(12).astype(np.float16)
    model = as_fp16(gemm_model(b, c, a_shape=(4, 20), alpha=0.5, beta=2.0))
    out, _ = rewrite(model, "svd", (12,))
    a = rng.standard_normal((4, 20)).astype(np.float16)
    close_fp16(ort_run(out, {"a": a})[0], gemm(a, b, c, 0.5, 2.0))
    w = rng.standard_normal((16, 10)).astype(np.float16)
    out, _ = rewrite(as_fp16(matmul_model(w, (2, 3, 16))), "svd", (10,))
    x = rng.standard_normal((2, 3, 16)).astype(np.float16)
    close_fp16(ort_run(out, {"x": x})[0], x.astype(np.float64) @ w.astype(np.float64))


def test_fp16_model_optimised_and_verified_end_to_end(rng):
    """A kernel of exact Tucker ranks (16, 8): the factorised fp16 model differs from the
    original by fp16 rounding only, and verification (in fp16) sees just that."""
    core = rng.standard_normal((16, 8, 3, 3))
    u_out, u_in = rng.standard_normal((32, 16)), rng.standard_normal((16, 8))
    w = (np.einsum("oikl,to,si->tskl", core, u_out, u_in) / 10).astype(np.float16)
    model = as_fp16(conv_model(w, None, (1, 16, 10, 10)))
    out, report = optimize(model, "tucker", "0.5", max_error=0.02)
    assert report.records[0].status == FACTORISED and report.records[0].ranks == (16, 8)
    assert report.bound_met and 0 < report.output_error < 5e-3
    assert {t.data_type for t in out.graph.initializer} == {F16}


def test_fp16_factor_that_would_overflow_keeps_the_layer():
    """B = 30000·1 (16×12) is fine in fp16, but its SVD factor S·Vᵀ holds 30000·√16 = 120000,
    beyond fp16's 65504: written back it would be inf, so the layer is kept, with the reason."""
    model = as_fp16(gemm_model(np.full((16, 12), 30000, np.float16), a_shape=(2, 16)))
    out, report = optimize(model, "svd", "1", max_error=None, verify=False)
    (rec,) = report.records
    assert rec.status == DECLINED and "beyond the largest float16" in rec.reason
    assert [n.op_type for n in out.graph.node] == ["Gemm"]


def bf16_conv(rng):
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    t = helper.make_tensor("W", TensorProto.BFLOAT16, w.shape, w.ravel().tolist())
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")]
    return make_model(nodes, [vinfo("x", [1, 8, 9, 9], TensorProto.BFLOAT16)],
                      [vinfo("y", None, TensorProto.BFLOAT16)], [t]), w


def test_bf16_factorised_in_bf16_and_verification_says_it_cannot_run(rng):
    model, w = bf16_conv(rng)
    out, report = optimize(model, "svd", "8", max_error=None, verify=False)
    assert report.records[0].status == FACTORISED
    inits = {t.name: t for t in out.graph.initializer}
    assert {t.data_type for t in inits.values()} == {TensorProto.BFLOAT16}
    w_in = numpy_helper.to_array(inits["conv/svd/W_in"]).astype(np.float64).reshape(8, -1)
    w_out = numpy_helper.to_array(inits["conv/svd/W_out"]).astype(np.float64).reshape(16, 8)
    u, s, vt = np.linalg.svd(w.reshape(16, -1).astype(np.float64), full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vt[:8]  # the rank-8 optimum the bf16 factors should round to
    assert np.linalg.norm(w_out @ w_in - best) / np.linalg.norm(best) < 2e-2
    with pytest.raises(OnnxlrError, match="verification could not run: input 'x' is BFLOAT16") as e:
        optimize(model, "svd", "8", max_error=0.05)
    assert "--no-verify --max-error none" in str(e.value)


# --- quantized models ---------------------------------------------------------------------

def quantized_model(rng):
    """QLinearConv, MatMulInteger and a Conv whose weight comes from DequantizeLinear."""
    wq = rng.integers(-8, 8, (4, 2, 3, 3)).astype(np.int8)
    inits = [init("x_s", np.float32(0.05)), init("x_z", np.uint8(128)), init("w_q", wq),
             init("w_s", np.float32(0.1)), init("w_z", np.int8(0)), init("y_s", np.float32(0.2)),
             init("y_z", np.uint8(128)), init("m_w", rng.integers(0, 4, (3, 4)).astype(np.uint8)),
             init("d_w", wq.astype(np.int8)), init("d_s", np.float32(0.1)),
             init("d_z", np.int8(0))]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"], name="quant"),
        helper.make_node("QLinearConv", ["xq", "x_s", "x_z", "w_q", "w_s", "w_z", "y_s", "y_z"],
                         ["yq"], name="qconv"),
        helper.make_node("MatMulInteger", ["yq", "m_w"], ["mi"], name="mmint"),
        helper.make_node("DequantizeLinear", ["d_w", "d_s", "d_z"], ["dw"], name="deq"),
        helper.make_node("Conv", ["x", "dw"], ["dc"], name="deq_conv"),
    ]
    return make_model(nodes, [vinfo("x", [1, 2, 5, 5])],
                      [vinfo("mi", [1, 4, 3, 4], TensorProto.INT32), vinfo("dc", [1, 4, 3, 3])],
                      inits, opset=13)


def test_quantized_layers_left_alone_with_reason(rng):
    model = quantized_model(rng)
    out, report = optimize(model, "auto", "0.5", max_error=0.01)
    recs = by_name(report)
    assert "quantized layer (QLinearConv)" in recs["qconv"].reason
    assert "quantized layer (MatMulInteger)" in recs["mmint"].reason
    assert "DequantizeLinear" in recs["deq_conv"].reason
    assert all(r.status == DECLINED for r in report.records)
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    after = {t.name: t.SerializeToString() for t in out.graph.initializer}
    assert after == before and report.output_error == 0.0


# --- dynamic dims, opsets -----------------------------------------------------------------

def test_dynamic_batch_and_sequence_dims(rng):
    w = rng.standard_normal((32, 24)).astype(np.float32)
    model = matmul_model(w, ["batch", "seq", 32])
    out, report = optimize(model, "svd", "4", max_error=None, input_shapes={"x": (3, 7, 32)})
    assert report.records[0].status == FACTORISED and "x[3, 7, 32]" in report.verify_inputs
    dims = [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim[:2]]
    assert dims == ["batch", "seq"]  # the dims stay symbolic
    x = rng.standard_normal((5, 2, 32)).astype(np.float32)  # another batch and length
    assert ort_run(out, {"x": x})[0].shape == (5, 2, 24)
    conv = conv_model(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), None, ["N", 8, 9, 9])
    _, report = optimize(conv, "tucker", "0.5", max_error=None, batch=3)
    assert "x[3, 8, 9, 9]" in report.verify_inputs


def export_style_linear(rng, *, transposed: bool, tied: bool = False):
    """A PyTorch-export-like linear layer on [batch, seq, 32]: ``Add(bias, MatMul(x, W))`` with W
    stored as given or as ``Transpose`` of the [out, in] weight (exports made without constant
    folding); ``tied`` also uses that weight as an embedding table (a tied head)."""
    # rank 8: a rank-8 factorisation is the same map, so the check is exact
    w_out_in = (rng.standard_normal((24, 8)) @ rng.standard_normal((8, 32))).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    nodes = []
    if transposed:
        nodes.append(helper.make_node("Transpose", ["W"], ["Wt"], name="t", perm=[1, 0]))
        inits = [init("W", w_out_in)]
    else:
        inits = [init("Wt", w_out_in.T.copy())]
    nodes += [helper.make_node("MatMul", ["x", "Wt"], ["h"], name="lin/MatMul"),
              helper.make_node("Add", ["b", "h"], ["y"], name="lin/Add")]
    inputs, outputs = [vinfo("x", ["batch", "seq", 32])], [vinfo("y", None)]
    if tied:
        nodes.append(helper.make_node("Gather", ["W", "ids"], ["emb"], name="embed"))
        inputs.append(vinfo("ids", ["batch", "seq"], TensorProto.INT64))
        outputs.append(vinfo("emb", None))
    return make_model(nodes, inputs, outputs, inits + [init("b", bias)]), w_out_in, bias


@pytest.mark.parametrize("transposed", [False, True])
def test_matmul_with_add_bias_and_transposed_weight_is_a_candidate(rng, transposed):
    model, w, bias = export_style_linear(rng, transposed=transposed)
    out, report = optimize(model, "svd", "8", max_error=1e-4)
    rec = by_name(report)["lin/MatMul"]
    assert rec.status == FACTORISED and rec.weight_shape == (32, 24), rec.reason
    assert "x[1, 128, 32]" in report.verify_inputs  # seq defaulted, no --input-shape needed
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], want, rtol=1e-4, atol=1e-4)


def test_transposed_weight_tied_to_an_embedding_is_declined_with_the_reason(rng):
    model, _, _ = export_style_linear(rng, transposed=True, tied=True)
    _, report = optimize(model, "svd", "8", max_error=None)
    rec = by_name(report)["lin/MatMul"]
    assert rec.status == DECLINED
    assert rec.reason == ("weight is a Transpose of 'W', which 1 other node(s) also use (tied "
                          "weights, e.g. a head sharing an embedding): left alone")


def opset_model(opset: int, rng):
    """Conv → Flatten → Gemm (with C) → MatMul, at ``opset``, with that opset's IR version;
    before IR 4 every initializer is also a graph input."""
    inits = [init("W", rng.standard_normal((8, 4, 3, 3)).astype(np.float32)),
             init("B", rng.standard_normal((8 * 5 * 5, 24)).astype(np.float32)),
             init("C", rng.standard_normal(24).astype(np.float32)),
             init("M", rng.standard_normal((24, 20)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "B", "C"], ["g"], name="fc"),
             helper.make_node("MatMul", ["g", "M"], ["y"], name="proj")]
    inputs = [vinfo("x", [1, 4, 7, 7])]
    ir = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    if ir < 4:
        inputs += [vinfo(t.name, list(t.dims)) for t in inits]
    model = make_model(nodes, inputs, [vinfo("y", [1, 20])], inits, opset=opset)
    model.ir_version = ir
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset", [7, 8, 9, 10, 11, 13, 17, onnx.defs.onnx_opset_version()])
def test_opsets_7_to_latest(opset, rng):
    model = opset_model(opset, rng)
    out, report = optimize(model, "auto,conv=svd", "0.5", max_error=None)
    recs = by_name(report)
    assert recs["conv"].status == FACTORISED and recs["proj"].status == FACTORISED
    if opset < 11:
        assert "opset" in recs["fc"].reason and recs["fc"].status == DECLINED
    else:
        assert recs["fc"].status == FACTORISED
    assert [o.version for o in out.opset_import] == [opset] and out.ir_version == model.ir_version
    onnx.checker.check_model(out)  # IR 3: every new initializer is listed as an input too
    if model.ir_version < 4:  # the weights left keep their places, new ones come after
        assert [i.name for i in out.graph.input][:3] == ["x", "B", "C"]
        assert {t.name for t in out.graph.initializer} == {i.name for i in out.graph.input[1:]}
    assert np.isfinite(report.output_error) and report.output_error < 1


def test_weight_that_is_also_a_graph_input_is_left_alone(rng):
    """From IR 4 on an initializer listed as an input is a default the user may override."""
    w = rng.standard_normal((32, 24)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")],
                       [vinfo("x", [4, 32]), vinfo("W", [32, 24])], [vinfo("y", [4, 24])],
                       [init("W", w)])
    out, report = optimize(model, "svd", "4", max_error=None)
    assert "also a graph input" in report.records[0].reason
    assert [i.name for i in out.graph.input] == ["x", "W"]
    w2 = rng.standard_normal((32, 24)).astype(np.float32)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"x": x, "W": w2})[0], x @ w2, rtol=1e-5, atol=1e-5)


# --- subgraphs, custom ops, outputs, shapes -----------------------------------------------

def control_flow_model(rng):
    """Top-level MatMuls (one shares its weight with an If branch), and MatMuls inside If
    branches, a Loop body and a Scan body (weights in the outer scope and inside the bodies)."""
    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "Wt"], ["t"], name="then_mm")],
                               "then", [], [vinfo("t", [4, 32])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "We"], ["e"], name="else_mm")],
                               "else", [], [vinfo("e", [4, 32])], [init("We", w(32, 32))])
    loop_g = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"], name="loop_cond"),
         helper.make_node("MatMul", ["v_in", "Wl"], ["v_out"], name="loop_mm")],
        "loop", [vinfo("i", [], TensorProto.INT64), vinfo("c_in", [], TensorProto.BOOL),
                 vinfo("v_in", [4, 32])], [vinfo("c_out", [], TensorProto.BOOL),
                                           vinfo("v_out", [4, 32])], [init("Wl", w(32, 32) / 6)])
    scan_g = helper.make_graph(
        [helper.make_node("MatMul", ["row", "Ws"], ["h"], name="scan_mm"),
         helper.make_node("Add", ["s_in", "h"], ["s_out"], name="scan_add"),
         helper.make_node("Identity", ["h"], ["h_out"], name="scan_id")],
        "scan", [vinfo("s_in", [1, 32]), vinfo("row", [1, 32])],
        [vinfo("s_out", [1, 32]), vinfo("h_out", [1, 32])])
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["main"], name="main_mm"),
        helper.make_node("MatMul", ["x", "Wt"], ["shared"], name="shared_mm"),  # Wt: If too
        helper.make_node("If", ["cond"], ["y_if"], name="branch", then_branch=then_g,
                         else_branch=else_g),
        helper.make_node("Loop", ["trips", "true", "x"], ["y_loop"], name="loop", body=loop_g),
        helper.make_node("Scan", ["s0", "xs"], ["y_scan", "y_rows"], name="scan", body=scan_g,
                         num_scan_inputs=1),
    ]
    inits = [init("W0", w(32, 32)), init("Wt", w(32, 32)), init("Ws", w(32, 32)),
             init("trips", np.array(2, np.int64)), init("true", np.array(True)),
             init("s0", np.zeros((1, 32), np.float32))]
    return make_model(nodes, [vinfo("x", [4, 32]), vinfo("cond", [], TensorProto.BOOL),
                              vinfo("xs", [4, 1, 32])],
                      [vinfo("main", [4, 32]), vinfo("shared", [4, 32]), vinfo("y_if", [4, 32]),
                       vinfo("y_loop", [4, 32]), vinfo("y_scan", [1, 32]),
                       vinfo("y_rows", [4, 1, 32])], inits)


def test_layers_inside_if_loop_scan_are_left_alone_and_stated(rng):
    model = control_flow_model(rng)
    out, report = optimize(model, "svd", "4", max_error=None)
    recs = by_name(report)
    assert recs["main_mm"].status == FACTORISED
    assert "shared by 2 nodes" in recs["shared_mm"].reason  # the other user is in a branch
    for name, where in (("then_mm", "If 'branch'"), ("else_mm", "If 'branch'"),
                        ("loop_mm", "Loop 'loop'"), ("scan_mm", "Scan 'scan'")):
        assert recs[name].status == DECLINED
        assert recs[name].kind == "matmul" or "shared by 2 nodes" in recs[name].reason
        assert where in recs[name].reason and "left alone" in recs[name].reason
    x = rng.standard_normal((4, 32)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond), "xs": x.reshape(4, 1, 32)}
        before, after = ort_run(model, feeds), ort_run(out, feeds)
        for a, b in zip(before[1:], after[1:]):  # everything computed inside subgraphs: unchanged
            np.testing.assert_array_equal(a, b)
        assert 0 < np.linalg.norm(after[0] - before[0]) / np.linalg.norm(before[0]) < 1


def custom_op_model(rng):
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Frobnicate", ["c"], ["y"], name="frob", domain="com.example")]
    return make_model(nodes, [vinfo("x", [1, 8, 9, 9])], [vinfo("y", [1, 16, 7, 7])],
                      [init("W", rng.standard_normal((16, 8, 3, 3)).astype(np.float32))],
                      extra_opsets=[("com.example", 1)])


def test_custom_op_ort_does_not_know(rng, tmp_path, capsys):
    model = custom_op_model(rng)
    out, report = optimize(model, "tucker", "0.5", max_error=None, verify=False)
    assert report.records[0].status == FACTORISED
    assert [n.op_type for n in out.graph.node][-1] == "Frobnicate"
    assert {o.domain for o in out.opset_import} == {"", "com.example"}
    with pytest.raises(OnnxlrError, match="verification could not run: .*Frobnicate") as e:
        optimize(model, "tucker", "0.5", max_error=0.05)
    assert "--no-verify --max-error none" in str(e.value) and "\n" not in str(e.value)
    from onnxlr.cli import main
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verification could not run" in err[0]
    assert not (tmp_path / "o.onnx").exists()
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--no-verify",
                 "--max-error", "none", "--method", "tucker", "--rank", "0.5"]) == 0
    assert load_model(tmp_path / "o.onnx").graph.node[-1].op_type == "Frobnicate"


def test_several_outputs_unused_initializer_no_shape_info(rng, tmp_path):
    """Outputs without a shape (the checker alone would refuse them), no value_info, an
    initializer nothing reads: loaded, optimised, verified on every output, saved."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    graph = helper.make_graph(
        nodes, "g", [vinfo("x", [1, 8, 9, 9])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
        [init("W", rng.standard_normal((16, 8, 3, 3)).astype(np.float32)),
         init("unused", np.ones(5, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded = load_model(path)
    out, report = optimize(loaded, "tucker", "0.5", max_error=1.0)
    assert report.records[0].status == FACTORISED
    assert [o.name for o in report.comparison.outputs] == ["c", "r"]
    assert [o.name for o in out.graph.output] == ["c", "r"]
    check_model(out, what="result")
    save_model(out, tmp_path / "o.onnx")
    assert load_model(tmp_path / "o.onnx").graph.output[1].name == "r"


# --- big models ---------------------------------------------------------------------------

def test_over_2gb_path_with_a_small_threshold(rng, tmp_path, monkeypatch):
    """The >2 GB code paths, exercised on a small model: the result is saved with external data
    (save threshold) and both models reach ONNX Runtime through temporary external-data
    files (session limit), with the same numbers as in memory."""
    model = conv_model(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), None,
                       (1, 16, 9, 9))
    _, direct = optimize(model, "tucker", "0.5", max_error=None)
    monkeypatch.setattr(verify, "SESSION_BYTES_LIMIT", 100)
    out, via_files = optimize(model, "tucker", "0.5", max_error=None)
    assert via_files.output_error == direct.output_error
    save_model(out, tmp_path / "o.onnx", threshold=1000)
    assert (tmp_path / "o.onnx.data").stat().st_size > 1000
    assert load_model(tmp_path / "o.onnx").SerializeToString() == out.SerializeToString()


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np, onnx
    from onnx import helper, numpy_helper
    from onnxlr.io import load_model, save_model

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    folder, step = sys.argv[1], sys.argv[2]
    n, size = 8, 4_000_000  # 8 tensors of 16 MB: 128 MB of weights
    if step == "build":
        model = helper.make_model(helper.make_graph([], "g", [], []),
                                  opset_imports=[helper.make_opsetid("", 17)])
        for i in range(n):  # built in place, one tensor at a time: the peak stays ~1 model
            model.graph.initializer.add().CopyFrom(
                numpy_helper.from_array(np.full(size, i, np.float32), f"w{i}"))
        names = [f"w{i}" for i in range(n)]
        model.graph.node.add().CopyFrom(helper.make_node("Concat", names, ["y"], axis=0))
        model.graph.output.add().CopyFrom(helper.make_tensor_value_info("y", 1, None))
        base = peak()
        save_model(model, folder + "/big.onnx", threshold=1000)
        print(peak() - base)
    else:
        base = peak()
        model = load_model(folder + "/big.onnx")
        print(peak() - base, n * size * 4)
""")


def test_big_model_is_never_held_twice(tmp_path):
    """Saving with external data adds at most about one tensor to the peak memory, and loading
    holds the weights about once (not the file's bytes and the model side by side)."""
    run = [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)]
    saved = subprocess.run(run + ["build"], capture_output=True, text=True, timeout=120)
    assert saved.returncode == 0, saved.stderr
    assert int(saved.stdout) < 64e6  # 128 MB model; a whole copy would add ≥ 128 MB
    loaded = subprocess.run(run + ["load"], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    growth, size = map(int, loaded.stdout.split())
    assert growth < 1.4 * size  # the weights once, plus a tensor or two in flight
