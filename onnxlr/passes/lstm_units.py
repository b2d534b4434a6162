"""An LSTM's hidden units and the layer that reads them: the chain, and its rewrite.

What :mod:`onnxlr.search.hidden_pruning` prunes. The chain is ``Y [T, D, N, H] →
(Transpose [0, 2, 1, 3]) → Reshapes, Squeeze, Transposes that keep the last axis →
Gemm/MatMul`` with a constant weight (the consumer), checked on real values
(:func:`lines_up`) to give the consumer unit j of direction d as input feature ``d·H + j``.
Only LSTMs without peepholes, clip, own activations, sequence lengths or non-zero initial
states. The rewrite gives the layer the kept units' weights, turns constant Reshape targets
of D·H into D·H', and folds ``E, e`` (the original features from the kept ones) into the
consumer: ``W ← W·E``, its bias ``+ W·e``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import NameScope
from onnxlr.passes.channel_chains import fold_into_following_add
from onnxlr.sites import constant_value


@dataclass
class HiddenChain:
    """An LSTM, the ops from its Y to the consumer, and the consumer."""

    layer: gs.Node
    nodes: list            # ops between Y and the consumer, in order
    consumer: gs.Node
    directions: int
    hidden: int

    @property
    def features(self) -> int:
        return self.directions * self.hidden


@dataclass(frozen=True)
class HiddenFit:
    """One rung: the units kept per direction, the refit layer, and the map back."""

    kept: np.ndarray        # [D, H'] sorted unit indices per direction
    w: np.ndarray           # [D, 4H', I]
    r: np.ndarray           # [D, 4H', H']
    b: np.ndarray           # [D, 8H']
    expand: np.ndarray      # E [D·H, D·H']: original features from the kept ones
    offset: np.ndarray      # e [D·H]
    error: float | None     # rel. L2 of the reconstructed features on the fitting rows
    layer: str
    consumer: str
    channels: int           # H

    @property
    def neighbour(self) -> str:
        """The other layer this rung changes (its consumer loses input columns)."""
        return self.consumer

    @property
    def kept_count(self) -> int:
        return int(self.kept.shape[1])


def _attr(node, name, default=None):
    return node.attrs.get(name, default)


def _zero_state(t) -> bool:
    """An initial state that is absent, a constant zero, or ConstantOfShape of zero."""
    if t is None or not t.name:
        return True
    value = constant_value(t)
    if value is not None:
        return not np.any(value)
    if len(t.inputs) == 1 and t.inputs[0].op == "ConstantOfShape":
        v = t.inputs[0].attrs.get("value")
        v = np.zeros(1) if v is None else np.asarray(getattr(v, "values", v))
        return not np.any(v)
    return False


def _only_user(t: gs.Tensor, graph: gs.Graph) -> gs.Node | str:
    """The one node that reads ``t``'s values (Shape nodes read only its shape, which
    follows the units: an exported Reshape's target is often computed from it)."""
    if any(t is o for o in graph.outputs):
        return f"{t.name} is a graph output"
    users = [u for u in t.outputs if u.op != "Shape"]
    if len(users) != 1:
        return f"{t.name} has {len(users)} readers"
    return users[0]


