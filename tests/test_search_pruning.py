"""Channel pruning inside the search: prune rungs in the gated graph compute exactly the model
that :func:`onnxlr.search.pruning.apply` builds, against a numpy float64 reference; the planner
never combines a prune rung with a low-rank rung on its producer; the drop bound."""
import dataclasses
import itertools

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from conftest import ort_run, tiny_cnn
from onnxlr.graph import to_graph, to_model
from onnxlr.pipeline import prepare
from onnxlr.search.gated import GatedModel, Option
from onnxlr.search.ladders import Ladder, Rung
from onnxlr.search.metrics import BUILTINS, drop_bound
from onnxlr.search.planner import greedy_path
from onnxlr.search.pruning import (PRUNE, PruneBuilder, apply, capture_stats, fits_for,
                                   keep_counts, prunable)

LAYERS = ["conv2", "conv3", "fc1", "fc2"]
KEEP = {"conv2": 8, "conv3": 16, "fc1": 16, "fc2": 8}


@pytest.fixture(scope="module")
def pruned_setup():
    prepared = prepare(tiny_cnn())
    graph = to_graph(prepared)
    chains, why = prunable(graph, LAYERS + ["conv1"])
    assert set(chains) == set(LAYERS), why
    assert "graph input" in why["conv1"]
    rng = np.random.default_rng(3)
    batches = [{"input": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
               for _ in range(4)]
    stats = capture_stats(prepared, chains, batches)
    fits = {name: fits_for(chains[name], stats[name], [KEEP[name]])[KEEP[name]]
            for name in LAYERS}
    return prepared, chains, fits


def test_prune_rungs_in_the_gated_graph_are_the_built_model(pruned_setup, rng):
    prepared, chains, fits = pruned_setup
    builder = PruneBuilder(chains)
    gated = GatedModel(prepared, {k: [Option(PRUNE, (KEEP[k],))] for k in LAYERS},
                       lambda m, site, ranks: fits[site.node.name], lambda m: builder)
    x = {"input": rng.standard_normal((6, 3, 8, 8)).astype(np.float32)}
    for combo in itertools.product([False, True], repeat=len(LAYERS)):
        chosen = {k: fits[k] for k, on in zip(LAYERS, combo) if on}
        graph = to_graph(prepared)
        assert apply(graph, chosen) == {}
        expected = ort_run(to_model(graph, prepared), x)[0]
        got = gated.run({k: 0 for k in chosen}, x)["logits"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_pruned_matmul_is_the_numpy_computation_on_its_kept_inputs(pruned_setup, rng):
    """fc2 keeps 8 of its 24 inputs: logits = hr[:, kept] · W' + b + delta (float64)."""
    prepared, chains, fits = pruned_setup
    f = fits["fc2"]
    x = {"input": rng.standard_normal((5, 3, 8, 8)).astype(np.float32)}
    from onnxlr.latency import capture
    hr = capture(prepared, x, ["hr"])["hr"].astype(np.float64)
    b_out = next(np.asarray(t.values) for t in to_graph(prepared).tensors().values()
                 if t.name == "b_out").astype(np.float64)
    w = f.weight.reshape(f.weight.shape[0], -1)          # (N, k)
    delta = 0 if f.bias_delta is None else f.bias_delta
    reference = hr[:, f.kept] @ w.T + b_out + delta
    graph = to_graph(prepared)
    apply(graph, {"fc2": f})
    got = ort_run(to_model(graph, prepared), x)[0]
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)
    assert len(f.kept) == 8 and f.channels == 24 and f.producer == "fc1"


def test_a_pruned_matmul_folds_its_bias_change_into_the_add_after_it(pruned_setup, rng):
    """fc2 (MatMul) is followed by its bias Add: the refit's bias change goes into that Add's
    constant, so the pruned model has no node more than the original (each costs ORT ~1-2 µs);
    without such an Add, one is added. Both compute the numpy reference."""
    import onnx
    prepared, _, fits = pruned_setup
    f = dataclasses.replace(fits["fc2"], bias_delta=np.linspace(-1, 1, 10))
    x = {"input": rng.standard_normal((5, 3, 8, 8)).astype(np.float32)}
    from onnxlr.latency import capture
    hr = capture(prepared, x, ["hr"])["hr"].astype(np.float64)
    w = f.weight.reshape(f.weight.shape[0], -1)
    b_out = onnx.numpy_helper.to_array(
        next(t for t in prepared.graph.initializer if t.name == "b_out")).astype(np.float64)
    graph = to_graph(prepared)
    apply(graph, {"fc2": f})
    assert len(graph.nodes) == len(to_graph(prepared).nodes)
    assert not [n for n in graph.nodes if "pruned_bias" in n.name]
    got = ort_run(to_model(graph, prepared), x)[0]
    np.testing.assert_allclose(got, hr[:, f.kept] @ w.T + b_out + f.bias_delta, rtol=1e-4, atol=1e-4)
    # the same rung where fc2's output is read by something other than one Add: a new Add
    graph = to_graph(prepared)
    add = next(n for n in graph.nodes if n.name == "fc2_bias")
    mm = add.inputs[0]
    tap = gs.Variable("mm_tap", dtype=np.float32)
    graph.nodes.append(gs.Node("Identity", "tap", inputs=[mm], outputs=[tap]))
    graph.outputs.append(tap)
    apply(graph, {"fc2": f})
    assert [n for n in graph.nodes if "pruned_bias" in n.name]
    got = ort_run(to_model(graph, prepared), x)
    np.testing.assert_allclose(got[0], hr[:, f.kept] @ w.T + b_out + f.bias_delta, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[-1], hr[:, f.kept] @ w.T + f.bias_delta, rtol=1e-4, atol=1e-4)


def test_pruning_the_producer_shrinks_its_rows(pruned_setup):
    prepared, _, fits = pruned_setup
    graph = to_graph(prepared)
    apply(graph, {"conv3": fits["conv3"]})
    conv2 = next(n for n in graph.nodes if n.name == "conv2")
    assert conv2.inputs[1].values.shape[0] == KEEP["conv3"]


def test_a_chosen_prune_rung_is_recorded_as_pruned(pruned_setup):
    """The search's build (judge._prune) says what it did: fc2 pruned, with its kept channels
    and its fit error, no ranks and no weight error; its producer's saving counted in its record."""
    from onnxlr.methods import parse_method
    from onnxlr.passes.factorize import Factorize, FactorizeConfig
    from onnxlr.rank import parse_rank
    from onnxlr.search.judge import _prune
    prepared, _, fits = pruned_setup
    graph = to_graph(prepared)
    keep = {n.name: "search: kept" for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul")}
    config = FactorizeConfig(methods=parse_method("auto"), rank=parse_rank("vbmf"))
    records = Factorize(config, keep, {})(graph).records
    _prune(graph, records, {"fc2": fits["fc2"]})
    by = {r.name: r for r in records}
    rec = by["fc2"]
    assert rec.status == "pruned" and rec.changed and rec.method == PRUNE
    assert rec.kept_channels == KEEP["fc2"] and rec.ranks is None and rec.weight_error is None
    assert rec.fit_error == fits["fc2"].error and "error_kind" not in rec.extra
    assert rec.extra["removed_channels"] == 24 - KEEP["fc2"] and rec.extra["producer"] == "fc1"
    assert not by["fc1"].changed and by["fc1"].extra["changed_by"] == "fc2"
    assert rec.params_after < rec.params_before
    assert [r.name for r in records if r.changed] == ["fc2"]


def _rung(speedup, drop, *, chain=False, producer=None):
    return Rung(Option(PRUNE if chain else "svd", (1,)), 10, 0.1, 0.1, 1.0, 1.0 / speedup,
                drop=drop, distortion=0.0, scope="chain" if chain else "layer", neighbour=producer)


@pytest.mark.parametrize("method,ranks", [("tucker", (8, 8)), ("tucker", (16, 8)), ("svd", (8,))])
def test_a_low_rank_producer_under_a_pruned_consumer_is_the_built_model(pruned_setup, rng,
                                                                        method, ranks):
    """conv2 factorised and conv3 keeping 16 of conv2's channels: the gated graph (Gather of
    the factorised output) computes what the build writes (the factorised conv2's last stage
    losing those rows), so the two may be combined."""
    import dataclasses as dc
    from onnxlr.methods import parse_method
    from onnxlr.passes.factorize import Factorize, FactorizeConfig
    from onnxlr.rank import parse_rank
    prepared, chains, fits = pruned_setup
    config = FactorizeConfig(methods=parse_method("auto"), rank=parse_rank("vbmf"))
    cache: dict = {}
    factorize = Factorize(config, cache=cache)
    builder = PruneBuilder(chains)
    options = {"conv2": [Option(method, ranks)], "conv3": [Option(PRUNE, (KEEP["conv3"],))]}

    def factors(m, site, r):
        return fits[site.node.name] if m == PRUNE else factorize.factors(factorize.method(m), site, r)

    gated = GatedModel(prepared, options, factors,
                       lambda m: builder if m == PRUNE else factorize.method(m))
    x = {"input": rng.standard_normal((6, 3, 8, 8)).astype(np.float32)}
    graph = to_graph(prepared)
    keep = {n.name: "not in this assignment" for n in graph.nodes
            if n.op in ("Conv", "Gemm", "MatMul") and n.name != "conv2"}
    Factorize(dc.replace(config, forced_ranks={"conv2": ranks}, forced_methods={"conv2": method}),
              keep, cache)(graph)
    assert apply(graph, {"conv3": fits["conv3"]}) == {}
    built = to_model(graph, prepared)
    expected = ort_run(built, x)[0]
    got = gated.run({"conv2": 0, "conv3": 0}, x)["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # and the factorised producer really lost the rows: the node feeding relu2 (its last
    # stage) writes the 16 kept channels
    g = to_graph(built)
    relu2 = next(n for n in g.nodes if n.name == "relu2")
    last = relu2.inputs[0].inputs[0]
    assert last.name.startswith("conv2/") and last.inputs[1].values.shape[0] == KEEP["conv3"]
    # the search's accounting counts those rows gone from the factorised producer's record
    from onnxlr.search.judge import _prune
    from onnxlr.search.pruning import layer_costs
    graph = to_graph(prepared)
    records = Factorize(dc.replace(config, forced_ranks={"conv2": ranks},
                                   forced_methods={"conv2": method}), keep, cache)(graph).records
    before = next(r for r in records if r.name == "conv2")
    macs_factorised = before.macs_after
    _prune(graph, records, {"conv3": fits["conv3"]})
    parts = [c for n, c in layer_costs(graph).items() if n.startswith("conv2/")]
    assert before.macs_after == sum(m for _, m in parts) < macs_factorised
    assert before.params_after == sum(p for p, _ in parts)


def test_the_path_combines_prune_and_low_rank_rungs_freely():
    ladders = [
        Ladder("a", "svd", 100, 100, 1.0, [_rung(2, 0.0), _rung(3, 0.001, chain=True)]),
        Ladder("b", "svd", 100, 100, 1.0, [_rung(2.5, 0.0, chain=True, producer="a")]),
    ]
    steps = greedy_path(ladders, max_drop=0.01)
    # b prunes a's rows while a takes its low-rank rung, then a prunes its own inputs too
    assert [(s.layer, s.rung) for s in steps][:2] in ([("b", 0), ("a", 0)], [("a", 0), ("b", 0)])
    assert steps[-1].as_dict() == {"a": 1, "b": 0}


def test_keep_counts_are_rounded_and_below_the_channels():
    assert keep_counts(256) == [192, 128, 96]
    assert keep_counts(10) == [8, 5, 4]
    assert all(0 < k < 12 for k in keep_counts(12))


def test_the_drop_bound_counts_how_few_samples_judged():
    metric = BUILTINS["accuracy"]
    n = 256
    labels = np.arange(n) % 10
    ref = {"y": np.eye(10, dtype=np.float32)[labels]}
    assert drop_bound(metric, ref, ref, labels) == 0.0
    cand = {"y": ref["y"].copy()}
    cand["y"][:3] = np.roll(cand["y"][:3], 1, axis=1)   # three samples now wrong
    plain = metric.drop(ref, cand, labels)
    bound = drop_bound(metric, ref, cand, labels)
    assert plain == pytest.approx(3 / n)
    assert plain < bound < 3 * plain   # beyond what was seen, within the sampling spread
    # more samples with the same error rate: a tighter bound
    many = np.arange(4 * n) % 10
    ref4 = {"y": np.eye(10, dtype=np.float32)[many]}
    cand4 = {"y": ref4["y"].copy()}
    cand4["y"][:12] = np.roll(cand4["y"][:12], 1, axis=1)
    assert drop_bound(metric, ref4, cand4, many) - 12 / (4 * n) < bound - plain
    # a drop already over the allowance is the verdict: no resampling, the same answer
    calls = []
    counting = dataclasses.replace(metric, score_fn=lambda r, c, lab: calls.append(1) or
                                   metric.score_fn(r, c, lab))
    assert drop_bound(counting, ref, cand, labels, drop=plain, stop_above=plain / 2) == plain
    assert not calls
    assert drop_bound(counting, ref, cand, labels, drop=plain, stop_above=1.0) == bound
    assert len(calls) == 2 * 64   # original and candidate on every resample


def test_a_measured_gain_is_not_credited_by_the_drop_bound():
    """A candidate that changes a quarter of the predictions, 36 samples right for 28 wrong,
    measures a 3-point gain; its bound is the bootstrap's margin above zero, not the gain
    plus the margin: the judged set cannot tell it from a loss of several points."""
    metric = BUILTINS["accuracy"]
    n = 256
    labels = np.arange(n) % 10
    wrong = np.eye(10, dtype=np.float32)[(labels + 1) % 10]
    right = np.eye(10, dtype=np.float32)[labels]
    ref_y = right.copy()
    ref_y[:64] = wrong[:64]                      # the original gets 64 wrong
    cand_y = ref_y.copy()
    cand_y[:36] = right[:36]                     # 36 of those now right ...
    cand_y[64:92] = wrong[64:92]                 # ... and 28 right ones now wrong
    ref, cand = {"y": ref_y}, {"y": cand_y}
    plain = metric.drop(ref, cand, labels)
    assert plain == pytest.approx(-8 / n)
    bound = drop_bound(metric, ref, cand, labels)
    rng = np.random.default_rng(0)                # the same resamples, in numpy
    ok_ref = (ref_y.argmax(1) == labels).astype(float)
    ok_cand = (cand_y.argmax(1) == labels).astype(float)
    drops = []
    for _ in range(64):
        idx = rng.integers(0, n, n)
        drops.append(ok_ref[idx].mean() - ok_cand[idx].mean())
    assert bound == pytest.approx(max(np.quantile(drops, 0.8) - plain, 0.0))
    assert bound > 0.01                           # a 1-point bound is out of this set's reach
    # a gain from few changed samples is still a bound near zero
    few = ref_y.copy()
    few[:2] = right[:2]
    assert 0.0 <= drop_bound(metric, ref, {"y": few}, labels) < 0.01


def test_the_drop_bound_resamples_a_time_major_output_along_its_sample_axis():
    """[T, N, C] outputs (a CTC recogniser's): resampled along N, the axis of the inputs'
    sample count, the same bound as the batch-major layout gives; where no axis has that
    size, the plain drop."""
    metric = BUILTINS["accuracy"]
    n, t = 256, 7
    labels = np.arange(n) % 10
    ref = np.eye(10, dtype=np.float32)[labels]
    cand = ref.copy()
    cand[:6] = np.roll(cand[:6], 1, axis=1)
    cand[6:9] = ref[6:9]
    # the metric reads sample i's class from time step 0 of a [T, N, C] output
    seq = lambda y: {"y": np.repeat(y[None], t, axis=0), "other": y}
    tm = dataclasses.replace(metric, score_fn=lambda r, c, lab: metric.score_fn(
        {"y": r["y"][0]}, {"y": c["y"][0]}, lab))
    batch_major = drop_bound(metric, {"y": ref}, {"y": cand}, labels)
    time_major = drop_bound(tm, seq(ref), seq(cand), labels, samples=n)
    assert time_major == pytest.approx(batch_major) and time_major > metric.drop(
        {"y": ref}, {"y": cand}, labels)
    plain = tm.drop(seq(ref), seq(cand), labels)
    assert drop_bound(tm, seq(ref), seq(cand), labels, samples=n + 1) == plain  # no such axis


def _pad_model(channel_pads: bool):
    from onnx import helper
    from conftest import init, make_model, vinfo
    r = np.random.default_rng(0)
    pads = [0, 1 if channel_pads else 0, 1, 1, 0, 0, 1, 1]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a"),
             helper.make_node("Relu", ["a"], ["ar"], name="relu"),
             helper.make_node("Pad", ["ar", "pads"], ["ap"], name="pad", mode="reflect"),
             helper.make_node("Conv", ["ap", "wb"], ["y"], name="conv_b")]
    inits = [init("wa", r.standard_normal((8, 4, 3, 3)).astype(np.float32)),
             init("ba", r.standard_normal(8).astype(np.float32)),
             init("wb", r.standard_normal((6, 8, 3, 3)).astype(np.float32)),
             init("pads", np.array(pads, np.int64))]
    return make_model(nodes, [vinfo("x", [2, 4, 9, 9])], [vinfo("y", None)], inits)


def test_a_chain_passes_a_pad_that_pads_no_channels(rng):
    """Dropping channels through a spatial Pad is the original with those channels' consumer
    weights zeroed (an independent graph)."""
    from onnxlr.passes.channel_chains import chain_into, consumer_weight
    from onnxlr.search.pruning import PruneFit, channel_axis
    model = prepare(_pad_model(False))
    graph = to_graph(model)
    chain = chain_into(next(n for n in graph.nodes if n.name == "conv_b"), graph)
    assert not isinstance(chain, str), chain
    kept = np.array([0, 2, 3, 6])
    w = consumer_weight(chain)
    f = PruneFit(kept, w[:, kept], None, None, channel_axis(chain), chain.group, "conv_b",
                 "conv_a", 8)
    apply(graph, {"conv_b": f})
    x = {"x": rng.standard_normal((2, 4, 9, 9)).astype(np.float32)}
    got = ort_run(to_model(graph, model), x)[0]
    zeroed = prepare(_pad_model(False))
    for t in zeroed.graph.initializer:
        if t.name == "wb":
            from onnx import numpy_helper
            wb = numpy_helper.to_array(t).copy()
            wb[:, np.setdiff1d(np.arange(8), kept)] = 0
            t.CopyFrom(numpy_helper.from_array(wb, "wb"))
    np.testing.assert_allclose(got, ort_run(zeroed, x)[0], rtol=1e-4, atol=1e-4)
    padded = prepare(_pad_model(True))
    g2 = to_graph(padded)
    why = chain_into(next(n for n in g2.nodes if n.name == "conv_b"), g2)
    assert isinstance(why, str) and "pads the channels" in why


def _conv1d_transpose_model():
    """(N, 8, L) conv → Relu → Transpose to (N, L, 8) → Add bias → MatMul: a 1-D conv net's
    classifier head as PyTorch exports it."""
    from onnx import helper
    from conftest import init, make_model, vinfo
    r = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv", pads=[1, 1]),
             helper.make_node("Relu", ["a"], ["ar"], name="relu"),
             helper.make_node("Transpose", ["ar"], ["at"], name="to_last", perm=[0, 2, 1]),
             helper.make_node("Add", ["at", "shift"], ["as"], name="shift_add"),
             helper.make_node("MatMul", ["as", "wm"], ["y"], name="head")]
    inits = [init("wa", r.standard_normal((8, 4, 3)).astype(np.float32)),
             init("ba", r.standard_normal(8).astype(np.float32)),
             init("shift", r.standard_normal(8).astype(np.float32)),
             init("wm", r.standard_normal((8, 5)).astype(np.float32))]
    return make_model(nodes, [vinfo("x", [2, 4, 7])], [vinfo("y", None)], inits)


def test_a_chain_passes_a_transpose_to_channel_last(rng):
    from onnx import numpy_helper
    from onnxlr.passes.channel_chains import chain_into, consumer_weight
    from onnxlr.search.pruning import PruneFit, channel_axis
    model = prepare(_conv1d_transpose_model())
    graph = to_graph(model)
    chain = chain_into(next(n for n in graph.nodes if n.name == "head"), graph)
    assert not isinstance(chain, str), chain
    assert chain.producer.name == "conv" and not chain.channel_first
    kept = np.array([1, 4, 5])
    f = PruneFit(kept, consumer_weight(chain)[:, kept], None, None, channel_axis(chain), 1,
                 "head", "conv", 8)
    apply(graph, {"head": f})
    conv = next(n for n in graph.nodes if n.name == "conv")
    assert conv.inputs[1].values.shape[0] == 3
    x = {"x": rng.standard_normal((2, 4, 7)).astype(np.float32)}
    got = ort_run(to_model(graph, model), x)[0]
    # reference: the original with the dropped channels' rows of the head zeroed
    zeroed = prepare(_conv1d_transpose_model())
    for t in zeroed.graph.initializer:
        if t.name == "wm":
            wm = numpy_helper.to_array(t).copy()
            wm[np.setdiff1d(np.arange(8), kept)] = 0
            t.CopyFrom(numpy_helper.from_array(wm, "wm"))
    np.testing.assert_allclose(got, ort_run(zeroed, x)[0], rtol=1e-4, atol=1e-4)


def test_one_lasso_path_fits_every_count_about_as_well_as_a_bisected_one(pruned_setup):
    """The ladder's counts come from one path; each is refit by least squares, and its
    error is close to He et al.'s exact-count selection and never worse than keeping the
    first k channels."""
    from onnxlr.linalg.channel_select import refit as ls_refit
    from onnxlr.passes.channel_chains import consumer_weight
    from onnxlr.linalg.channel_select import select_channels
    prepared, chains, _ = pruned_setup
    graph = to_graph(prepared)
    rng = np.random.default_rng(3)
    batches = [{"input": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
               for _ in range(4)]
    stats = capture_stats(prepared, chains, batches)
    for name in ("conv3", "fc2"):
        keeps = keep_counts(chains[name].channels)
        many = fits_for(chains[name], stats[name], keeps)
        for k in keeps:
            exact = select_channels(stats[name], consumer_weight(chains[name]), k)
            assert len(many[k].kept) == k and len(set(many[k].kept)) == k
            assert many[k].error <= 1.5 * exact.error + 1e-6, (name, k)
            naive = ls_refit(stats[name], consumer_weight(chains[name]), np.arange(k))[2]
            assert many[k].error <= naive + 1e-9 or many[k].error <= 1.05 * exact.error
    del graph


def test_the_sequential_refit_resolves_a_pruned_layer_on_the_compressed_prefix(pruned_setup):
    """conv2 and fc1 pruned: fc1's own weights are refit on what the compressed model feeds
    it (its error can only go down on the fitting rows); conv3, whose outputs fc1 pruned,
    no longer lines up with the original's output and is left as fitted."""
    from onnxlr.search.refit import refit_sequentially
    prepared, chains, fits = pruned_setup
    graph = to_graph(prepared)
    apply(graph, {"conv2": fits["conv2"], "conv3": fits["conv3"], "fc1": fits["fc1"]})
    model = to_model(graph, prepared)
    rng = np.random.default_rng(11)
    batches = [{"input": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
               for _ in range(3)]
    out, done = refit_sequentially(prepared, model, ["conv2", "conv3", "fc1"], batches,
                                   pruned={"conv2", "conv3", "fc1"})
    names = {r.layer for r in done}
    assert "conv2" not in names          # a 3×3 conv: its rows are patches, not refit here
    assert "conv3" not in names          # its outputs were pruned by fc1
    assert names == {"fc1"}
    (r,) = done
    assert r.after < r.before


def test_repair_tries_are_judged_at_the_family_wise_confidence():
    """An assignment that the bisection's 80% bound would pass, but a 98% one would not, is
    not kept by the repair phase: its dozen tries are a dozen chances to pass by luck."""
    from onnxlr.search.planner import REPAIR_CONFIDENCE, Planner, Step
    n = 256
    labels = np.arange(n) % 10
    ref = {"y": np.eye(10, dtype=np.float32)[labels]}
    flips = {0: 0, 1: 1}   # rung index → samples it gets wrong

    class Fake:
        def run(self, assignment, feeds):
            y = ref["y"].copy()
            wrong = sum(flips[j] for j in assignment.values())
            y[:wrong] = np.roll(y[:wrong], 1, axis=1)
            return {"y": y}

    metric = BUILTINS["accuracy"]
    one_wrong = Fake().run({"a": 1}, None)
    at_80 = drop_bound(metric, ref, one_wrong, labels)
    at_98 = drop_bound(metric, ref, one_wrong, labels, confidence=REPAIR_CONFIDENCE)
    allowed = (at_80 + at_98) / 2
    assert at_80 < allowed < at_98
    planner = Planner(Fake(), [], metric, allowed, reference=ref,
                      feeds={"x": np.zeros((n, 1), np.float32)}, labels=labels)
    assert planner.feasible({"a": 1})                       # the bisection's verdict
    steps = [Step((("a", 0),), "a", 0, 1.0, 1), Step((("a", 1),), "a", 1, 2.0, 2)]
    assert planner.repair(steps, 1) == {"a": 0}             # the repair's: not kept
    assert planner.checks[-1]["confidence"] == pytest.approx(REPAIR_CONFIDENCE)
