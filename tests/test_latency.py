"""Layer timing and latency acceptance: isolation is exact, candidates are measured on the
layer's real input, the cache works, slow layers are reverted, and a slower whole model is
never returned. (Speed itself is measured in bench/, never asserted here.)"""
import json

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import conv_model, init, make_model, tiny_cnn, vinfo
from numpy_ref import conv_nd
from onnxlr import accept as accept_mod
from onnxlr.cli import main
from onnxlr.graph import to_graph
from onnxlr.latency import (LayerTimer, TimingCache, Trial, capture, capture_batches, isolate,
                            layer_inputs, pick_fastest, rank_variants)
from onnxlr.methods import parse_method
from onnxlr.passes.factorize import FactorizeConfig
from onnxlr.pipeline import optimize, prepare
from onnxlr.rank import parse_rank
from onnxlr.records import FACTORISED, REVERTED


def test_rank_variants_round_up_and_cap():
    assert rank_variants((13, 5), (64, 6)) == [(13, 5), (16, 6)]
    assert rank_variants((16,), (100,)) == [(16,)]
    assert rank_variants((3, 40), (64, 64)) == [(3, 40), (8, 40), (16, 48)]


def test_pick_fastest_prefers_speed_then_accuracy():
    a = Trial((8,), ms_before=2.0, ms_after=1.0, local_error=0.3)
    b = Trial((16,), ms_before=2.0, ms_after=1.0, local_error=0.1)
    c = Trial((4,), reason="would not save work")
    assert pick_fastest([a, b, c]) is b
    assert pick_fastest([c]) is None


def _low_rank_conv(rng, t=24, s=16, r=(4, 6)):
    core = rng.standard_normal((r[0], r[1], 3, 3))
    u_out, u_in = rng.standard_normal((t, r[0])), rng.standard_normal((s, r[1]))
    return np.einsum("abhw,ta,sb->tshw", core, u_out, u_in).astype(np.float32)


def _timer(model, method="tucker", cache_path=None):
    config = FactorizeConfig(methods=parse_method(method), rank=parse_rank("0.5"))
    return LayerTimer(config, {o.domain: o.version for o in model.opset_import},
                      model.ir_version, timing_cache=TimingCache(cache_path),
                      seconds_per_pair=0.05)


def test_capture_and_isolate_compute_the_layer_on_its_real_input(rng):
    model = prepare(tiny_cnn())
    feeds = {"input": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    graph = to_graph(model)
    conv2 = next(n for n in graph.nodes if n.name == "conv2")
    values = capture(model, feeds, [t.name for t in layer_inputs(conv2)])
    x = values["r1"]
    assert x.shape == (2, 16, 8, 8)
    # the captured activation is the model's: conv1 (BN folded) + relu, in float64
    conv1 = next(n for n in graph.nodes if n.name == "conv1")
    ref = np.maximum(conv_nd(feeds["input"], conv1.inputs[1].values, conv1.inputs[2].values,
                             pads=[1, 1, 1, 1]), 0)
    np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-4)
    iso, iso_feeds = isolate(conv2, values, {"": 17}, model.ir_version)
    from conftest import ort_run
    exported = onnx.shape_inference.infer_shapes(__import__("onnx_graphsurgeon").export_onnx(iso))
    onnx.checker.check_model(exported)
    (y,) = ort_run(exported, iso_feeds)
    np.testing.assert_allclose(y, conv_nd(x, conv2.inputs[1].values, pads=[1, 1, 1, 1],
                                          strides=[2, 2]), rtol=1e-4, atol=1e-4)
    assert iso.outputs[0].shape == [2, 32, 4, 4]  # inferred: the layer's MACs are counted right


def test_trials_measure_error_on_the_captured_input(rng):
    w = _low_rank_conv(rng)
    model = conv_model(w, x_shape=(1, 16, 12, 12), pads=[1, 1, 1, 1])
    graph = to_graph(model)
    node = graph.nodes[0]
    x = rng.standard_normal((1, 16, 12, 12)).astype(np.float32)
    timer = _timer(model)
    trials = timer.trials(node, {"x": x}, "tucker", [(4, 6), (2, 3), (24, 16)])
    exact, low, full = trials
    assert exact.local_error < 1e-5 and exact.weight_error < 1e-5   # the weight has ranks (4, 6)
    assert low.local_error > 0.05                                     # below them it cannot be
    assert full.reason and "would not save work" in full.reason and full.speedup is None
    for t in (exact, low):
        assert t.ms_before > 0 and t.ms_after > 0 and t.macs > 0
    assert low.macs < exact.macs


