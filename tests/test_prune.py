"""Channel pruning (He et al. 2017): selection math, channel chains, rewrite, pass, pipeline.

Known answers: a producer whose outputs include dead (always-zero after ReLU) and
positively rescaled duplicate channels has exactly those to spare — pruning them
must leave the model's output unchanged (checked against float64 numpy
references), whatever the consumer's geometry. Where pruning loses information
the reported error must be the model's real error.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from conftest import init, make_model, vinfo
from numpy_ref import conv_nd, gemm
from onnx import helper, numpy_helper

from onnxlr.activations import conv_patches
from onnxlr.graph import to_graph, to_model
from onnxlr.linalg.channel_select import (
    PatchStats,
    dependent_channels,
    lasso_select,
    norm_select,
    refit,
    select_channels,
)
from onnxlr.passes.factorize import FactorizeConfig
from onnxlr.passes.prune import PrunePass
from onnxlr.rank import parse_rank
from onnxlr.records import FACTORISED, PRUNED

R = np.random.default_rng(0)


def relu(a):
    return np.maximum(a, 0.0)


def redundant_producer(c_in=3, c=8, k=3, seed=0):
    """Weights of a conv with c outputs: channel 5 dead under ReLU, 6 = 2·ch0, 7 = ch1/2."""
    r = np.random.default_rng(seed)
    w = r.standard_normal((c, c_in, k, k)).astype(np.float32)
    b = (0.1 * r.standard_normal(c)).astype(np.float32)
    w[5], b[5] = 0.0, -1.0
    w[6], b[6] = 2 * w[0], 2 * b[0]
    w[7], b[7] = 0.5 * w[1], 0.5 * b[1]
    return w, b


def run_pass(model, calib, rank="0.5", cls=PrunePass, **kw):
    graph = to_graph(model)
    result = cls(FactorizeConfig(methods={}, rank=parse_rank(rank)), calibration=calib, **kw)(graph)
    out = to_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, {r.name: r for r in result.records}


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_input(model, node_name, i):
    node = next(n for n in model.graph.node if n.name == node_name)
    return weights(model)[node.input[i]]


def run(model, x):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# --- the math, on numpy activations ---------------------------------------------------------------

def test_dependent_channels_found_by_pivoted_cholesky():
    base = R.standard_normal((500, 4))
    x = np.column_stack([base, np.zeros(500), 3 * base[:, 0], base[:, 1] - base[:, 2]])
    independent, dependent, zero = dependent_channels(x.T @ x)
    assert list(zero) == [4]
    assert len(independent) == 4 and len(dependent) == 2
    kept = np.sort(independent)
    assert np.linalg.matrix_rank(x[:, kept]) == 4  # the kept ones span everything


@pytest.mark.parametrize("keep", [5, 6])
def test_select_channels_removes_redundant_and_reconstructs_exactly(keep):
    """Zero and linearly dependent input channels go first, at no cost: the refit conv on
    the rest reproduces the original output (float64 numpy reference) exactly."""
    base = R.standard_normal((12, 5, 7, 7))
    x = np.concatenate([base, np.zeros((12, 1, 7, 7)), 2 * base[:, :1],
                        base[:, 1:2] - 0.5 * base[:, 2:3]], axis=1)        # C = 8, rank 5
    w = R.standard_normal((6, 8, 3, 3))
    geometry = {"strides": (1, 1), "dilations": (1, 1), "pads": (1, 1, 1, 1)}
    stats = PatchStats(8, 9)
    stats.add(conv_patches(x, (3, 3), **geometry))
    sel = select_channels(stats, w.reshape(6, 8, 9), keep)
    removed = set(range(8)) - set(sel.kept.tolist())
    assert 5 in removed and len(removed) == 8 - keep
    assert np.linalg.matrix_rank(x[:, sel.kept].transpose(1, 0, 2, 3).reshape(keep, -1)) == 5
    y = conv_nd(x, w, pads=[1, 1, 1, 1])
    y_new = conv_nd(x[:, sel.kept], sel.weight.reshape(6, keep, 3, 3), pads=[1, 1, 1, 1]) \
        + sel.bias_delta[None, :, None, None]
    assert rel(y_new, y) < 1e-7
    assert sel.error < 1e-6 and sel.lam is None


def test_lasso_select_hits_the_count_and_is_near_best_subset():
    mix = R.standard_normal((10, 10)) * 0.5 + np.eye(10)
    x = np.einsum("pck,dc->pdk", R.standard_normal((2000, 10, 4)) * R.uniform(0.2, 2, (1, 10, 1)),
                  mix)
    w = R.standard_normal((12, 10, 4)) * R.uniform(0.1, 2, (1, 10, 1))
    stats = PatchStats(10, 4)
    stats.add(x)
    for keep in (2, 4, 7):
        sel = select_channels(stats, w, keep)
        assert len(sel.kept) == keep and sel.lam is not None
        best = min(refit(stats, w, np.array(s))[2] for s in itertools.combinations(range(10), keep))
        assert sel.error <= best * 1.15 + 1e-9, (keep, sel.error, best)
        # the reported error is the real one
        y = np.einsum("pck,nck->pn", x, w)
        y_new = np.einsum("pck,nck->pn", x[:, sel.kept], sel.weight) + sel.bias_delta
        assert abs(rel(y_new, y) - sel.error) < 1e-6


def test_lasso_select_exact_count_with_ties():
    g = np.eye(6)
    b = np.ones(6)  # every coefficient enters at the same λ: no λ gives 3 exactly
    support, _, _ = lasso_select(g, b, 3)
    assert len(support) == 3


def test_norm_select_takes_largest_l1_rows():
    rows = np.array([[1, 1], [5, 0], [0, 0.1], [-3, -3]])
    assert norm_select(rows, 2).tolist() == [1, 3]


def test_refit_with_two_inputs_aims_at_the_original():
    """Sequential mode: the fit uses the pruned model's input, the target the original's."""
    x = R.standard_normal((400, 6, 1))
    x_pruned = x + 0.1 * R.standard_normal(x.shape)
    w = R.standard_normal((3, 6, 1))
    stats = PatchStats(6, 1)
    stats.add(x_pruned[:200], x[:200])
    stats.add(x_pruned[200:], x[200:])
    kept = np.array([0, 2, 3, 5])
    w_new, delta, error = refit(stats, w, kept)
    a = np.column_stack([x_pruned[:, kept, 0], np.ones(400)])
    target = x[:, :, 0] @ w[:, :, 0].T
    coef = np.linalg.lstsq(a, target, rcond=None)[0]
    assert np.allclose(w_new[:, :, 0].T, coef[:-1], atol=1e-6)
    assert np.allclose(delta, coef[-1], atol=1e-6)
    assert abs(error - rel(a @ coef, target)) < 1e-6


# --- the pass on ONNX models -------------------------------------------------------------------------

def two_convs(geometry: dict, *, k2=3, n=48, bn=None, pool=False):
    """x → conv1 (+BN) → Relu (→ MaxPool) → conv2, producer from :func:`redundant_producer`."""
    w1, b1 = redundant_producer()
    w2 = R.standard_normal((6, 8, k2, k2)).astype(np.float32)
    b2 = (0.1 * R.standard_normal(6)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    inits = [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2)]
    t = "c1"
    if bn is not None:
        nodes.append(helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"],
                                      name="bn1", epsilon=1e-5))
        inits += [init(k, v) for k, v in zip(("g", "be", "mu", "var"), bn)]
        t = "n1"
    nodes.append(helper.make_node("Relu", [t], ["r1"], name="relu1"))
    t = "r1"
    if pool:
        nodes.append(helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2],
                                      strides=[2, 2]))
        t = "p1"
    nodes.append(helper.make_node("Conv", [t, "w2", "b2"], ["y"], name="conv2", **geometry))
    model = make_model(nodes, [vinfo("x", ["N", 3, 8, 8])], [vinfo("y", None)], inits)
    x = R.standard_normal((n, 3, 8, 8)).astype(np.float32)
    return model, x, (w1, b1, w2, b2)


def reference(x, params, geometry, pool=False):
    w1, b1, w2, b2 = params
    h = relu(conv_nd(x, w1, b1, pads=[1, 1, 1, 1]))
    if pool:
        h = h.reshape(h.shape[0], h.shape[1], 4, 2, 4, 2).max(axis=(3, 5))
    g = dict(geometry)
    if g.pop("auto_pad", None) == "SAME_UPPER":
        g["pads"] = [1, 1, 1, 1]
    return conv_nd(h, w2, b2, **g)


GEOMETRIES = [{"pads": [1, 1, 1, 1]}, {"strides": [2, 2]}, {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
              {"auto_pad": "SAME_UPPER"}]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["pad", "stride", "dilation", "same_upper"])
def test_prune_finds_dead_and_duplicate_channels_exactly(geometry):
    model, x, params = two_convs(geometry)
    out, records = run_pass(model, [{"x": x}], rank="5")
    rec = records["conv2"]
    assert rec.status == PRUNED and rec.method == "prune" and rec.kept_channels == 5
    assert rec.ranks is None and rec.weight_error is None
    removed = set(rec.extra["removed"])
    assert 5 in removed and len(removed & {0, 6}) == 1 and len(removed & {1, 7}) == 1
    kept = sorted(set(range(8)) - removed)
    w1_new, b1_new = node_input(out, "conv1", 1), node_input(out, "conv1", 2)
    assert w1_new.shape == (5, 3, 3, 3) and np.array_equal(w1_new, params[0][kept])
    assert np.array_equal(b1_new, params[1][kept])
    assert node_input(out, "conv2", 1).shape == (6, 5, 3, 3)
    assert rel(run(out, x), reference(x, params, geometry)) < 2e-5
    assert rec.fit_error < 1e-4
    assert not records["conv1"].changed  # its input is the graph input


def test_prune_1x1_consumer():
    model, x, params = two_convs({}, k2=1)
    out, records = run_pass(model, [{"x": x}], rank="5")
    assert records["conv2"].status == PRUNED and records["conv2"].kept_channels == 5
    assert node_input(out, "conv2", 1).shape == (6, 5, 1, 1)
    assert rel(run(out, x), reference(x, params, {})) < 2e-5


def test_batchnorm_and_pool_channels_removed_consistently():
    """BN parameters follow the producer's kept rows; the consumer's input in the pruned model
    is the original's kept channels; the reported error is the model's real error."""
    c = 8
    bn = [(1 + 0.2 * R.standard_normal(c)).astype(np.float32), (0.1 * R.standard_normal(c)).astype(np.float32),
          (0.1 * R.standard_normal(c)).astype(np.float32), (1 + 0.3 * R.random(c)).astype(np.float32)]
    geometry = {"pads": [1, 1, 1, 1]}
    model, x, params = two_convs(geometry, bn=bn, pool=True)
    out, records = run_pass(model, [{"x": x}], rank="0.5", max_rows=10**6)
    rec = records["conv2"]
    assert rec.status == PRUNED and rec.kept_channels == 4 and rec.ranks is None
    kept = sorted(set(range(c)) - set(rec.extra["removed"]))
    for i, name in enumerate(("g", "be", "mu", "var")):
        assert np.array_equal(node_input(out, "bn1", i + 1), bn[i][kept])
    # consumer input of the pruned model == original's kept channels (float64 numpy)
    from onnxlr.calib import capture
    p1 = capture(out, [{"x": x}], ["p1"])["p1"]
    w1, b1 = params[:2]
    s = bn[0] / np.sqrt(bn[3].astype(np.float64) + 1e-5)
    h = conv_nd(x, w1, b1, pads=[1, 1, 1, 1])
    h = relu((h - bn[2][None, :, None, None]) * s[None, :, None, None] + bn[1][None, :, None, None])
    h = h.reshape(h.shape[0], c, 4, 2, 4, 2).max(axis=(3, 5))
    assert p1.shape[1] == 4 and rel(p1, h[:, kept]) < 1e-5
    # every position of every sample was used: the reported error is the output's
    y0 = run(model, x)
    assert abs(rel(run(out, x), y0) - rec.fit_error) < 1e-3
    assert 0 < rec.fit_error < 0.9 and rec.weight_error is None


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape0", "ReshapeExplicit"])
def test_flatten_into_gemm_removes_column_blocks(flatten):
    """conv → Relu → Flatten/Reshape → Gemm: channel c is the Gemm's columns c·HW … c·HW+HW−1."""
    c, hw = 6, 16
    r = np.random.default_rng(3)
    w1 = r.standard_normal((c, 2, 3, 3)).astype(np.float32)
    b1 = (0.1 * r.standard_normal(c)).astype(np.float32)
    w1[2], b1[2] = 0.0, -0.5          # dead
    w1[4], b1[4] = 2 * w1[1], 2 * b1[1]  # duplicate
    B = r.standard_normal((5, c * hw)).astype(np.float32)
    C = (0.1 * r.standard_normal(5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    inits = [init("w1", w1), init("b1", b1), init("B", B), init("C", C)]
    if flatten == "Flatten":
        nodes.append(helper.make_node("Flatten", ["r1"], ["f"], name="flat", axis=1))
    else:
        shape = [0, -1] if flatten == "Reshape0" else [-1, c * hw]
        inits.append(init("shape", np.array(shape, np.int64)))
        nodes.append(helper.make_node("Reshape", ["r1", "shape"], ["f"], name="flat"))
    nodes.append(helper.make_node("Gemm", ["f", "B", "C"], ["y"], name="fc", transB=1))
    model = make_model(nodes, [vinfo("x", ["N", 2, 4, 4])], [vinfo("y", ["N", 5])], inits)
    x = r.standard_normal((160, 2, 4, 4)).astype(np.float32)
    out, records = run_pass(model, [{"x": x}], rank="4")
    rec = records["fc"]
    assert rec.status == PRUNED and rec.kept_channels == 4, rec.reason
    removed = set(rec.extra["removed"])
    assert 2 in removed and len(removed & {1, 4}) == 1
    assert node_input(out, "fc", 1).shape == (5, 4 * hw)
    h = relu(conv_nd(x, w1, b1, pads=[1, 1, 1, 1])).reshape(len(x), -1)
    assert rel(run(out, x), gemm(h, B, C, trans_b=True)) < 2e-5


def residual_model():
    w = lambda *s: (0.3 * R.standard_normal(s)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["t"], name="relu_a"),
             helper.make_node("Conv", ["t", "wb"], ["u"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["t", "u"], ["s"], name="residual"),
             helper.make_node("Conv", ["s", "wc"], ["y"], name="conv_c")]
    inits = [init("wa", w(8, 3, 3, 3)), init("wb", w(8, 8, 3, 3)), init("wc", w(4, 8, 1, 1))]
    return make_model(nodes, [vinfo("x", ["N", 3, 6, 6])], [vinfo("y", None)], inits)


def test_residual_add_declined_with_reasons():
    model = residual_model()
    x = R.standard_normal((8, 3, 6, 6)).astype(np.float32)
    _, records = run_pass(model, [{"x": x}])
    assert not any(r.changed for r in records.values())
    assert "feeds 2 nodes" in records["conv_b"].reason
    assert "residual Add" in records["conv_c"].reason
    assert "graph input" in records["conv_a"].reason


def test_concat_and_grouped_consumers_declined():
    w = lambda *s: (0.3 * R.standard_normal(s)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
             helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
             helper.make_node("Concat", ["ra", "b"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "wc"], ["c"], name="conv_c"),
             helper.make_node("Relu", ["c"], ["rc"], name="relu_c"),
             helper.make_node("Conv", ["rc", "wg"], ["y"], name="conv_g", group=2)]
    inits = [init("wa", w(4, 3, 1, 1)), init("wb", w(4, 3, 1, 1)), init("wc", w(8, 8, 1, 1)),
             init("wg", w(4, 4, 1, 1))]
    model = make_model(nodes, [vinfo("x", ["N", 3, 5, 5])], [vinfo("y", None)], inits)
    x = R.standard_normal((8, 3, 5, 5)).astype(np.float32)
    _, records = run_pass(model, [{"x": x}])
    assert "Concat 'cat'" in records["conv_c"].reason
    assert "group" in records["conv_g"].reason
    from onnxlr.passes.thin import ThinPass
    _, thin = run_pass(model, None, cls=ThinPass)
    assert "concatenates" in thin["conv_a"].reason
    assert "group" in thin["conv_c"].reason


def test_prune_without_calibration_declines():
    model, _, _ = two_convs({})
    _, records = run_pass(model, None)
    assert "--calib" in records["conv2"].reason
    assert not any(r.changed for r in records.values())


def small_cnn(seed=1):
    r = np.random.default_rng(seed)
    he = lambda *s: (r.standard_normal(s) * np.sqrt(2 / np.prod(s[1:]))).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("MaxPool", ["r2"], ["p2"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p2", "w3"], ["c3"], name="conv3"),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("Flatten", ["r3"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fw1", "fb1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="relu4"),
             helper.make_node("Gemm", ["hr", "fw2"], ["y"], name="fc2")]
    inits = [init("w1", he(8, 1, 3, 3)), init("w2", he(16, 8, 3, 3)),
             init("b2", np.full(16, 0.05, np.float32)), init("w3", he(12, 16, 1, 1)),
             init("fw1", he(20, 12 * 4)), init("fb1", np.zeros(20, np.float32)),
             init("fw2", he(20, 10))]
    model = make_model(nodes, [vinfo("x", ["N", 1, 4, 4])], [vinfo("y", ["N", 10])], inits)
    return model, r.standard_normal((96, 1, 4, 4)).astype(np.float32)


def count(model) -> tuple[int, int]:
    """Parameters of Conv/Gemm weights and biases, straight from the initializers."""
    w = weights(model)
    return sum(w[i].size for n in model.graph.node if n.op_type in ("Conv", "Gemm")
               for i in n.input[1:] if i in w), 0


def test_record_totals_match_the_model():
    """Each unit changes two layers; the records' totals must still be the model's."""
    model, x = small_cnn()
    out, records = run_pass(model, [{"x": x}], rank="0.5")
    assert [r.status for r in records.values()].count(PRUNED) == 4  # all but conv1
    assert FACTORISED not in [r.status for r in records.values()]
    after = sum(r.params_after if r.status == PRUNED else r.params_before
                for r in records.values())
    before = sum(r.params_before for r in records.values())
    assert after == count(out)[0] and before == count(model)[0]
    assert records["conv1"].extra["changed_by"] == "conv2"
    assert all(r.params_after >= 0 and r.params_before >= r.params_after for r in records.values())
    assert rel(run(out, x), run(model, x)) < 0.6


def test_mac_target():
    model, x = small_cnn()
    _, records = run_pass(model, [{"x": x}], target_macs=0.4)
    before = sum(r.macs_before for r in records.values())
    after = sum(r.macs_after if r.status == PRUNED else r.macs_before for r in records.values())
    assert 0.25 < after / before <= 0.4
    assert all("MAC target" in r.rank_rule for r in records.values() if r.status == PRUNED)


def test_rank_rules_without_a_count_decline():
    model, x = small_cnn()
    _, records = run_pass(model, [{"x": x}], rank="vbmf")
    assert "channel count" in records["conv2"].reason


def test_back_off_scale_keeps_more_channels():
    model, x = small_cnn()
    graph = to_graph(model)
    config = FactorizeConfig(methods={}, rank=parse_rank("0.25"), rank_scale={"conv2": 2.0})
    result = PrunePass(config, calibration=[{"x": x}])(graph)
    kept = {r.name: r.kept_channels for r in result.records}
    assert kept["conv2"] == 4 and kept["conv3"] == 4  # 0.25 of 8 = 2, ×2; 0.25 of 16
    keep = {"conv3": "reverted"}
    result = PrunePass(config, keep, calibration=[{"x": x}])(to_graph(model))
    assert next(r for r in result.records if r.name == "conv3").reason == "reverted"


# --- the pipeline and the command line ----------------------------------------------------------

def count_macs(model) -> int:
    from onnxlr.records import Declined
    from onnxlr.sites import find_site
    graph = to_graph(model)
    return sum(s.macs for n in graph.nodes if n.op in ("Conv", "Gemm")
               for s in [find_site(n, graph)] if not isinstance(s, Declined))


def test_optimize_prune_with_back_off_reports_the_returned_model(tmp_path):
    """A tight bound reverts or grows some units; the report's totals are still the model's."""
    from onnxlr.pipeline import optimize
    model, x = small_cnn()
    np.savez(tmp_path / "calib.npz", x=x)
    result, report = optimize(model, method="prune", rank="0.25", calib=str(tmp_path / "calib.npz"),
                              max_error=0.2, measure_latency=False, latency_cache=None)
    assert report.bound_met
    assert any(r.status == "reverted" for r in report.records)  # the bound forced a back-off
    assert report.params_after == count(result)[0]
    assert report.macs_after == count_macs(result)
    assert report.params_before == count(model)[0]
    assert not report.factorised and {r.method for r in report.changed} <= {"prune"}


def test_a_pruned_layer_is_recorded_as_pruned_in_the_record_text_json_and_html(tmp_path):
    """A pruned layer says so: status pruned, its kept channels and its fit error (not ranks,
    not a weight error), in the record, the text report, the JSON (schema-valid) and the HTML."""
    import json

    import jsonschema

    from onnxlr.pipeline import optimize
    from onnxlr.recipe import REPORT_SCHEMA
    model, x = small_cnn()
    np.savez(tmp_path / "calib.npz", x=x)
    result, report = optimize(model, method="prune", rank="0.5", calib=str(tmp_path / "calib.npz"),
                              max_error=None, measure_latency=False, latency_cache=None)
    recs = {r.name: r for r in report.records}
    rec = recs["conv2"]                       # 8 input channels, half kept
    assert rec.status == PRUNED and rec.pruned and rec.changed and not rec.factorised
    assert rec.kept_channels == 4 and rec.extra["channels"] == 8
    assert rec.ranks is None and rec.weight_error is None
    assert 0 <= rec.fit_error < 1 and "error_kind" not in rec.extra
    assert node_input(result, "conv2", 1).shape[1] == 4
    assert not report.factorised and report.pruned and report.changed == report.pruned
    text = report.to_text()
    row = next(line for line in text.splitlines() if line.startswith("conv2 "))
    assert "4 ch" in row and f"fit {rec.fit_error:.3f}" in row and row.rstrip().endswith("pruned")
    assert (f"layers changed: {len(report.pruned)} of {len(report.shown)} candidates "
            f"(0 factorised, {len(report.pruned)} pruned)") in text
    data = json.loads(report.to_json())
    jsonschema.Draft202012Validator(json.loads(REPORT_SCHEMA.read_text())).validate(data)
    s = data["summary"]
    assert s["layers_pruned"] == s["layers_changed"] == len(report.pruned) >= 4
    assert s["layers_factorised"] == 0
    layer = next(d for d in data["layers"] if d["name"] == "conv2")
    assert layer["status"] == "pruned" and layer["kept_channels"] == 4
    assert layer["ranks"] is None and layer["weight_error"] is None
    assert layer["fit_error"] == pytest.approx(rec.fit_error)
    assert '<span class="pill pruned">pruned</span>' in report.to_html()
    meta = json.loads({p.key: p.value for p in result.metadata_props}["onnxlr.layers"])
    assert meta["conv2"] == {"method": "prune", "kept_channels": 4}


def test_cli_thin_and_method_errors(tmp_path, capsys):
    from onnxlr.cli import main
    model, _ = small_cnn()
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "t.onnx"),
                 "--method", "thin", "--rank", "0.5", "--max-error", "none"]) == 0
    out = capsys.readouterr().out
    assert "thin" in out and (tmp_path / "t.onnx").exists()
    thinned = onnx.load(tmp_path / "t.onnx")
    assert count(thinned)[0] < count(model)[0]
    assert main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"),
                 "--method", "auto,conv=prune"]) == 1
    assert "use --method prune alone" in capsys.readouterr().err


