"""Recurrent layers' input weights by SVD: an LSTM (GRU, RNN) computes ``x·Wᵀ`` for every
step's input, so ``W ≈ (U_k S_k V_kᵀ)`` becomes a MatMul I→k in front of the same op with
input weights [D, G·H, k]. Checked against a float64 numpy LSTM (ONNX gate order i, o, f, c)
with the truncated weight, and in the search's gated graph against the built model."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ort_run
from onnxlr.pipeline import optimize, prepare

T, N, I, H = 5, 3, 24, 16


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm(x, w, r, b):
    """ONNX LSTM, default activations, Y [T, D, N, H]; direction 1 runs backwards."""
    d_count, _, _ = w.shape
    t_len, n, _ = x.shape
    h_size = r.shape[-1]
    y = np.zeros((t_len, d_count, n, h_size))
    for d in range(d_count):
        h, c = np.zeros((n, h_size)), np.zeros((n, h_size))
        steps = range(t_len) if d == 0 else range(t_len - 1, -1, -1)
        for t in steps:
            gates = x[t] @ w[d].T + h @ r[d].T + b[d, :4 * h_size] + b[d, 4 * h_size:]
            i, o, f, g = np.split(gates, 4, axis=1)
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
            y[t, d] = h
    return y


def lstm_model(seed=0, *, use_final_state=False, op="LSTM", dangling=False):
    rng = np.random.default_rng(seed)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    # a low-rank-ish input weight, as trained ones are: a fast-decaying spectrum
    basis = rng.standard_normal((2 * gates * H, I)) @ np.diag(0.7 ** np.arange(I))
    w = (basis @ np.linalg.qr(rng.standard_normal((I, I)))[0]).reshape(2, gates * H, I)
    r = rng.standard_normal((2, gates * H, H)) * 0.2
    b = rng.standard_normal((2, 2 * gates * H)) * 0.1
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((w, "W"), (r, "R"), (b, "B"))]
    outputs = ["y", "y_h"] if use_final_state or op != "LSTM" else ["y", "", ""]
    if dangling:  # named final states nothing reads (as PyTorch exports them)
        outputs = ["y", "y_h_unused", "y_c_unused"]
    nodes = [helper.make_node(op, ["x", "W", "R", "B"], outputs, name="rnn", hidden_size=H,
                              direction="bidirectional")]
    graph_outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, 2, "N", H])]
    if use_final_state:
        nodes.append(helper.make_node("Identity", ["y_h"], ["state"], name="state"))
        graph_outputs.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [T, "N", I])], graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w, r, b


def truncated(w, k):
    """The input weight after a rank-k SVD of its I × D·G·H matrix (float64, numpy)."""
    m = w.reshape(-1, w.shape[-1]).T
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vt[:k]).T.reshape(w.shape)


def test_the_numpy_reference_is_onnx_runtimes_lstm(rng):
    model, w, r, b = lstm_model()
    x = rng.standard_normal((T, N, I))
    got = ort_run(model, {"x": x.astype(np.float32)})[0]
    np.testing.assert_allclose(got, numpy_lstm(x, w, r, b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [4, 8])
def test_an_lstm_with_low_rank_input_weights_is_the_truncated_lstm(rng, k):
    model, w, r, b = lstm_model()
    out, report = optimize(model, "svd", str(k), max_error=None, verify=False)
    rec = next(rc for rc in report.records if rc.name == "rnn")
    assert rec.factorised and rec.kind == "rnn" and rec.ranks == (k,)
    assert rec.params_before == 2 * 4 * H * I
    assert rec.params_after == k * (I + 2 * 4 * H)
    assert rec.macs_after < rec.macs_before
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["MatMul", "LSTM"]   # one MatMul in front, the recurrence untouched
    x = rng.standard_normal((T, N, I))
    got = ort_run(out, {"x": x.astype(np.float32)})[0]
    np.testing.assert_allclose(got, numpy_lstm(x, truncated(w, k), r, b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op,k", [("GRU", 12), ("RNN", 8)])
def test_a_gru_and_an_rnn_with_low_rank_input_weights_stay_close(rng, op, k):
    """Below break-even (I·D·G·H / (I + D·G·H): 19 for this GRU, 13 for this RNN) the layer
    is factorised; the input weight's spectrum falls as 0.7^i, so the output moves little."""
    model, *_ = lstm_model(op=op)
    out, report = optimize(model, "svd", str(k), max_error=None, verify=False)
    rec = next(rc for rc in report.records if rc.name == "rnn")
    assert rec.factorised and rec.kind == "rnn", rec.reason
    assert [n.op_type for n in out.graph.node] == ["MatMul", op]
    x = {"x": rng.standard_normal((T, N, I)).astype(np.float32)}
    before, after = ort_run(model, x)[0], ort_run(out, x)[0]
    err = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert 0 < err < 0.1


def test_an_lstm_whose_final_state_is_used_is_declined():
    model, *_ = lstm_model(use_final_state=True)
    _, report = optimize(model, "svd", "4", max_error=None, verify=False)
    rec = next(rc for rc in report.records if rc.name == "rnn")
    assert not rec.changed and "final state" in rec.reason and "y_h" in rec.reason


def test_the_gated_graph_with_an_lstm_rung_computes_the_built_model(rng):
    from onnxlr.methods import parse_method
    from onnxlr.passes.factorize import Factorize, FactorizeConfig
    from onnxlr.rank import parse_rank
    from onnxlr.graph import to_graph, to_model
    from onnxlr.search.gated import GatedModel, Option
    model, *_ = lstm_model()
    prepared = prepare(model)
    config = FactorizeConfig(methods=parse_method("auto"), rank=parse_rank("vbmf"))
    factorize = Factorize(config, cache={})
    gated = GatedModel(prepared, {"rnn": [Option("svd", (4,)), Option("svd", (8,))]},
                       lambda m, site, ranks: factorize.factors(factorize.method(m), site, ranks),
                       factorize.method)
    onnx.checker.check_model(gated.model)
    x = {"x": rng.standard_normal((T, N, I)).astype(np.float32)}
    np.testing.assert_allclose(gated.run({}, x)["y"], ort_run(prepared, x)[0], rtol=1e-5,
                               atol=1e-6)
    for j, k in enumerate((4, 8)):
        import dataclasses
        built_config = dataclasses.replace(config, forced_ranks={"rnn": (k,)},
                                           forced_methods={"rnn": "svd"})
        graph = to_graph(prepared)
        Factorize(built_config, cache={})(graph)
        expected = ort_run(to_model(graph, prepared), x)[0]
        np.testing.assert_allclose(gated.run({"rnn": j}, x)["y"], expected, rtol=1e-4,
                                   atol=1e-5)


def test_an_lstm_with_unread_final_states_is_timed_alone_as_it_runs(tmp_path):
    """Named Y_h / Y_c that nothing reads do not make the layer look used, neither in the
    model nor in the one-node graph the layer timer builds (a graph output there)."""
    model, *_ = lstm_model(dangling=True)
    _, report = optimize(model, "svd", "4", accept="latency", batch=8,
                         latency_cache=str(tmp_path / "lat.json"))
    rec = next(rc for rc in report.records if rc.name == "rnn")
    assert rec.kind == "rnn" and "final state" not in (rec.reason or "")
    assert rec.latency_before_ms and rec.latency_after_ms and rec.latency_after_ms > 0
