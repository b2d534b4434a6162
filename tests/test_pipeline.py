"""optimize() end to end on small graphs: preservation, BN folding, declines, the error bound."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import gemm_model, init, make_model, ort_run, tiny_cnn, vinfo
from onnx import helper

from onnxlr.pipeline import optimize, prepare
from onnxlr.records import DECLINED, FACTORISED, REVERTED


def feeds(seed=1, n=4):
    return {"input": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def by_name(report):
    return {r.name: r for r in report.records}


def test_prepare_folds_bn_and_constants_exactly():
    model = tiny_cnn()
    prepared = prepare(model)
    op_types = [n.op_type for n in prepared.graph.node]
    assert "BatchNormalization" not in op_types and "Constant" not in op_types
    onnx.checker.check_model(prepared)
    for a, b in zip(ort_run(model, feeds()), ort_run(prepared, feeds())):
        assert rel(a, b) < 1e-5


def test_optimize_preserves_model_and_records_provenance():
    model = tiny_cnn()
    out, report = optimize(model, "auto", "0.4", max_error=None)
    onnx.checker.check_model(out, full_check=True)
    assert out.doc_string == "tiny test model" and out.graph.doc_string == "graph doc"
    assert out.producer_name == "onnxlr-tests"
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["author"] == "tests" and meta["onnxlr.version"] and meta["onnxlr.rank"] == "0.4"
    assert {o.domain for o in out.opset_import} >= {"", "ai.onnx.ml"}
    recs = by_name(report)
    assert recs["conv2"].status == FACTORISED and recs["conv2"].method == "tucker"
    assert recs["conv3"].status == FACTORISED and recs["conv3"].method == "svd"
    assert recs["fc1"].status == FACTORISED       # weight came from a Constant node
    assert recs["fc2"].status == FACTORISED and recs["fc2"].kind == "matmul"
    assert "fc2_bias" in [n.name for n in out.graph.node]  # the bias Add is kept
    assert '"conv2"' in meta["onnxlr.layers"]
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    # both outputs still produced, the ml Normalizer untouched
    y0, y1 = ort_run(model, feeds()), ort_run(out, feeds())
    assert len(y1) == 2 and y1[1].shape == y0[1].shape
    assert report.bound_met is None  # verified, but no bound asked for


def test_error_decreases_as_rank_grows():
    model = tiny_cnn()
    ref = ort_run(model, feeds())[0]
    errors = []
    for rank in ("0.25", "0.5", "0.75"):
        out, report = optimize(model, "auto,conv1x1=svd", rank, max_error=None, verify=False)
        errors.append(rel(ref, ort_run(out, feeds())[0]))
    assert errors[0] > errors[1] > errors[2] > 0, errors


def test_verification_reports_outputs():
    _, report = optimize(tiny_cnn(), "auto", "0.5", max_error=10.0)
    names = [o.name for o in report.comparison.outputs]
    assert names == ["logits", "normalized"]
    logits = report.comparison.outputs[0]
    assert logits.top1_agreement is not None and 0 <= logits.top1_agreement <= 1
    assert report.bound_met is True


def test_bound_backs_off_layers_until_met():
    model = tiny_cnn()
    out, report = optimize(model, "auto", "0.25", max_error=0.02)
    assert report.bound_met is True
    assert report.output_error <= 0.02
    reverted = [r for r in report.records if r.status == REVERTED]
    assert reverted, "a 0.25 rank on every layer should miss a 2% bound"
    assert all("missed --max-error" in r.reason and r.output_error is not None for r in reverted)
    assert rel(ort_run(model, feeds())[0], ort_run(out, feeds())[0]) < 0.05


def test_bound_fail_mode_marks_result():
    _, report = optimize(tiny_cnn(), "auto", "0.25", max_error=1e-6, on_exceed="fail")
    assert report.bound_met is False
    assert any(r.status == FACTORISED for r in report.records)


def test_full_rank_is_never_emitted():
    _, report = optimize(tiny_cnn(), "auto", "1.0", max_error=None, verify=False)
    for r in report.records:
        if r.kind:
            assert r.status == DECLINED, r
    assert "not save" in by_name(report)["fc2"].reason or "nothing to gain" in by_name(report)["fc2"].reason


def test_shared_weight_is_left_alone():
    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["a", "W"], ["h"], name="fc_a"),
             helper.make_node("Gemm", ["h", "W"], ["y"], name="fc_b")]
    model = make_model(nodes, [vinfo("a", [2, 16])], [vinfo("y", [2, 16])], [init("W", w)])
    out, report = optimize(model, "svd", "2", max_error=None, verify=False)
    for r in report.records:
        assert r.status == DECLINED and "shared by 2 nodes" in r.reason
    assert len(out.graph.initializer) == 1


def test_activation_matmul_left_alone():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], name="attn")]
    model = make_model(nodes, [vinfo("a", [2, 4, 8]), vinfo("b", [2, 8, 4])], [vinfo("y", None)])
    _, report = optimize(model, "auto", "vbmf", max_error=None, verify=False)
    assert "activations" in report.records[0].reason


def test_include_exclude_and_layer_rank():
    model = tiny_cnn()
    _, report = optimize(model, "auto", "0.5", include=["conv*", "fc1"], exclude=["conv1"],
                         layer_ranks=["conv3=4"], max_error=None, verify=False)
    recs = by_name(report)
    assert recs["conv1"].reason == "excluded by --exclude"
    assert recs["fc2"].reason == "not matched by --include"
    assert recs["conv3"].ranks == (4,) and recs["conv3"].rank_rule == "4"


def test_rank_multiple_rounds_up():
    _, report = optimize(tiny_cnn(), "auto", "0.3", rank_multiple=8, max_error=None, verify=False)
    for r in report.records:
        if r.status == FACTORISED:
            full = r.weight_shape[:2] if r.kind == "conv" else None
            for i, k in enumerate(r.ranks):
                assert k % 8 == 0 or (full is not None and k == full[i]), r


def test_gemm_svd_end_to_end_numerics(rng):
    b = rng.standard_normal((40, 30)).astype(np.float32)
    c = rng.standard_normal(30).astype(np.float32)
    model = gemm_model(b, c, a_shape=(3, 40), alpha=0.5, beta=2.0)
    out, report = optimize(model, "svd", "8", max_error=None, verify=False)
    a = rng.standard_normal((3, 40)).astype(np.float32)
    u, s, vt = np.linalg.svd(b.astype(np.float64), full_matrices=False)
    b8 = (u[:, :8] * s[:8]) @ vt[:8]
    expected = 0.5 * a.astype(np.float64) @ b8 + 2.0 * c
    np.testing.assert_allclose(ort_run(out, {"a": a})[0], expected, atol=1e-4 * np.abs(expected).max())
    assert report.records[0].params_after == 8 * 70 + 30


def test_inspect_does_not_import_onnxruntime(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), path)
    code = ("import sys; from onnxlr.cli import main; rc = main(['inspect', %r]); "
            "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'; sys.exit(rc)" % str(path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "conv2" in done.stdout and "vbmf" in done.stdout


def test_the_factorise_config_is_frozen_and_the_builder_reconfigures_a_copy():
    """Nothing writes into a FactorizeConfig another room holds: the back-off, latency
    acceptance and budgets hand the builder new fields, and it builds from a replaced copy."""
    import dataclasses

    from onnxlr.passes.factorize import FactorizeConfig
    from onnxlr.pipeline import _Builder, prepare
    from onnxlr.rank import parse_rank

    config = FactorizeConfig(methods={"conv": "tucker"}, rank=parse_rank("0.5"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank_scale = {"conv1": 2.0}
    build = _Builder(prepare(tiny_cnn()), config, None)
    build.reconfigure(rank_scale={"conv1": 2.0}, forced_ranks={"conv2": (2, 2)})
    assert config.rank_scale == {} and config.forced_ranks == {}
    assert build.config.rank_scale == {"conv1": 2.0} and build.config.forced_ranks == {"conv2": (2, 2)}
    assert build.config.rank is config.rank
