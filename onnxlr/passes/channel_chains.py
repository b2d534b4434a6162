"""Channel chains: a producer layer, the ops that act on each of its channels alone, one
consumer layer; which channels can go and how the layers are rewritten without them.

A *channel chain* is a producer layer (Conv, Gemm, MatMul with a constant weight), the
nodes that act on each channel alone (BatchNormalization, Relu, Clip, LeakyRelu, pools, a
Pad that pads no channels, a Transpose between channel-first and channel-last, arithmetic
with a per-channel constant, GELU as Erf/Mul/Add, SiLU as a diamond, …) and one consumer
layer (Conv, or Gemm/MatMul, possibly after a Flatten/Reshape: then each channel is a block
of H·W consumer columns). Removing channel c removes the producer's output c (weight row,
bias, the chain's per-channel constants) and the consumer's input c. :func:`trace_chain`
finds a chain or says why there is none: a residual Add or a Concat (the other branch would
need the same channels removed), a grouped consumer, a tensor that is a graph output or
feeds two nodes, an op not known to act per channel.

Used by the channel passes (:mod:`onnxlr.passes.prune`, :mod:`onnxlr.passes.thin`) and by
the search's prune rungs (:mod:`onnxlr.search.pruning`). Over 400 lines on purpose: one
rule per kind of op between the layers (element-wise, per-channel constants, BatchNorm,
pools, Pad, Transpose, Flatten/Reshape, diamonds), each small; tracing and the rewrite read
and write the same fields of a chain, so they stay together.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.graph import NameScope, constant_value, is_graph_output, static_shape
from onnxlr.records import Declined
from onnxlr.sites import find_site

CANDIDATE_OPS = ("Gemm", "MatMul", "Conv")
#: ops applied to each element alone; LINEAR ones keep a linear relation between channels
UNARY = frozenset({"Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish",
                   "Tanh", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Abs", "Neg", "Exp",
                   "ThresholdedRelu", "Identity", "Dropout", "Cast", "Clip"})
LINEAR = frozenset({"Identity", "Dropout"})
#: ops that act on each channel's spatial map alone (channel-first tensors only)
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                   "GlobalLpPool"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "PRelu", "Pow"})
PER_CHANNEL_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
@dataclass
class ChannelChain:
    """Producer → per-channel nodes → consumer; see the module docstring."""

    producer: gs.Node
    consumer: gs.Node
    nodes: list[gs.Node]
    tensors: list[gs.Variable]           # producer output … consumer input
    channels: int                        # C
    group: int                           # K: consumer weight entries per channel
    channel_first: bool
    slices: list[tuple[gs.Node, int, int]] = field(default_factory=list)  # (node, input, axis)
    flatten: gs.Node | None = None       # Flatten/Reshape before a Gemm/MatMul consumer
    flip: int | None = None              # index of the first tensor after a Transpose that
                                         # moved the channels (first ↔ last); channel_first
                                         # is the layout from there on

    @property
    def linear(self) -> bool:
        """True when nothing between the layers is non-linear (or affine)."""
        return all(n.op in LINEAR for n in self.nodes)

    def describe(self) -> str:
        return " → ".join([self.producer.name] + [n.op for n in self.nodes] + [self.consumer.name])


# --- which channels can go ----------------------------------------------------------------------

def _attr(node: gs.Node, name: str, default=None):
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _constant_input(node: gs.Node, i: int) -> np.ndarray | None:
    if len(node.inputs) <= i or not node.inputs[i].name:
        return None
    return constant_value(node.inputs[i])


def _const_axis(shape: tuple, rank: int | None, channel_first: bool, channels: int) -> int | None | str:
    """Axis of a broadcast constant that runs over channels (None: it does not)."""
    if int(np.prod(shape, dtype=np.int64)) == 1:
        return None
    if channel_first:
        if rank is None:
            return "tensor rank unknown"
        pos = 1 - (rank - len(shape))
    else:
        pos = len(shape) - 1
    if pos < 0 or shape[pos] == 1:
        return None
    if shape[pos] == channels:
        return pos
    return f"constant of shape {tuple(shape)} does not broadcast per channel"


def _producer(node: gs.Node, graph: gs.Graph) -> tuple[int, bool] | str:
    """(output channels, channel-first) of a layer whose output channels can be removed."""
    site = find_site(node, graph)
    if isinstance(site, Declined):
        return site.reason
    if node.op == "Conv":
        return int(site.weight.shape[0]), True
    if node.op == "Gemm":
        bias = _constant_input(node, 2)
        if len(node.inputs) > 2 and node.inputs[2].name and bias is None:
            return "Gemm bias is not a constant"
        n = site.matrix.shape[1]
        if bias is not None and bias.size not in (1, n) or bias is not None and bias.ndim > 1 \
                and bias.shape[0] != 1:
            return f"Gemm bias of shape {tuple(bias.shape)} is not one value per output"
        return int(n), False
    return int(site.weight.shape[1]), False


def _consumer(node: gs.Node, t: gs.Tensor, chain: ChannelChain, spatial: int | None,
              graph: gs.Graph) -> int | str:
    """K (weight entries per input channel) of a layer that can lose input channels, or why not."""
    where = f"{node.op} '{node.name}' after '{chain.producer.name}'"
    if node.inputs[0] is not t:
        return f"'{t.name}' is not the data input of {where}"
    site = find_site(node, graph)
    if isinstance(site, Declined):
        return f"{where} cannot be rewritten: {site.reason}"
    if node.op == "Conv":
        if int(node.attrs.get("group", 1)) != 1:  # find_site declines these already
            return f"{where} is a grouped conv"
        if not chain.channel_first or chain.flatten is not None:
            return f"{where} reads a channel-last or flattened tensor"
        if site.weight.shape[1] != chain.channels:
            return f"{where} has {site.weight.shape[1]} input channels, not {chain.channels}"
        return int(np.prod(site.weight.shape[2:]))
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return f"{where} has transA=1"
    if chain.channel_first and chain.flatten is None:
        return f"{where} reads a channel-first map without a Flatten"
    k = spatial or 1
    if site.matrix.shape[0] != chain.channels * k:
        return f"{where} has {site.matrix.shape[0]} inputs, not {chain.channels}×{k}"
    return k


def trace_chain(producer: gs.Node, graph: gs.Graph) -> ChannelChain | str:
    """The channel chain that starts at ``producer``, or why its output channels cannot go."""
    info = _producer(producer, graph)
    if isinstance(info, str):
        return f"producer '{producer.name}': {info}"
    channels, channel_first = info
    t = producer.outputs[0]
    shape = static_shape(t)
    rank = len(shape) if shape is not None else None
    chain = ChannelChain(producer, producer, [], [t], channels, 1, channel_first)
    spatial = None
    while True:
        if is_graph_output(graph, t):
            return f"'{t.name}' after '{producer.name}' is a graph output"
        users = list(t.outputs)
        if len(users) != 1:
            if not users:
                return f"'{t.name}' is not used"
            merged = _diamond(t, users, chain, rank, graph)
            if merged is None:
                names = ", ".join(f"{u.op} '{u.name}'" for u in users)
                return (f"'{t.name}' after '{producer.name}' feeds {len(users)} nodes ({names}): "
                        f"every branch would need the same channels removed")
            for node in merged:
                chain.nodes.append(node)
                chain.tensors.append(node.outputs[0])
            t = merged[-1].outputs[0]
            continue
        u = users[0]
        if u.op in CANDIDATE_OPS and not u.domain:
            k = _consumer(u, t, chain, spatial, graph)
            if isinstance(k, str):
                return k
            chain.consumer, chain.group = u, k
            return chain
        reason = _pass_through(u, t, chain, rank)
        if isinstance(reason, str):
            return reason
        if u.op in ("Flatten", "Reshape"):
            spatial = reason
            chain.flatten = u
        if any(o.outputs or is_graph_output(graph, o) for o in u.outputs[1:]):
            return f"{u.op} '{u.name}' has a second output in use"
        chain.nodes.append(u)
        t = u.outputs[0]
        chain.tensors.append(t)


def _pass_through(u: gs.Node, t: gs.Tensor, chain: ChannelChain, rank: int | None) -> int | None | str:
    """None when ``u`` acts per channel (recording constants to slice), the spatial size for a
    Flatten/Reshape, else the reason it stops the chain."""
    where = f"{u.op} '{u.name}' after '{chain.producer.name}'"
    if u.domain:
        return f"{where} is a custom op"
    if chain.flatten is not None and u.op not in UNARY - {"Clip"}:
        return f"{where} follows a Flatten (only element-wise activations may)"
    if u.op == "Concat":
        return f"{where} concatenates branches: the channel offsets would shift (not handled)"
    if u.op in BINARY:
        others = [i for i, x in enumerate(u.inputs) if x is not t]
        if len(others) != 1 or u.inputs[0] is not t and u.op in ("PRelu",):
            return f"{where} uses the tensor twice"
        i = others[0]
        value = _constant_input(u, i)
        if value is None:
            kind = "residual Add" if u.op in ("Add", "Sum") else f"{u.op} with another branch"
            return (f"{kind} '{u.name}' after '{chain.producer.name}': the other branch would "
                    f"need the same channels removed")
        axis = _const_axis(value.shape, rank, chain.channel_first, chain.channels)
        if isinstance(axis, str):
            return f"{where}: {axis}"
        if len(value.shape) > (rank or len(value.shape)):
            return f"{where}: constant of rank {value.ndim} broadcasts the tensor up"
        if axis is not None:
            chain.slices.append((u, i, axis))
        return None
    if u.op == "Clip":
        for i in (1, 2):
            if len(u.inputs) > i and u.inputs[i].name and _constant_input(u, i) is None:
                return f"{where}: Clip bounds are not constant"
        return None
    if u.op in UNARY:
        return None
    if u.op in PER_CHANNEL_PARAMS:
        if not chain.channel_first and rank != 2:
            return f"{where} normalises a channel-last tensor"
        for i in PER_CHANNEL_PARAMS[u.op]:
            value = _constant_input(u, i)
            if value is None or value.shape != (chain.channels,):
                return f"{where}: its per-channel parameters are not constants of shape (C,)"
            chain.slices.append((u, i, 0))
        if _attr(u, "training_mode", 0):
            return f"{where} is in training mode"
        return None
    if u.op in POOLS:
        return None if chain.channel_first else f"{where} pools a channel-last tensor"
    if u.op == "Pad":
        return _pad(u, chain, rank, where)
    if u.op == "Transpose":
        return _transpose(u, chain, rank, where)
    if u.op in ("Flatten", "Reshape"):
        return _flatten(u, t, chain, rank)
    return f"{where} is not known to act on each channel alone"


def _transpose(u: gs.Node, chain: ChannelChain, rank: int | None, where: str) -> None | str:
    """A Transpose passes when it moves the channel axis between first (axis 1) and last,
    the layouts convs and matrix products read (a 1-D conv net's ``(N, C, L) → (N, L, C)``
    before its classifier, PITFALLS 12); one per chain."""
    if rank is None or rank < 3:
        return f"{where}: needs a tensor of known rank ≥ 3"
    if chain.flip is not None:
        return f"{where} is the chain's second Transpose"
    perm = [int(p) for p in u.attrs.get("perm", list(range(rank))[::-1])]
    axis = 1 if chain.channel_first else rank - 1
    new = perm.index(axis)
    if new == 1:
        chain.channel_first = True
    elif new == rank - 1:
        chain.channel_first = False
    else:
        return f"{where} moves the channels to axis {new}"
    chain.flip = len(chain.tensors)   # its output is appended next
    return None


def _pad(u: gs.Node, chain: ChannelChain, rank: int | None, where: str) -> None | str:
    """A Pad passes when it pads no channels (PyTorch exports put padding before convs as
    an op, PITFALLS 12): every mode acts on each channel's map alone, and a constant fill
    is the same for every channel."""
    if rank is None:
        return f"{where}: the tensor's rank is unknown"
    pads = _constant_input(u, 1) if len(u.inputs) > 1 else np.asarray(u.attrs.get("pads", []))
    if pads is None:
        return f"{where}: its pads are not constant"
    if len(u.inputs) > 2 and u.inputs[2].name and _constant_input(u, 2) is None:
        return f"{where}: its fill value is not constant"
    if len(u.inputs) > 3 and u.inputs[3].name:
        axes = _constant_input(u, 3)
        if axes is None:
            return f"{where}: its axes are not constant"
        axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    else:
        axes = list(range(rank))
    pads = np.asarray(pads, dtype=np.int64).reshape(-1)
    if pads.size != 2 * len(axes):
        return f"{where}: {pads.size} pads for {len(axes)} axes"
    channel = 1 if chain.channel_first else rank - 1
    for i, a in enumerate(axes):
        if a == channel and (pads[i] or pads[len(axes) + i]):
            return f"{where} pads the channels"
    return None


def _flatten(u: gs.Node, t: gs.Tensor, chain: ChannelChain, rank: int | None) -> int | str:
    where = f"{u.op} '{u.name}'"
    shape_in, shape_out = static_shape(t), static_shape(u.outputs[0])
    if not chain.channel_first or shape_in is None or len(shape_in) < 3:
        return f"{where} does not flatten a channel-first map"
    if any(d is None for d in shape_in[1:]):
        return f"{where}: spatial size unknown (give --input-shape)"
    spatial = int(np.prod(shape_in[2:]))
    if u.op == "Flatten" and int(u.attrs.get("axis", 1)) != 1:
        return f"{where} with axis {u.attrs.get('axis')} (only axis 1)"
    if u.op == "Reshape":
        target = _constant_input(u, 1)
        if target is None or shape_out is None or len(shape_out) != 2 or \
                shape_out[1] != chain.channels * spatial:
            return f"{where} is not a flatten to (N, C·H·W)"
        if len(u.inputs[1].outputs) > 1:
            return f"{where}: its shape constant is shared"
    return spatial


def _diamond(t: gs.Tensor, users: list[gs.Node], chain: ChannelChain, rank: int | None,
             graph: gs.Graph) -> list[gs.Node] | None:
    """Branches of per-channel element-wise ops from ``t`` that meet again in one binary node
    (SiLU is ``x · sigmoid(x)``): their nodes in order, the meeting node last; else None."""
    nodes: list[gs.Node] = []
    ends: list[gs.Tensor] = []
    merge = None
    for u in users:
        cur_t, cur = t, u
        while True:
            data = [x for x in cur.inputs if x.name and constant_value(x) is None]
            if cur.op in BINARY and len(data) == 2 and not cur.domain:
                if merge is not None and merge is not cur:
                    return None
                merge = cur
                ends.append(cur_t)
                break
            if cur.op not in UNARY and cur.op not in BINARY or \
                    _pass_through(cur, cur_t, chain, rank) is not None:
                return None
            nodes.append(cur)
            out = cur.outputs[0]
            if is_graph_output(graph, out) or len(out.outputs) != 1:
                return None
            cur_t, cur = out, out.outputs[0]
    if merge is None or len(ends) != 2 or {id(x) for x in merge.inputs if x.name and
                                           constant_value(x) is None} != {id(e) for e in ends}:
        return None
    return nodes + [merge]


def chain_into(consumer: gs.Node, graph: gs.Graph) -> ChannelChain | str:
    """The chain whose consumer is ``consumer``: walk up through non-layer ops to the one layer
    whose output it reads (several layers, or a graph input: no chain)."""
    producers: list[gs.Node] = []
    joins: list[gs.Node] = []
    stack, seen = [consumer.inputs[0]], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if not t.inputs:
            if constant_value(t) is None:
                return "its input is a graph input, not the output of a layer that can lose channels"
            continue
        node = t.inputs[0]
        if node.op in CANDIDATE_OPS and not node.domain:
            if all(p is not node for p in producers):
                producers.append(node)
            continue
        data = [x for x in node.inputs if x.name and constant_value(x) is None]
        if len(data) > 1:
            joins.append(node)
        if len(seen) > 256:
            return "no layer found within 256 tensors above its input"
        stack.extend(data)
    if len(producers) != 1:
        j = next(iter(joins), None)
        if j is not None and j.op in ("Add", "Sum"):
            return (f"its input comes from a residual {j.op} '{j.name}': both branches would need "
                    f"the same channels removed")
        if j is not None:
            return f"its input comes from {j.op} '{j.name}', which joins several tensors"
        return "no single layer produces its input"
    node = producers[0]
    chain = trace_chain(node, graph)
    if isinstance(chain, str):
        return chain
    if chain.consumer is not consumer:
        return f"'{node.name}' feeds '{chain.consumer.name}', not this layer"
    return chain


# --- weights in a common orientation --------------------------------------------------------------

def producer_rows(chain: ChannelChain) -> np.ndarray:
    """(C, …) the producer's weight, one row per output channel."""
    p = chain.producer
    w = constant_value(p.inputs[1])
    if p.op == "Conv":
        return w.reshape(w.shape[0], -1)
    if p.op == "Gemm":
        return w if int(p.attrs.get("transB", 0)) else w.T
    return w.T


