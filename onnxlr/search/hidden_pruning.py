"""An LSTM's hidden units as prune rungs on its own ladder, competing with its SVD rungs.

Why: in a CRNN the recurrence is often the biggest cost and low rank cannot reach it (the
input-weight SVD leaves ``h·Rᵀ`` alone). Fewer hidden units shrink all of it: the input
weights by H'/H, the recurrence by (H'/H)², and the layer that reads the sequence (ddddocr's
1024→8210 classifier) by H'/H. On ddddocr (bidirectional, H = 512) keeping 256 units made
the whole model 1.71x faster alone, for 2.4 points of exact match on 1024 test captchas.

- **Chain** (:mod:`onnxlr.passes.lstm_units`): the LSTM's Y through Transposes and Reshapes
  into a Gemm/MatMul with a constant weight (the consumer), unit j of direction d its input
  feature ``d·H + j``.
- **Fit** (on the calibration batches): units ranked by their RMS times their reach (the
  consumer's column and the recurrence's column); the kept units' W, R and B re-solved by
  least squares against the original gate pre-activations, with the pruned layer's own
  previous states as inputs (what the dropped units carried is taken up where it can be);
  then ``E, e``: the original features from the pruned ones by least squares. For any
  linear consumer ``W·(E y' + e)`` *is* its least-squares refit on the pruned features,
  so it folds into whatever first stage the consumer ends up with (itself, or its SVD).
- **Gated graph**: the rung computes the pruned layer and maps its features back to Y's
  layout (``E y' + e``), so the consumer's own rungs stay valid beside it.
- **Timed** as the chain (layer → ops → consumer) against the chain with the first H'
  units: the consumer's saving is measured, not counted.
- **Build** (:func:`onnxlr.passes.lstm_units.rewrite`): the layer shrinks and E folds into
  the node that reads the chain's last tensor.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr import runtime
from onnxlr.errors import OnnxlrError
from onnxlr.graph import NameScope, to_graph
from onnxlr.passes.lstm_units import (HiddenChain, HiddenFit, consumer_columns, first_units,
                                      lines_up, lstm_weights, rewrite, set_units, trace,
                                      unit_features)
from onnxlr.search.pruning import (KEEP_LEVELS, PRUNE, chain_key, export, keep_counts,
                                   place_rungs)

#: Rows (time steps × samples) the least-squares fits see, at most.
MAX_ROWS = 16384
#: Time steps × samples captured for the fits (the pruned layer is run on whole sequences):
#: bounds the captured states at this many × D·H values.
MAX_SAMPLE_ROWS = 4 * MAX_ROWS
#: The gate fit's features (input size + kept units) are bounded: Gram matrices of this
#: many float64 columns (and E's of D·H) are what the fit holds in memory.
MAX_FEATURES = 4096
#: Ridge, relative to the Gram matrix's mean diagonal (keeps near-dependent units stable).
RIDGE = 1e-4


# --- statistics and fits -------------------------------------------------------------------

def _previous(y: np.ndarray, d: int) -> np.ndarray:
    """Each step's previous state of direction d: y[t-1] forwards, y[t+1] backwards."""
    z = np.zeros_like(y[:1])
    return np.concatenate([z, y[:-1]]) if d == 0 else np.concatenate([y[1:], z])


