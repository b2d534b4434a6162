"""Per-layer profiling: ORT trace events summed back to the original layers.

Attribution is checked twice: on hand-made traces with the names ORT gives
optimised nodes (exact sums), and on real traces of a factorised model, against
a plain prefix sum over the raw event names.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import init, make_model, vinfo
from onnx import helper

from onnxlr.errors import OnnxlrError
from onnxlr.pipeline import optimize
from onnxlr.profiling import OTHER, attribute_events, compare_profiles, layer_names, profile_layers


def two_convs():
    """Conv3x3 → Relu → Conv3x3 → Relu, channels a multiple of 8 (ORT's NCHWc blocks)."""
    r = np.random.default_rng(0)
    inits = [init("w1", (r.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)),
             init("b1", (r.standard_normal(16) * 0.1).astype(np.float32)),
             init("w2", (r.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv_a", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu_a"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv_b", pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["y"], name="relu_b")]
    return make_model(nodes, [vinfo("x", [1, 8, 12, 12])], [vinfo("y", None)], inits)


@pytest.fixture(scope="module")
def factorised():
    model = two_convs()
    result, report = optimize(model, "tucker", "0.5", max_error=None, verify=False)
    assert [r.status for r in report.records] == ["factorised", "factorised"]
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 8, 12, 12)).astype(np.float32)}
    return model, result, feeds


def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur, "ph": "X", "args": {}}


def _kernel(name, op, ts, dur):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "ph": "X",
            "args": {"op_name": op}}


def test_layer_names_from_metadata_and_graph(factorised):
    model, result, _ = factorised
    assert layer_names(model) == {"conv_a": None, "conv_b": None}
    assert layer_names(result) == {"conv_a": "tucker", "conv_b": "tucker"}


def test_attribution_sums_factorised_parts_and_ort_renames(factorised):
    _, result, _ = factorised
    parts = [n.name for n in result.graph.node if n.name.startswith("conv_a/tucker/")]
    assert len(parts) >= 2
    core = next(n for n in result.graph.node if n.name.startswith("conv_b/tucker/core"))
    last_b = [n for n in result.graph.node if n.name.startswith("conv_b/")][-1]
    relu_b = next(n for n in result.graph.node if n.name == "relu_b")
    # two runs; µs durations; the first is a warm-up
    events = [_run(0, 1000), _run(2000, 1000), {"cat": "Session", "name": "session_initialization",
                                                  "ts": -50, "dur": 10, "args": {}}]
    for base, scale in ((0, 1), (2000, 2)):
        events += [_kernel(p, "Conv", base + 10 + i, 100 * scale) for i, p in enumerate(parts)]
        events += [
            _kernel("relu_a", "Relu", base + 300, 7 * scale),
            _kernel(f"{core.output[0]}_nchwc", "Conv", base + 400, 50 * scale),       # NCHWc rename
            _kernel(f"{relu_b.output[0]}_nchwc", "Conv", base + 500, 30 * scale),  # +Relu fused
            _kernel("fused " + last_b.name + "_token_3", "FusedConv", base + 600, 5 * scale),
            _kernel("ReorderOutput_token_7", "ReorderOutput", base + 700, 3 * scale),
        ]
    events.append(_kernel("conv_a", "Conv", 5000, 999))  # outside every run: ignored
    runs = attribute_events(events, result, skip_runs=1)
    assert set(runs) == {"conv_a", "conv_b", OTHER}
    assert runs["conv_a"] == [pytest.approx(len(parts) * 100 * 2 / 1e3)]
    assert runs["conv_b"] == [pytest.approx((50 + 30 + 5) * 2 / 1e3)]
    assert runs[OTHER] == [pytest.approx((7 + 3) * 2 / 1e3)]
    both = attribute_events(events, result)
    assert both["conv_a"] == [pytest.approx(len(parts) * 0.1), pytest.approx(len(parts) * 0.2)]


def test_attribution_of_original_model_walks_fusions_back_to_the_conv():
    model = two_convs()
    events = [_run(0, 1000), _kernel("r1_nchwc", "Conv", 10, 40),          # conv_a + relu_a
              _kernel("fused conv_b", "FusedConv", 60, 20), _kernel("y_nchwc", "Conv", 90, 1),
              _kernel("conv_b/MatMulAddFusion", "Gemm", 95, 2)]
    runs = attribute_events(events, model)
    assert runs == {"conv_a": [0.04], "conv_b": [pytest.approx(0.023)], OTHER: [0.0]}


@pytest.mark.parametrize("opt_level", ["disable", "all"])
def test_compare_profiles_on_a_factorised_model(factorised, opt_level, tmp_path, monkeypatch):
    import tempfile
    model, result, feeds = factorised
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    prof = compare_profiles(model, result, feeds, threads=1, iterations=5, warmup=1,
                            opt_level=opt_level)
    assert list(prof) == ["conv_a", "conv_b", OTHER]
    for layer in ("conv_a", "conv_b"):
        assert prof[layer]["before_ms"] > 0 and prof[layer]["after_ms"] > 0
    assert list(tmp_path.iterdir()) == []   # ORT's trace files are removed


def test_real_trace_matches_a_prefix_sum_over_raw_names(factorised, tmp_path):
    """Without ORT graph rewrites the executed names are the model's: the per-layer sum must be
    the sum over events named ``<layer>/tucker/…`` (all parts of the layer, nothing else)."""
    import onnxruntime as ort
    _, result, feeds = factorised
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "p")
    sess = ort.InferenceSession(result.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, feeds)
    with open(sess.end_profiling()) as fh:
        events = json.load(fh)
    runs = attribute_events(events, result)
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for layer in ("conv_a", "conv_b"):
        expect = sum(e["dur"] for e in kernels if e["name"].startswith(f"{layer}/tucker/")) / 1e3
        n_parts = len({e["name"] for e in kernels if e["name"].startswith(f"{layer}/tucker/")})
        assert n_parts >= 2
        assert sum(runs[layer]) == pytest.approx(expect)
        assert len(runs[layer]) == 3
    assert sum(runs[OTHER]) == pytest.approx(
        sum(e["dur"] for e in kernels if e["name"].startswith("relu_")) / 1e3)


def test_profile_layers_single_model_and_errors(factorised):
    model, _, feeds = factorised
    prof = profile_layers(model, feeds, threads=1, iterations=3, warmup=1, layers=["conv_b"])
    assert list(prof) == ["conv_b", OTHER] and prof["conv_b"] > 0
    with pytest.raises(OnnxlrError, match="iterations"):
        profile_layers(model, feeds, iterations=0)
    with pytest.raises(OnnxlrError, match="provider"):
        profile_layers(model, feeds, provider="nope")