def trace(node: gs.Node, graph: gs.Graph) -> HiddenChain | str:
    """The chain from an LSTM's Y to the layer that reads its units, or why there is none."""
    if node.op != "LSTM":
        return f"{node.op}: only an LSTM's hidden units are pruned"
    ins = list(node.inputs) + [None] * (8 - len(node.inputs))
    if any(constant_value(t) is None for t in ins[1:3]) or \
            (ins[3] is not None and ins[3].name and constant_value(ins[3]) is None):
        return "LSTM weights are not constants"
    if ins[4] is not None and ins[4].name:
        return "LSTM with sequence_lens"
    if not (_zero_state(ins[5]) and _zero_state(ins[6])):
        return "LSTM with a non-zero initial state"
    if ins[7] is not None and ins[7].name:
        return "LSTM with peepholes"
    if _attr(node, "clip") is not None or _attr(node, "input_forget", 0) or \
            _attr(node, "layout", 0) or _attr(node, "activations") is not None:
        return "LSTM with clip, input_forget, batch-first layout or its own activations"
    for t in node.outputs[1:]:
        if t.name and (t.outputs or any(t is o for o in graph.outputs)):
            return "LSTM whose final states are read"
    d = 2 if _attr(node, "direction", "forward") == "bidirectional" else 1
    h = int(_attr(node, "hidden_size"))
    t = node.outputs[0]
    nodes = []
    while True:
        user = _only_user(t, graph)
        if isinstance(user, str):
            return user
        if user.op in ("Gemm", "MatMul") and user.inputs[0] is t and nodes:
            if user.op == "Gemm" and int(_attr(user, "transA", 0)):
                return "Gemm with transA reads the units"
            weight = constant_value(user.inputs[1])
            if weight is None or weight.ndim != 2:
                return f"{user.name} has no constant 2-D weight"
            chain = HiddenChain(node, nodes, user, d, h)
            if consumer_columns(chain).shape[0] != d * h:
                return (f"{user.name} reads {consumer_columns(chain).shape[0]} features, "
                        f"not D·H = {d * h}")
            return chain
        if user.op == "Transpose":  # [0, 2, 1, 3] puts the directions next to the units
            perm = list(_attr(user, "perm", []))
            if not perm or perm[-1] != len(perm) - 1:
                return f"{user.name} moves the units' axis"
        elif user.op == "Squeeze":
            if d != 1:
                return f"{user.name} squeezes a bidirectional output"
        elif user.op not in ("Reshape", "Identity", "Dropout"):
            return f"{user.op} {user.name} between the LSTM and the layer that reads its units"
        if user.op == "Dropout" and len(user.outputs) > 1 and user.outputs[1].outputs:
            return f"{user.name}'s mask is read"
        # which feature is which unit is checked on real values (:func:`lines_up`)
        nodes.append(user)
        t = user.outputs[0]


def lines_up(y: np.ndarray, consumer_input: np.ndarray) -> bool:
    """The consumer's input rows are Y's units, direction-major (d·H + j), in some row
    order: what the fit and the rewrite assume of the ops between."""
    f = unit_features(np.asarray(y, np.float64))
    z = np.asarray(consumer_input, np.float64)
    if z.size != f.size or z.shape[-1] != f.shape[1]:
        return False
    z = z.reshape(-1, f.shape[1])
    probe = np.random.default_rng(0).standard_normal(f.shape[1])
    return bool(np.allclose(np.sort(f @ probe), np.sort(z @ probe), rtol=1e-5, atol=1e-6))


def consumer_columns(chain: HiddenChain) -> np.ndarray:
    """The consumer's weight as [features, outputs]."""
    c = chain.consumer
    w = np.asarray(constant_value(c.inputs[1]), np.float64)
    if c.op == "Gemm" and int(_attr(c, "transB", 0)):
        w = w.T
    return w


def lstm_weights(node: gs.Node):
    w = np.asarray(constant_value(node.inputs[1]), np.float64)
    r = np.asarray(constant_value(node.inputs[2]), np.float64)
    d, g, _ = w.shape
    has_b = len(node.inputs) > 3 and node.inputs[3].name
    b = np.asarray(constant_value(node.inputs[3]), np.float64) if has_b else np.zeros((d, 2 * g))
    return w, r, b


def unit_features(y: np.ndarray) -> np.ndarray:
    """Y [T, D, N, H] → rows [T·N, D·H], direction-major: the consumer's input columns."""
    t, d, n, h = y.shape
    return y.transpose(0, 2, 1, 3).reshape(t * n, d * h)


def set_units(node: gs.Node, fitted_w, fitted_r, fitted_b, hidden: int, names: NameScope,
              dtype) -> None:
    """Give an LSTM node its pruned weights and size; its zero initial states go."""
    inputs = list(node.inputs)[:3]
    inputs[1] = gs.Constant(names(f"{node.name}/W_units"), np.asarray(fitted_w, dtype))
    inputs[2] = gs.Constant(names(f"{node.name}/R_units"), np.asarray(fitted_r, dtype))
    inputs.append(gs.Constant(names(f"{node.name}/B_units"), np.asarray(fitted_b, dtype)))
    node.inputs.clear()
    node.inputs.extend(inputs)
    node.attrs["hidden_size"] = int(hidden)


def _const(names, name, value) -> gs.Constant:
    return gs.Constant(names(name), np.ascontiguousarray(value))