def consumer_weight(chain: ChannelChain) -> np.ndarray:
    """(N, C, K) float64: the consumer's weight as applied, ``y = Σ_c W[:, c] x_c``."""
    c = chain.consumer
    w = np.asarray(constant_value(c.inputs[1]), np.float64)
    if c.op == "Conv":
        return w.reshape(w.shape[0], chain.channels, -1)
    if c.op == "Gemm":
        w = (w if int(c.attrs.get("transB", 0)) else w.T) * float(c.attrs.get("alpha", 1.0))
    else:
        w = w.T
    return w.reshape(w.shape[0], chain.channels, chain.group)


def rewrite(chain: ChannelChain, kept: np.ndarray, weight: np.ndarray, bias_delta: np.ndarray | None,
            graph: gs.Graph, names: NameScope) -> None:
    """Keep channels ``kept`` along the chain; the consumer gets ``weight`` (N, len(kept), K)."""
    kept = np.asarray(kept, dtype=int)
    k = len(kept)
    p = chain.producer
    w = constant_value(p.inputs[1])
    if p.op == "Conv" or p.op == "Gemm" and int(p.attrs.get("transB", 0)):
        new_w = w[kept]
    else:
        new_w = w[:, kept]
    _set_const(p, 1, new_w, names, "pruned")
    bias = _constant_input(p, 2) if p.op != "MatMul" else None
    if bias is not None and bias.size > 1:
        _set_const(p, 2, np.take(bias, kept, axis=-1), names, "pruned")
    for node, i, axis in chain.slices:
        value = _constant_input(node, i)
        _set_const(node, i, np.take(value, kept, axis=axis), names, "pruned")
    flat_from = None if chain.flatten is None else chain.nodes.index(chain.flatten) + 1
    for j, t in enumerate(chain.tensors):
        if t.shape is not None:
            shape = list(t.shape)
            first = chain.channel_first if chain.flip is None or j >= chain.flip else \
                not chain.channel_first
            if flat_from is not None and j >= flat_from:
                shape[1] = k * chain.group
            else:
                shape[1 if first else -1] = k
            t.shape = shape
    if chain.flatten is not None and chain.flatten.op == "Reshape":
        target = _constant_input(chain.flatten, 1).copy()
        target[target == chain.channels * chain.group] = k * chain.group
        _set_const(chain.flatten, 1, target, names, "pruned")
    _set_consumer(chain, weight, bias_delta, graph, names)