def test_a_layer_is_isolated_once_for_all_its_candidates(rng, monkeypatch):
    """The one-node graph and the baseline session serve every candidate, and the next call
    for the same layer on the same arrays; other arrays isolate it anew."""
    import onnxlr.latency as latency
    from onnxlr import runtime

    w = _low_rank_conv(rng)
    model = conv_model(w, x_shape=(1, 16, 12, 12), pads=[1, 1, 1, 1])
    node = to_graph(model).nodes[0]
    x = rng.standard_normal((1, 16, 12, 12)).astype(np.float32)
    isolated, sessions = [], []
    real_isolate, real_session = latency.isolate, runtime.make_session
    monkeypatch.setattr(latency, "isolate", lambda *a: isolated.append(1) or real_isolate(*a))
    monkeypatch.setattr(runtime, "make_session",
                        lambda *a, **k: sessions.append(1) or real_session(*a, **k))
    timer = _timer(model)
    cheapest = timer.trials(node, {"x": x}, "tucker", [(2, 3)])
    rest = timer.trials(node, {"x": x}, "tucker", [(4, 6), (3, 4)])
    assert len(isolated) == 1 and len(sessions) == 1 + 3  # one baseline, one per candidate
    assert rest[0].local_error < 1e-5 < cheapest[0].local_error  # each on its own ranks
    fresh = timer.trials(node, {"x": x.copy()}, "tucker", [(4, 6)])
    assert len(isolated) == 2 and fresh[0].local_error < 1e-5


def test_timings_are_cached_on_disk(rng, tmp_path, monkeypatch):
    w = _low_rank_conv(rng)
    model = conv_model(w, x_shape=(1, 16, 12, 12), pads=[1, 1, 1, 1])
    node = to_graph(model).nodes[0]
    x = rng.standard_normal((1, 16, 12, 12)).astype(np.float32)
    path = tmp_path / "cache" / "latency.json"
    calls = []
    original_time = LayerTimer._time

    def counting(self, *a):
        calls.append(1)
        return original_time(self, *a)

    monkeypatch.setattr(LayerTimer, "_time", counting)
    timer = _timer(model, cache_path=path)
    first = timer.trials(node, {"x": x}, "tucker", [(4, 6)])
    timer.timing_cache.save()
    assert len(calls) == 1 and path.is_file() and len(json.loads(path.read_text())) == 1
    again = _timer(model, cache_path=path).trials(node, {"x": x}, "tucker", [(4, 6)])
    assert len(calls) == 1  # nothing re-timed
    assert again[0].ms_after == first[0].ms_after
    other = rng.standard_normal((1, 16, 20, 20)).astype(np.float32)  # another shape: re-timed
    _timer(model, cache_path=path).trials(node, {"x": other}, "tucker", [(4, 6)])
    assert len(calls) == 2