def _shrink_reshapes(chain: HiddenChain, keep: int, names: NameScope) -> None:
    for n in chain.nodes:
        if n.op == "Reshape":
            shape = constant_value(n.inputs[1])
            if shape is not None and int(shape[-1]) == chain.features:
                shape = np.array(shape, np.int64)
                shape[-1] = chain.directions * keep
                n.inputs[1] = _const(names, f"{n.inputs[1].name}/units", shape)


def _fold_expansion(chain: HiddenChain, expand: np.ndarray, offset: np.ndarray,
                    graph: gs.Graph, names: NameScope) -> None:
    """The consumer reads the kept features: W ← W·E, its bias ← bias + W·e."""
    c = chain.consumer
    w = consumer_columns(chain)                       # [F, out]
    dtype = np.asarray(constant_value(c.inputs[1])).dtype
    new = expand.T @ w                                # [F', out]
    delta = offset @ w                                # [out]
    if c.op == "Gemm":
        alpha, beta = float(_attr(c, "alpha", 1.0)), float(_attr(c, "beta", 1.0))
        c.inputs[1] = _const(names, f"{c.name}/W_units",
                             (new.T if int(_attr(c, "transB", 0)) else new).astype(dtype))
        has_c = len(c.inputs) > 2 and c.inputs[2].name
        bias = np.asarray(constant_value(c.inputs[2]), np.float64) if has_c else np.zeros(1)
        if has_c and bias is None:
            raise ValueError(f"{c.name}'s bias is not a constant")
        summed = (bias * beta + alpha * delta) / (beta if beta else 1.0)
        if not beta:
            c.attrs["beta"] = 1.0
        if has_c:
            c.inputs[2] = _const(names, f"{c.name}/C_units", summed.astype(dtype))
        else:
            c.inputs.append(_const(names, f"{c.name}/C_units", summed.astype(dtype)))
        return
    c.inputs[1] = _const(names, f"{c.name}/W_units", new.astype(dtype))
    out = c.outputs[0]
    if not fold_into_following_add(out, delta.astype(dtype), names):
        shifted = gs.Variable(names(f"{out.name}/units"), dtype=out.dtype)
        c.outputs[0] = shifted
        graph.nodes.append(gs.Node("Add", names(f"{c.name}/units_bias"), {},
                                   [shifted, _const(names, f"{c.name}/bias_units",
                                                    delta.astype(dtype))], [out]))


def rewrite(chain: HiddenChain, fitted: HiddenFit, graph: gs.Graph, names: NameScope) -> None:
    """The chain with the fit's units: layer, Reshape targets, consumer."""
    y = chain.layer.outputs[0]
    dtype = np.float32 if y.dtype is None else np.dtype(y.dtype)
    keep = fitted.kept.shape[1]
    set_units(chain.layer, fitted.w, fitted.r, fitted.b, keep, names, dtype)
    for o in chain.layer.outputs:  # Y, and the final states nothing reads
        o.shape = None
    for n in chain.nodes:
        for o in n.outputs:
            o.shape = None
    _shrink_reshapes(chain, keep, names)
    _fold_expansion(chain, fitted.expand, fitted.offset, graph, names)


def first_units(chain: HiddenChain, keep: int) -> HiddenFit:
    """The first H' units with sliced weights: the timing's stand-in (only shapes matter)."""
    w, r, b = lstm_weights(chain.layer)
    d, h = chain.directions, chain.hidden
    kept = np.tile(np.arange(keep), (d, 1))
    rows = np.concatenate([g * h + np.arange(keep) for g in range(4)])
    cols = np.concatenate([k * h + np.arange(keep) for k in range(d)])
    expand = np.zeros((d * h, d * keep))
    expand[cols, np.arange(d * keep)] = 1.0
    return HiddenFit(kept, w[:, rows], r[:, rows][:, :, :keep],
                     np.concatenate([b[:, :4 * h][:, rows], b[:, 4 * h:][:, rows]], axis=1),
                     expand, np.zeros(d * h), None, chain.layer.name, chain.consumer.name, h)


__all__ = ["HiddenChain", "HiddenFit", "consumer_columns", "first_units", "lines_up",
           "lstm_weights", "rewrite", "set_units", "trace", "unit_features"]