def _set_const(node: gs.Node, i: int, value: np.ndarray, names: NameScope, tag: str) -> None:
    old = node.inputs[i]
    node.inputs[i] = gs.Constant(names(f"{old.name}/{tag}"), np.ascontiguousarray(value))


def fold_into_following_add(y: gs.Variable, delta: np.ndarray, names: NameScope) -> bool:
    """Add ``delta`` (N,) to the constant of the one ``Add(y, c)`` that reads ``y`` when the
    sum keeps c's shape; False (nothing changed) otherwise."""
    if len(y.outputs) != 1 or y.outputs[0].op != "Add" or len(y.outputs[0].inputs) != 2:
        return False
    add = y.outputs[0]
    i = 1 if add.inputs[0] is y else 0
    if add.inputs[1 - i] is not y:
        return False
    current = _constant_input(add, i)
    if current is None or current.dtype.kind != "f":
        return False
    summed = np.asarray(current, np.float64) + np.asarray(delta, np.float64)
    if summed.shape != current.shape:  # e.g. a scalar bias: the delta would widen it
        return False
    _set_const(add, i, summed.astype(current.dtype), names, "pruned")
    return True


def _set_consumer(chain: ChannelChain, weight: np.ndarray, bias_delta, graph, names) -> None:
    c = chain.consumer
    old = constant_value(c.inputs[1])
    n = weight.shape[0]
    if c.op == "Conv":
        new = weight.reshape((n, weight.shape[1]) + old.shape[2:])
    else:
        flat = weight.reshape(n, -1)
        if c.op == "Gemm":
            flat = flat / float(c.attrs.get("alpha", 1.0))
            new = flat if int(c.attrs.get("transB", 0)) else flat.T
        else:
            new = flat.T
    _set_const(c, 1, new.astype(old.dtype), names, "pruned")
    if bias_delta is None or not np.any(bias_delta):
        return
    if c.op in ("Conv", "Gemm"):
        scale = float(c.attrs.get("beta", 1.0)) if c.op == "Gemm" else 1.0
        current = _constant_input(c, 2)
        value = bias_delta / scale if current is None else \
            np.asarray(current, np.float64) + bias_delta / scale   # broadcasts (N,), (1, N), ()
        value = value.astype(old.dtype)
        const = gs.Constant(names(f"{c.name}/pruned_bias"), value)
        if len(c.inputs) > 2:
            c.inputs[2] = const
        else:
            c.inputs.append(const)
        return
    # a MatMul has no bias input: fold the delta into the constant Add that exports put after
    # one (its own bias), else add one after it (one more node costs ~1-2 µs in ORT, which is
    # what a small MLP's whole layer costs)
    y = c.outputs[0]
    if fold_into_following_add(y, bias_delta, names):
        return
    mid = gs.Variable(names(f"{c.name}/pruned_out"), dtype=y.dtype, shape=y.shape)
    c.outputs[0] = mid
    graph.nodes.append(gs.Node("Add", name=names(f"{c.name}/pruned_bias"),
                               inputs=[mid, gs.Constant(names(f"{c.name}/pruned_bias_value"),
                                                        bias_delta.astype(old.dtype))],
                               outputs=[y]))


__all__ = ["BINARY", "CANDIDATE_OPS", "ChannelChain", "LINEAR", "PER_CHANNEL_PARAMS", "POOLS",
           "UNARY", "chain_into", "consumer_weight", "fold_into_following_add", "producer_rows",
           "rewrite", "trace_chain"]