def test_unreadable_cache_is_ignored(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text("{not json")
    assert TimingCache(path).data == {}


def _factorised_nodes(model):
    return [n.name for n in model.graph.node if "/tucker/" in n.name or "/svd/" in n.name]


def test_accept_latency_reverts_layers_that_are_not_faster():
    model, report = optimize(tiny_cnn(), "auto", "0.5", max_error=None, accept="latency",
                             min_layer_speedup=1e9, latency_cache=None)
    timed = [r for r in report.records if r.candidates]
    assert timed, "some layers were factorised and timed"
    for rec in timed:
        assert rec.status == REVERTED
        assert "below --min-layer-speedup" in rec.reason
        assert sum(c["chosen"] for c in rec.candidates) <= 1
    assert not _factorised_nodes(model)


def _e2e(speedup):
    def fake(original, result, feeds, **kw):
        return {"provider": "cpu", "threads": None, "batch": 1, "iterations": 5,
                "before_ms": 1.0, "after_ms": 1.0 / speedup, "speedup": speedup}
    return fake


def test_accept_latency_keeps_the_fastest_candidate_when_faster(monkeypatch):
    # the whole tiny model is too small to be faster for real; the end-to-end measurement is
    # replaced so that the per-layer choice is what is tested here
    monkeypatch.setattr("onnxlr.pipeline.end_to_end", _e2e(1.5))
    model, report = optimize(tiny_cnn(), "auto", "0.5", max_error=None, accept="latency",
                             min_layer_speedup=1e-9, latency_cache=None)
    kept = [r for r in report.records if r.status == FACTORISED]
    assert kept
    for rec in kept:
        chosen = [c for c in rec.candidates if c["chosen"]]
        assert len(chosen) == 1 and tuple(chosen[0]["ranks"]) == rec.ranks
        assert rec.latency_before_ms > 0 and rec.latency_after_ms > 0
        assert rec.layer_speedup == pytest.approx(rec.latency_before_ms / rec.latency_after_ms)
    assert _factorised_nodes(model) and report.accept == "latency"


def test_accept_latency_never_returns_a_slower_model(monkeypatch):
    monkeypatch.setattr("onnxlr.pipeline.end_to_end", _e2e(0.5))
    source = tiny_cnn()
    model, report = optimize(source, "auto", "0.5", max_error=None, accept="latency",
                             min_layer_speedup=1e-9, latency_cache=None)
    assert [n.name for n in model.graph.node] == [n.name for n in source.graph.node]
    assert report.latency["returned"] == "input" and report.latency["rejected_speedup"] == 0.5
    assert not report.factorised
    reverted = [r for r in report.records if r.status == REVERTED]
    assert reverted and all("whole model measured 0.50x" in r.reason for r in reverted)
    assert report.output_error == 0.0


def test_end_to_end_reports_both_sides():
    model = tiny_cnn()
    feeds = {"input": np.ones((1, 3, 8, 8), np.float32)}
    lat = accept_mod.end_to_end(model, model, feeds, iterations=5, max_seconds=1)
    assert lat["batch"] == 1 and lat["before_ms"] > 0 and lat["after_ms"] > 0
    assert lat["iterations"] >= 5 and lat["speedup"] > 0


def test_latency_options_validated():
    from onnxlr.errors import OnnxlrError
    with pytest.raises(OnnxlrError, match="--accept"):
        optimize(tiny_cnn(), accept="speed")
    with pytest.raises(OnnxlrError, match="--no-verify"):
        optimize(tiny_cnn(), accept="latency", verify=False, max_error=None)
    with pytest.raises(OnnxlrError, match="--min-layer-speedup"):
        optimize(tiny_cnn(), min_layer_speedup=0)


def test_cli_accept_latency_writes_cache_and_report(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(batch=1), src)
    out, cache, rep = tmp_path / "o.onnx", tmp_path / "lat.json", tmp_path / "r.json"
    code = main(["optimize", str(src), "-o", str(out), "--rank", "0.5", "--accept", "latency",
                 "--min-layer-speedup", "0.000001", "--latency-cache", str(cache),
                 "--threads", "1", "--report", str(rep)])
    assert code == 0 and out.is_file() and cache.is_file()
    data = json.loads(rep.read_text())
    assert data["settings"]["method"] == "auto"
    onnx.checker.check_model(onnx.load(out))


def test_cli_profile_fills_the_report(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(batch=1), src)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["optimize", str(src), "-o", str(out), "--rank", "0.5", "--max-error", "none",
                 "--profile", "--threads", "1", "--report", str(rep)]) == 0
    profile = json.loads(rep.read_text())["profile"]
    factorised = [layer["name"] for layer in json.loads(rep.read_text())["layers"]
                  if layer["status"] == "factorised"]
    assert factorised
    for name in factorised:
        assert profile[name]["before_ms"] > 0 and profile[name]["after_ms"] > 0


def test_capture_batches_is_capture_of_each_batch_with_one_session(rng):
    model = prepare(tiny_cnn())
    batches = [{"input": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)} for n in (2, 3)]
    got = capture_batches(model, batches, ["r1", "input"])
    for feeds, one in zip(batches, got):
        alone = capture(model, feeds, ["r1", "input"])
        assert set(one) == {"r1", "input"}
        np.testing.assert_array_equal(one["input"], feeds["input"])
        np.testing.assert_allclose(one["r1"], alone["r1"], rtol=1e-6)