def test_silu_diamond_is_one_per_channel_step():
    """x·sigmoid(x) feeds the tensor to two nodes that meet again: still per channel. A filter
    of zeros gives SiLU(0) = 0, a channel that can go for free."""
    r = np.random.default_rng(5)
    w1 = r.standard_normal((6, 2, 3, 3)).astype(np.float32)
    w1[3] = 0.0
    w2 = r.standard_normal((4, 6, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["s1"], name="sig1"),
             helper.make_node("Mul", ["c1", "s1"], ["m1"], name="silu1"),
             helper.make_node("Conv", ["m1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vinfo("x", ["N", 2, 5, 5])], [vinfo("y", None)],
                       [init("w1", w1), init("w2", w2)])
    x = r.standard_normal((32, 2, 5, 5)).astype(np.float32)
    out, records = run_pass(model, [{"x": x}], rank="5")
    rec = records["conv2"]
    assert rec.status == PRUNED and rec.extra["removed"] == [3], rec.reason
    assert "Sigmoid → Mul" in rec.extra["chain"]
    h = conv_nd(x, w1, pads=[1, 1, 1, 1])
    ref = conv_nd(h / (1 + np.exp(-h)), w2, pads=[1, 1, 1, 1])
    assert rel(run(out, x), ref) < 2e-5