def _solve(f: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with a little ridge: [features + 1, targets] (the last row a bias)."""
    f1 = np.hstack([f, np.ones((len(f), 1))])
    gram = f1.T @ f1
    scale = RIDGE * float(np.trace(gram)) / len(gram)
    gram[np.diag_indices(len(gram) - 1)] += scale
    return np.linalg.solve(gram, f1.T @ target)


def _single_lstm(node: gs.Node, w, r, b, hidden: int, opset: int) -> onnx.ModelProto:
    """The layer alone with its initial states dropped (they are zero), for a fitting run."""
    d = w.shape[0]
    inits = [onnx.numpy_helper.from_array(np.asarray(a, np.float32), n)
             for a, n in ((w, "W"), (r, "R"), (b, "B"))]
    lstm = onnx.helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=hidden,
                                 direction=node.attrs.get("direction", "forward"))
    graph = onnx.helper.make_graph(
        [lstm], "lstm", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                            [None, None, w.shape[2]])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                            [None, d, None, hidden])], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


def _run_lstm(model: onnx.ModelProto, x: np.ndarray, provider: str) -> np.ndarray:
    session = runtime.make_session(model, provider=provider)
    parts = [runtime.run(session, {"x": x[:, i:i + 64].astype(np.float32)})["y"]
             for i in range(0, x.shape[1], 64)]
    return np.concatenate(parts, axis=2).astype(np.float64)


def _rows(count: int, rng) -> np.ndarray:
    return np.sort(rng.choice(count, MAX_ROWS, replace=False)) if count > MAX_ROWS else \
        np.arange(count)


def unit_order(chain: HiddenChain, units: np.ndarray, r: np.ndarray) -> list[np.ndarray]:
    """Each direction's units, most important first: RMS times reach (the consumer's column
    and the recurrence's column: where the unit's value goes)."""
    d, h = chain.directions, chain.hidden
    reach = np.linalg.norm(consumer_columns(chain), axis=1).reshape(d, h)
    rms = np.sqrt(np.mean(units ** 2, axis=1))
    return [np.argsort(-(rms[k] * np.sqrt(reach[k] ** 2 + np.sum(r[k] ** 2, axis=0))),
                       kind="stable") for k in range(d)]


def fits_for(chain: HiddenChain, x: np.ndarray, y: np.ndarray, keeps: list[int], *,
             opset: int, provider: str = "cpu", seed: int = 0) -> dict[int, HiddenFit]:
    """{H': fit} from the layer's captured input x [T, N, I] and output y [T, D, N, H]."""
    w, r, b = lstm_weights(chain.layer)
    d, h = chain.directions, chain.hidden
    if x.shape[-1] + max(keeps) > MAX_FEATURES or d * h > MAX_FEATURES:
        raise ValueError(f"{x.shape[-1] + max(keeps)} gate-fit features or {d * h} units, "
                         f"over the {MAX_FEATURES} the fit allows")
    rng = np.random.default_rng(seed)
    t_len, n = x.shape[0], x.shape[1]
    rows = _rows(t_len * n, rng)
    xr = x.reshape(t_len * n, -1)[rows].astype(np.float64)
    units = y.transpose(1, 0, 2, 3).reshape(d, -1, h)
    mean = units.mean(axis=1)
    order = unit_order(chain, units, r)
    target_features = unit_features(y)[rows]
    out = {}
    for keep in keeps:
        kept = np.stack([np.sort(o[:keep]) for o in order])
        gate_rows = [np.concatenate([g * h + kept[k] for g in range(4)]) for k in range(d)]
        # first the kept rows, with the dropped units' mean contribution in the bias ...
        w1 = np.stack([w[k][gate_rows[k]] for k in range(d)])
        r1 = np.stack([r[k][gate_rows[k]][:, kept[k]] for k in range(d)])
        b1 = []
        for k in range(d):
            dropped = np.setdiff1d(np.arange(h), kept[k])
            rb = b[k, 4 * h:] + r[k][:, dropped] @ mean[k, dropped]
            b1.append(np.concatenate([b[k, :4 * h][gate_rows[k]], rb[gate_rows[k]]]))
        b1 = np.stack(b1)
        y1 = _run_lstm(_single_lstm(chain.layer, w1, r1, b1, keep, opset), x, provider)
        # ... then W, R, B of the kept units re-solved against the original pre-activations,
        # on the pruned layer's own previous states
        w2, r2, b2 = [], [], []
        for k in range(d):
            prev_orig = _previous(y[:, k], k).reshape(t_len * n, h)[rows]
            prev_own = _previous(y1[:, k], k).reshape(t_len * n, keep)[rows]
            target = (xr @ w[k][gate_rows[k]].T + prev_orig @ r[k][gate_rows[k]].T
                      + b[k, :4 * h][gate_rows[k]] + b[k, 4 * h:][gate_rows[k]])
            sol = _solve(np.hstack([xr, prev_own]), target)
            i_size = xr.shape[1]
            w2.append(sol[:i_size].T)
            r2.append(sol[i_size:-1].T)
            b2.append(np.concatenate([sol[-1], np.zeros(4 * keep)]))
        w2, r2, b2 = np.stack(w2), np.stack(r2), np.stack(b2)
        y2 = _run_lstm(_single_lstm(chain.layer, w2, r2, b2, keep, opset), x, provider)
        small = unit_features(y2)[rows]
        sol = _solve(small, target_features)
        expand, offset = sol[:-1].T, sol[-1]
        resid = small @ sol[:-1] + offset - target_features
        denom = float(np.sum((target_features - target_features.mean(0)) ** 2))
        error = math.sqrt(float(np.sum(resid ** 2)) / denom) if denom > 0 else None
        out[keep] = HiddenFit(kept, w2, r2, b2, expand, offset, error, chain.layer.name,
                              chain.consumer.name, h)
    return out


# --- the gated graph's candidate, the timing graphs and the final rewrite ----------------------

class HiddenBuilder:
    """Builds a hidden-unit rung in the gated graph (the interface of a Method's ``build``):
    the pruned layer, then ``E y' + e`` back in Y's layout [T, D, N, H]."""

    name = PRUNE

    def build(self, graph: gs.Graph, site, fitted: HiddenFit, names: NameScope) -> None:
        node = site.node
        y = node.outputs[0]
        dtype = np.float32 if y.dtype is None else np.dtype(y.dtype)
        d, keep = fitted.kept.shape
        small = gs.Variable(names(f"{node.name}/units"), dtype=y.dtype)
        node.outputs.clear()
        node.outputs.append(small)
        set_units(node, fitted.w, fitted.r, fitted.b, keep, names, dtype)
        p = node.name

        def const(tag, value):
            return gs.Constant(names(f"{p}/{tag}"), np.ascontiguousarray(value))

        def add(op, inputs, attrs=None, out=None):
            out = out or gs.Variable(names(f"{p}/{op.lower()}"), dtype=y.dtype)
            graph.nodes.append(gs.Node(op, names(f"{p}/units_{op.lower()}"), attrs or {},
                                       inputs, [out]))
            return out

        t = add("Transpose", [small], {"perm": [0, 2, 1, 3]})
        t = add("Reshape", [t, const("flat", np.array([0, 0, -1], np.int64))])
        t = add("MatMul", [t, const("E", fitted.expand.T.astype(dtype))])
        t = add("Add", [t, const("e", fitted.offset.astype(dtype))])
        t = add("Reshape", [t, const("split", np.array([0, 0, d, fitted.channels], np.int64))])
        add("Transpose", [t], {"perm": [0, 2, 1, 3]}, out=y)


def chain_graph(graph: gs.Graph, chain: HiddenChain) -> gs.Graph | str:
    """The chain alone (the LSTM's input as the graph input, shape ops it needs included)."""
    g = graph.copy()
    nodes = {n.name: n for n in g.nodes}
    layer = nodes[chain.layer.name]
    x = layer.inputs[0]
    for i in (5, 6):  # zero initial states (checked): dropped, so nothing before is needed
        if len(layer.inputs) > i and layer.inputs[i].name:
            layer.inputs[i] = gs.Variable.empty()
    x.inputs.clear()
    g.inputs = [x]
    g.outputs = [nodes[chain.consumer.name].outputs[0]]
    g.cleanup(remove_unused_graph_inputs=True).toposort()
    produced = {o.name for n in g.nodes for o in n.outputs} | {x.name}
    for n in g.nodes:
        for t in n.inputs:
            if isinstance(t, gs.Variable) and t.name and t.name not in produced:
                return f"the chain reads {t.name}, computed before the layer"
    return g


def time_chain(timer, graph: gs.Graph, chain: HiddenChain, feed: np.ndarray, keeps: list[int],
               ir_version: int) -> dict[int, tuple[float, float]] | str:
    """{H': (ms of the chain, ms with H' units)} on the layer's real input, or why the chain
    cannot be timed (then the layer gets no unit rungs)."""
    sub = chain_graph(graph, chain)
    if isinstance(sub, str):
        return sub
    x = sub.inputs[0].name
    out, pending = {}, []
    for keep in keeps:
        key = chain_key("hidden", "hidden", [chain.layer, *chain.nodes, chain.consumer], feed,
                        keep, timer)
        cached = timer.timing_cache.get(key)
        if cached is not None:
            out[keep] = (cached[0], cached[1])
            continue
        g = sub.copy()
        c = trace(next(n for n in g.nodes if n.name == chain.layer.name), g)
        if isinstance(c, str):
            return c
        rewrite(c, first_units(c, keep), g, NameScope(g))
        g.cleanup().toposort()
        session = _runs(g, ir_version, timer, {x: feed})
        if isinstance(session, str):
            return f"the chain with fewer units does not run ({session})"
        pending.append((keep, key, session))
    if pending:
        base = _runs(sub, ir_version, timer, {x: feed})
        if isinstance(base, str):
            return f"the chain alone does not run ({base})"
        timed = timer._time_group(base, [p[2] for p in pending], {x: feed})  # noqa: SLF001
        for (keep, key, _), cached in zip(pending, timed):
            timer.timing_cache.put(key, cached)
            out[keep] = (cached[0], cached[1])
    return out


def _runs(graph: gs.Graph, ir_version: int, timer, feeds: dict):
    """A session of the graph that has run once on ``feeds``, or the first line of why not."""
    try:
        session = runtime.make_session(export(graph, ir_version), provider=timer.provider,
                                       threads=timer.threads)
        runtime.run(session, feeds)
    except Exception as exc:  # noqa: BLE001  (export and ORT errors: the chain is declined)
        return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return session


def apply(graph: gs.Graph, fits: dict[str, HiddenFit]) -> dict[str, str]:
    """Rewrite every chosen LSTM's chain (the consumer as it is now: the original layer or
    its factorised first stage); {layer: why not} for any that no longer traces."""
    names = NameScope(graph)
    failed = {}
    for node in [n for n in graph.nodes if n.name in fits]:
        chain = trace(node, graph)
        if isinstance(chain, str):
            failed[node.name] = chain
            continue
        rewrite(chain, fits[node.name], graph, names)
    graph.cleanup().toposort()
    return failed


# --- rungs -------------------------------------------------------------------------------------

def _enough(batches: list[dict], steps: int) -> list[dict]:
    """The leading batches whose samples give the fits about ``MAX_SAMPLE_ROWS`` steps: a
    long sequence's captured states (T·N·D·H) stay bounded, and the fits subsample
    :data:`MAX_ROWS` of them anyway."""
    out, samples = [], 0
    for b in batches:
        if out and samples * max(steps, 1) >= MAX_SAMPLE_ROWS:
            break
        out.append(b)
        samples += int(next(iter(b.values())).shape[0])
    return out


def add_hidden_rungs(build, ladders: list, empty: dict[str, str], feeds: dict, timer,
                     batches: list[dict], *, multiple: int = 8, provider: str = "cpu",
                     progress=None) -> tuple[dict, dict]:
    """Hidden-unit rungs on the ladders of the selected LSTMs; returns the fits by
    (layer, H') and an account."""
    from onnxlr.budget import selected_layers
    from onnxlr.latency import capture, capture_batches
    from onnxlr.search.ladders import MIN_RUNG_SPEEDUP, Ladder, Rung
    from onnxlr.search.gated import Option
    from onnxlr.search.pruning import layer_costs

    graph = to_graph(build.prepared)
    nodes = {n.name: n for n in graph.nodes}
    account = {"layers": {}, "fitted": 0}
    chains = {}
    for rec in selected_layers(build):
        node = nodes.get(rec.name)
        if node is None or node.op != "LSTM":
            continue
        chain = trace(node, graph)
        if isinstance(chain, str):
            account["layers"][rec.name] = chain
        else:
            chains[rec.name] = chain
    fits: dict[tuple[str, int], HiddenFit] = {}
    if not chains:
        return fits, account
    opset = next((o.version for o in build.prepared.opset_import if o.domain in ("", "ai.onnx")),
                 17)
    wanted = [c.layer.inputs[0].name for c in chains.values()]
    values = capture(build.prepared, feeds, wanted, provider=timer.provider)
    costs = layer_costs(graph)
    by = {lad.layer: lad for lad in ladders}
    for i, (name, chain) in enumerate(chains.items()):
        if progress:
            progress(i, len(chains), f"timing fewer units in {name}")
        keeps = keep_counts(chain.hidden, KEEP_LEVELS, multiple)
        timed = time_chain(timer, graph, chain, values[chain.layer.inputs[0].name], keeps,
                           build.prepared.ir_version)
        if isinstance(timed, str):
            account["layers"][name] = timed
            continue
        account["layers"][name] = {str(k): a / b for k, (a, b) in timed.items()}
        fast = [(k, a, b) for k, (a, b) in timed.items() if a / b >= MIN_RUNG_SPEEDUP]
        if not fast or not batches:
            continue
        x_name, y_name = chain.layer.inputs[0].name, chain.layer.outputs[0].name
        z_name = chain.consumer.inputs[0].name
        got = capture_batches(build.prepared, _enough(batches, values[x_name].shape[0]),
                              [x_name, y_name, z_name], provider=provider)
        if not lines_up(got[0][y_name], got[0][z_name]):
            account["layers"][name] = (f"the ops between {name} and {chain.consumer.name} do "
                                       f"not keep its units on the last axis, direction-major")
            continue
        x = np.concatenate([g[x_name] for g in got], axis=1)
        y = np.concatenate([g[y_name] for g in got], axis=2).astype(np.float64)
        try:
            fitted = fits_for(chain, x, y, [k for k, _, _ in fast], opset=opset,
                              provider=provider)
        except (np.linalg.LinAlgError, ValueError, OnnxlrError) as exc:
            account["layers"][name] = f"the fit failed ({exc})"
            continue
        lad = by.get(name)
        if lad is None:
            params, macs = costs.get(name, (0, 0))
            lad = Ladder(name, PRUNE, macs, params, 0.0)
        consumer_macs = (costs.get(chain.consumer.name) or (0, 0))[1]
        rungs = []
        for k, ms_a, ms_b in fast:
            f = fits[(name, k)] = fitted[k]
            rungs.append(Rung(Option(PRUNE, (k,)), int(round(lad.macs_before * k / chain.hidden)),
                              None, f.error, ms_a, ms_b, scope="chain",
                              neighbour=chain.consumer.name,
                              neighbour_macs=int(consumer_macs * (chain.hidden - k)
                                                 / chain.hidden)))
        account["fitted"] += len(rungs)
        lad.chain = (f"{name} ({chain.directions}×{chain.hidden} units) → "
                     + " → ".join([n.op for n in chain.nodes] + [chain.consumer.name]))
        place_rungs(lad, rungs, ladders, by, empty)
    timer.timing_cache.save()
    return fits, account


__all__ = ["HiddenBuilder", "HiddenFit", "add_hidden_rungs", "apply", "fits_for",
           "time_chain", "unit_order"]
