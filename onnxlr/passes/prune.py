"""Channel pruning (He et al., ICCV 2017, arXiv 1707.06168) and the channel chains it acts on.

A *channel chain* is a producer layer (Conv, Gemm, MatMul with a constant
weight), the nodes that act on each channel alone (BatchNormalization, Relu,
Clip, LeakyRelu, pools, a Pad that pads no channels, a Transpose between
channel-first and channel-last, arithmetic with a per-channel constant, …) and one
consumer layer (Conv, or Gemm/MatMul, possibly after a Flatten/Reshape: then each channel
is a block of H·W consumer columns). Removing channel c removes
the producer's output c (weight row, bias, the chain's per-channel constants)
and the consumer's input c. :func:`trace_chain` finds a chain or says why there
is none: a residual Add or a Concat (the other branch would need the same
channels removed), a grouped consumer, a tensor that is a graph output or feeds
two nodes, an op not known to act per channel.

:class:`ChannelPass` runs one unit per chain in graph order: choose the channels
to keep, compute the consumer's new weights, rewrite. :class:`PrunePass` is He et
al.'s recipe: the unit is the *consumer* (``--rank 0.5`` keeps half its input
channels), channels by LASSO on its sampled input, weights by least squares
(:mod:`onnxlr.linalg.channel_select`). Following the paper, each unit sees the
input of the model pruned so far and aims at the original model's output of the
layer ("sequential"), so errors do not pile up. Data comes from
:func:`onnxlr.calib.capture` with a reducer that keeps only second moments.

Without calibration data channel pruning declines every layer with that reason:
fitting on random inputs would be fitting noise, and fitting on the verification
inputs would make the reported error in-sample. (Data-free channel removal is
``--method thin``, :mod:`onnxlr.passes.thin`.)

Counts in the records: a unit changes two layers. Each record's "after" is its
own layer's real cost; a layer changed only by a neighbour's unit (the first
conv, whose outputs its consumer's unit pruned) keeps before = after = its new
cost, and the work it saved is added to the "before" of the unit that did it,
so report totals are exact and no record goes negative.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.errors import OnnxlrError
from onnxlr.graph import NameScope, constant_value, is_graph_output, static_shape
from onnxlr.linalg.channel_select import PatchStats, norm_select, refit, select_channels
from onnxlr.passes.base import Pass, PassResult
from onnxlr.rank import FixedRank, RankSelector, RatioRank, round_rank
from onnxlr.records import FACTORISED, LayerRecord
from onnxlr.sites import find_site

logger = logging.getLogger(__name__)

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
#: default number of calibration rows (positions) each unit's least squares sees
MAX_ROWS = 8192
#: consumer inputs (C·K values per row) above this are declined: the statistics are F×F
#: float64 (F = 8192: 0.5 GB); above half of it a unit fits on the original model's input
#: alone, not beside the pruned model's (that Gram is 2F × 2F)
MAX_FEATURES = 8192


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
    if isinstance(site, str):
        return site
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
    if isinstance(site, str):
        return f"{where} cannot be rewritten: {site}"
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
    # a MatMul has no bias input: add one after it
    y = c.outputs[0]
    mid = gs.Variable(names(f"{c.name}/pruned_out"), dtype=y.dtype, shape=y.shape)
    c.outputs[0] = mid
    graph.nodes.append(gs.Node("Add", name=names(f"{c.name}/pruned_bias"),
                               inputs=[mid, gs.Constant(names(f"{c.name}/pruned_bias_value"),
                                                        bias_delta.astype(old.dtype))],
                               outputs=[y]))


# --- calibration rows ------------------------------------------------------------------------------

class _StatsReducer:
    """A :func:`onnxlr.calib.capture` reducer: each batch of a consumer's input becomes rows
    (:func:`onnxlr.activations.site_rows`: conv patches at seeded positions), accumulated into
    :class:`PatchStats`. ``pairs`` maps the pruned model's tensor to the original's, captured in
    the same run; both are sampled with the same seed, so their rows are the same positions."""

    def __init__(self, sites: dict, channels: int, group: int, per_sample: int, seed: int,
                 pairs: dict[str, str] | None = None):
        self.sites, self.per_sample, self.seed = sites, per_sample, seed
        self.pairs = pairs or {}
        self.originals = set(self.pairs.values())
        self.held: dict[str, np.ndarray] = {}
        self.batches: dict[str, int] = {}
        self.stats = {name: PatchStats(channels, group) for name in sites}

    def _rows(self, name: str, x: np.ndarray, batch: int) -> np.ndarray:
        from onnxlr.activations import site_rows
        return site_rows(self.sites[name], x, max_positions=self.per_sample,
                         rng=np.random.default_rng([self.seed, batch]))

    def __call__(self, name: str, x: np.ndarray) -> None:
        if name in self.originals:
            self.held[name] = x
            return
        b = self.batches[name] = self.batches.get(name, -1) + 1
        orig = self.held.pop(self.pairs[name]) if name in self.pairs else None
        self.stats[name].add(self._rows(name, x, b),
                             None if orig is None else self._rows(name, orig, b))


# --- the pass -----------------------------------------------------------------------------------

def kept_count(selector: RankSelector, channels: int, multiple: int = 1) -> int | str:
    """Channels to keep under a rank rule: a fraction of C or a count; other rules decline."""
    if isinstance(selector, (FixedRank, RatioRank)):
        k = int(selector.select(np.ones(channels), channels, channels))
        return round_rank(max(k, 1), multiple, channels)
    return (f"rank rule '{selector.spec}' gives no channel count: use a fraction "
            f"(--rank 0.5 keeps half the channels) or a count (--rank 32)")


@dataclass
class _Unit:
    record: LayerRecord
    chain: ChannelChain
    keep: int


class ChannelPass(Pass):
    """Remove channels between layers, one unit per channel chain (see the module docstring).

    Args:
        config: a :class:`~onnxlr.passes.factorize.FactorizeConfig` (rank rule, per-layer rules,
            include/exclude, ``rank_scale`` = keep more channels, ``forced_ranks`` = exact counts).
        keep: unit names to leave alone, with the reason.
        cache: shared across runs: calibration statistics by unit and upstream state.
        progress: called with (index, total, name) before each candidate.
        calibration: a :class:`onnxlr.calib.Calibration` or anything ``load_calibration`` reads.
        select: ``lasso`` (He et al.), ``somp`` (Lu et al.) or ``l1`` (Li et al., data-free).
        reconstruct: ``ls`` (least squares on calibration data), ``slice`` (drop the consumer's
            columns; exact compensation when nothing non-linear lies between the layers).
        unit: ``consumer`` (the rank rule applies to a layer's inputs) or ``producer`` (to its
            outputs).
        sequential: fit each unit on the input of the model pruned so far (He et al.).
        max_rows: calibration rows per unit.
        target_macs: keep one fraction of channels everywhere, chosen so that the candidate
            layers' MACs are at most this fraction of the original (overrides the rank rule).
    """

    name = "channels"
    method = "channels"

    def __init__(self, config, keep: dict[str, str] | None = None, cache: dict | None = None,
                 progress: Callable | None = None, *, calibration: Any = None,
                 select: str = "lasso", reconstruct: str = "ls", unit: str = "consumer",
                 sequential: bool = True, max_rows: int = MAX_ROWS, seed: int = 0,
                 provider: str = "cpu", target_macs: float | None = None):
        if select not in ("lasso", "somp", "l1") or reconstruct not in ("ls", "slice") or \
                unit not in ("consumer", "producer"):
            raise ValueError(f"bad channel pass options {select}/{reconstruct}/{unit}")
        if target_macs is not None and not 0 < target_macs <= 1:
            raise OnnxlrError(f"invalid MAC target {target_macs}: must be in (0, 1]")
        self.config, self.keep = config, keep or {}
        self.cache = cache if cache is not None else {}
        self.progress, self.calibration = progress, calibration
        self.select, self.reconstruct, self.unit = select, reconstruct, unit
        self.sequential, self.max_rows, self.seed, self.provider = sequential, max_rows, seed, provider
        self.target_macs = target_macs
        self.needs_data = select == "lasso" or reconstruct == "ls"

    # -- bookkeeping -----------------------------------------------------------------------------

    def call(self, graph: gs.Graph) -> PassResult:
        graph.toposort()
        names = NameScope(graph)
        candidates = [n for n in list(graph.nodes) if n.op in CANDIDATE_OPS and not n.domain]
        before = {n.name: _cost(n) for n in candidates}
        original = gs.export_onnx(graph.copy(), do_type_check=False) if self.needs_data else None
        units: dict[str, _Unit] = {}
        records = [self._plan(graph, n, before, units) for n in candidates]
        counts = self._counts(graph, units)
        changed_by: dict[str, str] = {}
        applied: list[tuple[str, tuple[int, ...]]] = []
        for i, record in enumerate(records):
            if self.progress:
                self.progress(i, len(records), record.name)
            unit = units.get(record.name)
            if unit is None:
                continue
            unit.keep = counts.get(record.name, unit.keep)
            self._apply(graph, unit, original, applied, names)
            if unit.record.status == FACTORISED:
                other = unit.chain.producer if self.unit == "consumer" else unit.chain.consumer
                changed_by.setdefault(other.name, record.name)
        self._account(candidates, records, before, changed_by)
        return PassResult(any(r.status == FACTORISED for r in records), records)

    def _plan(self, graph: gs.Graph, node: gs.Node, before: dict, units: dict) -> LayerRecord:
        record = LayerRecord(name=node.name, op=node.op)
        site = find_site(node, graph)
        if isinstance(site, str):
            record.reason = site
            return record
        record.kind, record.weight_shape = site.kind, tuple(int(d) for d in site.weight.shape)
        record.params_before = record.params_after = site.params
        record.macs_before = record.macs_after = site.macs
        why = self.config.selected(node.name) or self.keep.get(node.name)
        if why:
            record.reason = why
            return record
        if self.needs_data and self.calibration is None:
            record.reason = (f"{self.method} needs calibration data (--calib): it fits the layer "
                             f"to real activations")
            return record
        chain = chain_into(node, graph) if self.unit == "consumer" else trace_chain(node, graph)
        if isinstance(chain, str):
            record.reason = chain
            return record
        selector = self.config.rank_for(node.name)
        record.method, record.rank_rule = self.method, selector.spec
        keep = kept_count(selector, chain.channels, self.config.rank_multiple)
        if node.name in getattr(self.config, "forced_ranks", {}):
            keep = int(self.config.forced_ranks[node.name][0])
            record.rank_rule = f"searched ({selector.spec})"
        if isinstance(keep, str) and self.target_macs is None:
            record.reason = keep
            return record
        units[node.name] = _Unit(record, chain, keep if isinstance(keep, int) else chain.channels)
        return record

    def _counts(self, graph: gs.Graph, units: dict[str, _Unit]) -> dict[str, int]:
        """Kept channels per unit: the rule (or a MAC target), grown by ``rank_scale``."""
        counts = {name: u.keep for name, u in units.items()}
        if self.target_macs is not None and units:
            fraction = _fraction_for_target(graph, units, self.target_macs)
            counts = {name: max(1, math.ceil(fraction * u.chain.channels - 1e-9))
                      for name, u in units.items()}
            for name, u in units.items():
                u.record.rank_rule = f"MAC target {self.target_macs:g} (keep {fraction:.3f})"
        for name, scale in self.config.rank_scale.items():
            if name in counts:
                c = units[name].chain.channels
                counts[name] = min(c, max(1, math.ceil(counts[name] * scale)))
                units[name].record.extra["rank_scale"] = scale
        return counts

    def _apply(self, graph, unit: _Unit, original, applied: list, names: NameScope) -> None:
        record, keep = unit.record, unit.keep
        chain = (chain_into(unit.chain.consumer, graph) if self.unit == "consumer"
                 else trace_chain(unit.chain.producer, graph))
        if isinstance(chain, str):  # an earlier unit changed the graph around this one
            record.reason = chain
            return
        record.ranks = (keep,)
        extra = record.extra
        extra.update(channels=chain.channels, producer=chain.producer.name,
                     consumer=chain.consumer.name, chain=chain.describe())
        if keep >= chain.channels:
            record.reason = f"keeping all {chain.channels} channels saves nothing"
            return
        t0 = time.perf_counter()
        weight = consumer_weight(chain)
        delta, error = None, None
        if self.needs_data:
            features = chain.channels * chain.group
            if features > MAX_FEATURES:
                record.reason = (f"its input has {features} values per position (C·K), over the "
                                 f"limit of {MAX_FEATURES} for the F×F calibration statistics")
                return
            try:
                stats = self._stats(graph, chain, original, applied,
                                    sequential=2 * features <= MAX_FEATURES)
            except OnnxlrError as exc:
                record.reason = f"calibration capture failed: {exc}"
                return
            extra["rows"] = stats.count
            if 2 * features > MAX_FEATURES:
                extra["fit_input"] = "the original model's (too large to capture beside the pruned)"
            if stats.count < keep * chain.group:
                extra["underdetermined"] = (
                    f"{stats.count} calibration rows for {keep * chain.group} weights per "
                    f"output: the fit may not generalise; give more calibration samples")
        if self.select == "lasso":
            sel = select_channels(stats, weight, keep)
            kept, new_w, delta, error = sel.kept, sel.weight, sel.bias_delta, sel.error
            extra["notes"] = sel.notes
        else:
            kept = self._kept(chain, keep, extra)
            if self.reconstruct == "ls":
                new_w, delta, error = refit(stats, weight, kept)
            else:
                new_w, delta = self._slice(chain, weight, kept, extra)
                error = extra.get("somp_error")
        extra["removed"] = [int(c) for c in np.setdiff1d(np.arange(chain.channels), kept)]
        extra["error_kind"] = ("relative L2 error of the layer's output on calibration data"
                               if self.reconstruct == "ls" else "SOMP: ‖W − A·W_kept‖/‖W‖ of the "
                               "producer" if self.select == "somp" else "not measured (data-free)")
        rewrite(chain, kept, new_w, delta, graph, names)
        applied.append((record.name, tuple(int(c) for c in kept)))
        record.status, record.weight_error = FACTORISED, error
        record.seconds = time.perf_counter() - t0
        logger.info("%s: %s keeps %d of %d channels (%s), error %s", record.name, self.method, keep,
                    chain.channels, chain.describe(), error)

    def _kept(self, chain: ChannelChain, keep: int, extra: dict) -> np.ndarray:
        rows = producer_rows(chain)
        if self.select == "l1":
            return norm_select(rows, keep, 1)
        from onnxlr.linalg.somp import somp
        result = somp(rows, keep)
        extra["somp_error"] = result.error
        extra["_somp_coef"] = result.coef
        return result.selected

    def _slice(self, chain: ChannelChain, weight: np.ndarray, kept: np.ndarray, extra: dict):
        """Drop the consumer's columns; through a linear chain, add back what the dropped
        channels carried (they are A·kept + d by SOMP's coefficients)."""
        coef = extra.pop("_somp_coef", None)
        new_w = weight[:, kept]
        if coef is None or not chain.linear:
            return new_w, None
        dropped = np.setdiff1d(np.arange(chain.channels), kept)
        a = coef[dropped]                                       # (dropped, kept)
        new_w = new_w + np.einsum("ndk,ds->nsk", weight[:, dropped], a)
        bias = _constant_input(chain.producer, 2) if chain.producer.op != "MatMul" else None
        if bias is None or bias.size == 1:
            return new_w, None
        b = np.asarray(bias, np.float64).reshape(-1)
        offset = b[dropped] - a @ b[kept]                      # what A·kept misses
        if chain.consumer.op == "Conv" and any(chain.consumer.attrs.get("pads", [0])):
            extra["notes"] = "bias compensation is exact away from the zero-padded border"
        extra["compensation"] = "linear (data-free, exact without padding)"
        return new_w, np.einsum("ndk,d->n", weight[:, dropped], offset)

    def _stats(self, graph: gs.Graph, chain: ChannelChain, original, applied: list, *,
               sequential: bool = True) -> PatchStats:
        """Moments of the consumer's input rows: the original model's when nothing upstream
        changed (or not sequential), else the pruned model's beside the original's."""
        from onnxlr.calib import capture, load_calibration  # lazy: imports onnxruntime

        calib = self.cache.get(("calibration", id(self.calibration)))
        if calib is None:
            calib = self.cache[("calibration", id(self.calibration))] = load_calibration(
                self.calibration, original)
        tensor = chain.tensors[-1].name
        site = find_site(chain.consumer)
        per_sample = max(1, math.ceil(self.max_rows / max(calib.num_samples, 1)))
        upstream = _ancestors(chain.tensors[-1])
        state = tuple(a for a in applied if a[0] in upstream)
        if state and not (self.sequential and sequential):
            state = ()
        key = ("stats", self.seed, self.max_rows, tensor, state)
        if key in self.cache:
            return self.cache[key]
        if not state:
            reducer = _StatsReducer({tensor: site}, chain.channels, chain.group, per_sample,
                                    self.seed)
            capture(original, calib, [tensor], provider=self.provider, reducer=reducer)
            stats = reducer.stats[tensor]
        else:
            model, pair = _side_by_side(original, graph, tensor)
            reducer = _StatsReducer({pair[1]: site}, chain.channels, chain.group, per_sample,
                                    self.seed, {pair[1]: pair[0]})
            capture(model, calib, list(pair), provider=self.provider, reducer=reducer)
            stats = reducer.stats[pair[1]]
        self.cache[key] = stats
        return stats

    def _account(self, candidates, records, before, changed_by) -> None:
        """Real after-costs per layer; a neighbour's change goes to the unit that made it."""
        by_name = {r.name: r for r in records}
        for node in candidates:
            rec = by_name[node.name]
            params, macs = _cost(node)
            rec.extra.pop("_somp_coef", None)
            if rec.status == FACTORISED:
                rec.params_after, rec.macs_after = params, macs
            elif (params, macs) != before[node.name]:
                driver = by_name[changed_by[node.name]]
                driver.params_before += before[node.name][0] - params
                driver.macs_before += before[node.name][1] - macs
                driver.extra.setdefault("neighbour_saving", {})[node.name] = {
                    "params": before[node.name][0] - params, "macs": before[node.name][1] - macs}
                rec.params_before = rec.params_after = params
                rec.macs_before = rec.macs_after = macs
                rec.extra["changed_by"] = driver.name


def _cost(node: gs.Node) -> tuple[int, int]:
    site = find_site(node)
    return (0, 0) if isinstance(site, str) else (site.params, site.macs)


def _ancestors(tensor: gs.Tensor) -> set[str]:
    """Names of the nodes that ``tensor`` depends on."""
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        for node in t.inputs:
            if node.name not in seen:
                seen.add(node.name)
                stack.extend(x for x in node.inputs if isinstance(x, gs.Variable))
    return seen


PREFIX = "onnxlr_pruned::"


def _side_by_side(original, graph: gs.Graph, tensor: str):
    """One model computing ``tensor`` in the original and in the pruned graph from the same
    inputs, so that one calibration run gives both at the same positions."""
    orig = gs.import_onnx(original)
    cur = graph.copy()
    inputs = {t.name: t for t in orig.inputs}
    cur_inputs = {id(t) for t in cur.inputs}
    tensors = cur.tensors()
    wanted = [orig.tensors()[tensor], tensors[tensor]]
    for t in tensors.values():
        if id(t) not in cur_inputs:
            t.name = PREFIX + t.name
    for node in cur.nodes:
        node.name = PREFIX + node.name
        for i, x in enumerate(node.inputs):
            if id(x) in cur_inputs:
                node.inputs[i] = inputs[x.name]
    both = gs.Graph(nodes=orig.nodes + cur.nodes, inputs=orig.inputs, outputs=wanted,
                    opset=orig.opset, import_domains=orig.import_domains)
    both.cleanup(remove_unused_graph_inputs=False).toposort()
    return gs.export_onnx(both, do_type_check=False), (tensor, PREFIX + tensor)


def _fraction_for_target(graph: gs.Graph, units: dict[str, _Unit], target: float) -> float:
    """The one keep-fraction f (bisection) whose channel counts bring the candidate layers'
    MACs to ``target`` × the original: a layer's MACs scale with kept inputs × kept outputs."""
    layers = {n.name: _cost(n)[1] for n in graph.nodes if n.op in CANDIDATE_OPS}
    total = sum(layers.values())

    def macs(f: float) -> float:
        scale = dict.fromkeys(layers, 1.0)
        for u in units.values():
            r = max(1, math.ceil(f * u.chain.channels - 1e-9)) / u.chain.channels
            scale[u.chain.producer.name] *= r
            scale[u.chain.consumer.name] *= r
        return sum(layers[n] * scale[n] for n in layers)

    if macs(1e-9) > target * total:
        return 1e-9
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid) <= target * total else (lo, mid)
    return lo


class PrunePass(ChannelPass):
    """He et al.'s channel pruning: the rank rule sets each layer's kept *input* channels,
    chosen by LASSO on calibration data, the layer refit by least squares."""

    name = "prune"
    method = "prune"

    def __init__(self, config, keep=None, cache=None, progress=None, *, calibration=None, **kw):
        kw.setdefault("select", "lasso")
        kw.setdefault("reconstruct", "ls")
        kw.setdefault("unit", "consumer")
        super().__init__(config, keep, cache, progress, calibration=calibration, **kw)


__all__ = ["ChannelChain", "ChannelPass", "PrunePass", "chain_into", "consumer_weight",
           "kept_count", "producer_rows", "rewrite", "trace_chain"]
