"""An LSTM's hidden units as prune rungs: the built model is a float64 numpy LSTM with the
fitted weights followed by the consumer over ``E·y' + e``; the gated graph's rung computes
exactly the built model; keeping every unit reproduces the original; the chains that are
declined say why."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ort_run
from onnxlr.graph import to_graph, to_model
from onnxlr.latency import capture
from onnxlr.pipeline import prepare
from onnxlr.passes import lstm_units as units
from onnxlr.search import hidden_pruning as hp
from onnxlr.search.gated import GatedModel, Option
from onnxlr.search.pruning import PRUNE
from test_recurrent import numpy_lstm

T, I, H, OUT = 6, 12, 16, 10


def crnn_head(seed=0, *, between=None, consumer="Gemm", y_h_read=False, peephole=False,
              direction="bidirectional", weak_even_units=False):
    """x [T, N, I] → LSTM → Transpose [0,2,1,3] → Reshape [0,0,-1] → Reshape [-1, D·H]
    (target computed from Shape, as PyTorch exports it) → Gemm / MatMul → logits."""
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    w = rng.standard_normal((d, 4 * H, I)) * 0.4
    r = rng.standard_normal((d, 4 * H, H)) * 0.3
    b = rng.standard_normal((d, 8 * H)) * 0.1
    fc = rng.standard_normal((OUT, d * H)) * 0.3
    fc_b = rng.standard_normal(OUT) * 0.1
    if weak_even_units:  # as trained nets have: units that little reads
        weak = np.concatenate([k * H + np.arange(0, H, 2) for k in range(d)])
        fc[:, weak] *= 0.05
        r[:, :, 0::2] *= 0.05
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((w, "W"), (r, "R"), (b, "B"), (fc_b, "fc_b"))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
              (("flat", [0, 0, -1]), ("minus1", [-1]), ("two", [2]))]
    lstm_in = ["x", "W", "R", "B", "", "h0", "c0"]
    if peephole:
        inits.append(numpy_helper.from_array(np.zeros((d, 3 * H), np.float32), "P"))
        lstm_in.append("P")
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "one"], ["n"], axis=0),
        helper.make_node("Concat", ["dirs", "n", "hid"], ["state_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["state_shape"], ["h0"]),
        helper.make_node("ConstantOfShape", ["state_shape"], ["c0"]),
        helper.make_node("LSTM", lstm_in, ["y", "y_h", ""], name="lstm", hidden_size=H,
                         direction=direction),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["yt", "flat"], ["y3"]),
        helper.make_node("Shape", ["y3"], ["s3"]),
        helper.make_node("Gather", ["s3", "two"], ["feat"], axis=0),
        helper.make_node("Concat", ["minus1", "feat"], ["target"], axis=0),
        helper.make_node("Reshape", ["y3", "target"], ["y2"]),
    ]
    inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
              (("one", [1]), ("dirs", [d]), ("hid", [H]))]
    feed = "y2"
    if between:
        nodes.append(helper.make_node(between, ["y2"], ["y2b"]))
        feed = "y2b"
    if consumer == "Gemm":
        inits.append(numpy_helper.from_array(fc.astype(np.float32), "fc_w"))
        nodes.append(helper.make_node("Gemm", [feed, "fc_w", "fc_b"], ["logits"], name="fc",
                                      transB=1))
    else:
        inits.append(numpy_helper.from_array(fc.T.astype(np.float32), "fc_w"))
        nodes.append(helper.make_node("MatMul", [feed, "fc_w"], ["mm"], name="fc"))
        nodes.append(helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="fc_bias"))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    if y_h_read:
        nodes.append(helper.make_node("Identity", ["y_h"], ["state"]))
        outputs.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "crnn_head", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [T, "N", I])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, (w, r, b, fc, fc_b)


def _fit(model, keeps, n=64, seed=1):
    prepared = prepare(model)
    graph = to_graph(prepared)
    chain = units.trace(next(nd for nd in graph.nodes if nd.name == "lstm"), graph)
    assert isinstance(chain, units.HiddenChain), chain
    x = np.random.default_rng(seed).standard_normal((T, n, I)).astype(np.float32)
    got = capture(prepared, {"x": x}, ["y", chain.consumer.inputs[0].name])
    assert units.lines_up(got["y"], got[chain.consumer.inputs[0].name])
    fits = hp.fits_for(chain, x, got["y"].astype(np.float64), keeps, opset=17)
    return prepared, chain, fits


def _built(prepared, fit):
    graph = to_graph(prepared)
    assert hp.apply(graph, {"lstm": fit}) == {}
    return to_model(graph, prepared)


@pytest.mark.parametrize("consumer", ["Gemm", "MatMul"])
def test_the_pruned_model_is_the_numpy_lstm_and_the_consumer_over_the_mapped_units(consumer, rng):
    model, (_, _, _, fc, fc_b) = crnn_head(consumer=consumer)
    prepared, chain, fits = _fit(model, [8])
    f = fits[8]
    assert f.kept.shape == (2, 8) and f.w.shape == (2, 32, I) and f.r.shape == (2, 32, 8)
    built = _built(prepared, f)
    onnx.checker.check_model(built)
    lstm = next(n for n in built.graph.node if n.op_type == "LSTM")
    assert next(a.i for a in lstm.attribute if a.name == "hidden_size") == 8
    x = rng.standard_normal((T, 5, I))
    y = numpy_lstm(x, f.w, f.r, f.b)                                  # [T, 2, 5, 8]
    feats = y.transpose(0, 2, 1, 3).reshape(T * 5, 16)
    reference = (feats @ f.expand.T + f.offset) @ fc.T + fc_b
    got = ort_run(built, {"x": x.astype(np.float32)})[0]
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)
    fc_node = next(n for n in built.graph.node if n.name == "fc")
    w_fc = next(numpy_helper.to_array(t) for t in built.graph.initializer
                if t.name == fc_node.input[1])
    assert 16 in w_fc.shape and 32 not in w_fc.shape  # the consumer reads 2·8 features


def test_the_gated_rung_is_the_built_model(rng):
    model, _ = crnn_head()
    prepared, _, fits = _fit(model, [8, 12])
    gated = GatedModel(prepared, {"lstm": [Option(PRUNE, (8,)), Option(PRUNE, (12,))]},
                       lambda m, site, ranks: fits[ranks[0]], lambda m: hp.HiddenBuilder())
    onnx.checker.check_model(gated.model)
    x = {"x": rng.standard_normal((T, 4, I)).astype(np.float32)}
    np.testing.assert_allclose(gated.run({}, x)["logits"], ort_run(prepared, x)[0],
                               rtol=1e-5, atol=1e-5)
    for j, k in enumerate((8, 12)):
        np.testing.assert_allclose(gated.run({"lstm": j}, x)["logits"],
                                   ort_run(_built(prepared, fits[k]), x)[0],
                                   rtol=1e-4, atol=1e-4)


def test_keeping_every_unit_reproduces_the_model(rng):
    model, _ = crnn_head(direction="forward")
    prepared, _, fits = _fit(model, [H])
    x = {"x": rng.standard_normal((T, 3, I)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(_built(prepared, fits[H]), x)[0],
                               ort_run(prepared, x)[0], rtol=1e-3, atol=1e-3)


def test_the_fit_beats_slicing_the_first_units(rng):
    """Ranked units, refit gates and the least-squares map: closer to the original than the
    timing's stand-in (the first H' units, sliced) on inputs the fit never saw, on a layer
    whose even units little reads (which the ranking must find)."""
    model, _ = crnn_head(seed=2, weak_even_units=True)
    prepared, chain, fits = _fit(model, [8], n=128)
    x = {"x": rng.standard_normal((T, 32, I)).astype(np.float32)}
    ref = ort_run(prepared, x)[0]

    def err(fit):
        out = ort_run(_built(prepared, fit), x)[0]
        return np.linalg.norm(out - ref) / np.linalg.norm(ref)

    assert (fits[8].kept % 2 == 1).all()
    assert err(fits[8]) < 0.5 * err(units.first_units(chain, 8))


@pytest.mark.parametrize("kw, why", [
    ({"y_h_read": True}, "final states"),
    ({"peephole": True}, "peepholes"),
    ({"between": "Relu"}, "Relu"),
])
def test_chains_that_cannot_shrink_are_declined_with_why(kw, why):
    model, _ = crnn_head(**kw)
    graph = to_graph(prepare(model))
    got = units.trace(next(n for n in graph.nodes if n.name == "lstm"), graph)
    assert isinstance(got, str) and why in got


def test_ops_that_reorder_the_units_fail_the_values_check(rng):
    y = rng.standard_normal((T, 2, 3, H))
    assert units.lines_up(y, y.transpose(0, 2, 1, 3).reshape(T * 3, 2 * H))
    assert not units.lines_up(y, y.reshape(T, 3, 2 * H))  # directions interleaved with samples


def test_a_chosen_unit_rung_is_built_and_recorded(rng):
    """The search's build of an assignment with a unit rung: the model the gated graph
    scored, the LSTM recorded as pruned to 8 units, the consumer's saving credited to it."""
    from onnxlr.formats import kept
    from onnxlr.methods import parse_method
    from onnxlr.passes.factorize import FactorizeConfig
    from onnxlr.pipeline import _Builder
    from onnxlr.rank import parse_rank
    from onnxlr.search.judge import build_assignment
    from onnxlr.search.ladders import Ladder, Rung

    model, _ = crnn_head()
    prepared, _, fits = _fit(model, [8])
    build = _Builder(prepared, FactorizeConfig(methods=parse_method("auto"),
                                               rank=parse_rank("vbmf")), None)
    rung = Rung(Option(PRUNE, (8,)), 0, None, fits[8].error, 2.0, 1.0, scope="chain",
                neighbour="fc")
    ladders = [Ladder("lstm", PRUNE, 100, 100, 1.0, [rung])]
    built, records = build_assignment(build, ladders, {"fc": "no faster rung"}, {"lstm": 0},
                                      0.01, {("lstm", 8): fits[8]})
    x = {"x": rng.standard_normal((T, 4, I)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(built, x)[0], ort_run(_built(prepared, fits[8]), x)[0],
                               rtol=1e-5, atol=1e-5)
    rec = {r.name: r for r in records}
    assert rec["lstm"].pruned and rec["lstm"].kept_channels == 8
    assert rec["lstm"].extra["consumer"] == "fc" and kept(rec["lstm"]) == "8 units"
    assert rec["fc"].extra.get("changed_by") == "lstm"
    assert rec["fc"].macs_after == rec["fc"].macs_before  # counted once, in the LSTM's record


def test_the_chain_is_timed_with_fewer_units_and_cached(rng, tmp_path):
    """The chain alone (its Reshape target computed from Shape, as exported) runs with H'
    units; both times are positive and a second call reads the timing cache."""
    from onnxlr.latency import LayerTimer, TimingCache
    from onnxlr.methods import parse_method
    from onnxlr.passes.factorize import FactorizeConfig
    from onnxlr.rank import parse_rank

    model, _ = crnn_head()
    prepared = prepare(model)
    graph = to_graph(prepared)
    chain = units.trace(next(n for n in graph.nodes if n.name == "lstm"), graph)
    config = FactorizeConfig(methods=parse_method("auto"), rank=parse_rank("0.5"))
    timer = LayerTimer(config, {o.domain: o.version for o in prepared.opset_import},
                       prepared.ir_version, timing_cache=TimingCache(str(tmp_path / "t.json")),
                       seconds_per_pair=0.05)
    feed = rng.standard_normal((T, 2, I)).astype(np.float32)
    got = hp.time_chain(timer, graph, chain, feed, [8, 12], prepared.ir_version)
    assert set(got) == {8, 12} and all(a > 0 and b > 0 for a, b in got.values())
    timer.timing_cache.save()
    again = hp.time_chain(timer, graph, chain, feed, [8, 12], prepared.ir_version)
    assert again == got


def test_the_search_gets_unit_rungs_on_the_lstms_ladder(rng, tmp_path, monkeypatch):
    """add_hidden_rungs: the chain timed, fitted on the calibration batches, and a rung per
    kept count on a new ladder for the LSTM (every rung kept: the speed-up floor is lifted,
    timings of a tiny layer decide nothing here); the fits are what the rungs name."""
    import onnxlr.search.ladders as ladders_module
    from onnxlr.latency import LayerTimer, TimingCache
    from onnxlr.methods import parse_method
    from onnxlr.passes.factorize import FactorizeConfig
    from onnxlr.pipeline import _Builder
    from onnxlr.rank import parse_rank

    monkeypatch.setattr(ladders_module, "MIN_RUNG_SPEEDUP", 0.0)
    model, _ = crnn_head()
    prepared = prepare(model)
    config = FactorizeConfig(methods=parse_method("auto"), rank=parse_rank("0.5"))
    build = _Builder(prepared, config, None)
    timer = LayerTimer(config, {o.domain: o.version for o in prepared.opset_import},
                       prepared.ir_version, timing_cache=TimingCache(str(tmp_path / "t.json")),
                       seconds_per_pair=0.05)
    batches = [{"x": rng.standard_normal((T, 16, I)).astype(np.float32)} for _ in range(3)]
    ladders, empty = [], {"lstm": "no faster rung"}
    fits, account = hp.add_hidden_rungs(build, ladders, empty, batches[0], timer, batches)
    assert set(account["layers"]["lstm"]) == {"8"}
    (lad,) = ladders
    assert lad.layer == "lstm" and "lstm" not in empty and lad.ms_before > 0
    assert [r.option.ranks for r in lad.rungs] == [(8,)]
    rung = lad.rungs[0]
    assert rung.scope == "chain" and rung.neighbour == "fc"
    assert fits[("lstm", 8)].kept.shape == (2, 8) and fits[("lstm", 8)].consumer == "fc"
