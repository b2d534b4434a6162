"""The graph's structure, each problem named: a cycle, a dangling input, a missing weight.

The checker's messages for broken graphs are not one line and not specific (a cycle, a
dangling input and a missing initializer all read "Nodes in a graph must be topologically
sorted, however input 'x' of node: …"). :func:`graph_problem` names the node and the
tensor for each case, subgraphs and their outer-scope names included.
"""
from __future__ import annotations

from typing import Iterator

import onnx

from onnxlr.validate.tensors import quote

#: Ops whose inputs after the first are weights: an undefined one there is a missing initializer.
_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
                         "LayerNormalization", "InstanceNormalization", "LSTM", "GRU", "RNN"})


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return quote(node.name) if node.name else f"#{index} ({node.op_type})"


def _implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scopes (ONNX outer-scope references)."""
    outer: set[str] = set()
    for g in _subgraphs(node):
        inner = _defined(g)
        for n in g.node:
            outer.update(i for i in n.input if i and i not in inner)
            outer.update(i for i in _implicit_inputs(n) if i not in inner)
        outer.update(o.name for o in g.output if o.name not in inner)
    return outer


def _dangling(graph: onnx.GraphProto, scope: set[str], path: str) -> str | None:
    here = scope | _defined(graph)
    for i, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            if name and name not in here:
                where = f" in {path}" if path else ""
                if node.op_type in _WEIGHT_OPS and slot > 0:
                    return (f"node {_node_label(node, i)} ({node.op_type}){where} reads weight "
                            f"{quote(name)}, but the model has no initializer or input of that "
                            f"name (missing initializer)")
                return (f"node {_node_label(node, i)} ({node.op_type}){where} reads "
                        f"{quote(name)}, which no node, graph input or initializer provides "
                        f"(dangling input)")
        for g in _subgraphs(node):
            problem = _dangling(g, here, f"a subgraph of node {_node_label(node, i)}")
            if problem:
                return problem
    for out in graph.output:
        if out.name not in here:
            return (f"graph output {quote(out.name)} is not produced by any node, input or "
                    f"initializer")
    return None


def _order(graph: onnx.GraphProto) -> tuple[list[int] | None, list[int]]:
    """(a topological order of the node indices, or None when there is a cycle; a cycle)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    deps = []
    for node in graph.node:
        names = set(node.input) | _implicit_inputs(node)
        deps.append(sorted({producer[n] for n in names if n in producer}))
    state = [0] * len(graph.node)  # 0 new, 1 on the stack, 2 done
    order: list[int] = []
    for root in range(len(graph.node)):
        if state[root]:
            continue
        stack = [(root, iter(deps[root]))]
        state[root] = 1
        while stack:  # iterative DFS: a hostile graph may be deeper than Python's recursion limit
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                order.append(node)
                stack.pop()
            elif state[nxt] == 1:
                path = [s[0] for s in stack]
                return None, path[path.index(nxt):] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(deps[nxt])))
    return order, []


def graph_problem(model: onnx.ModelProto, *, allow_unsorted: bool = False) -> str | None:
    """The first structural problem of the main graph (and its subgraphs), or None.

    Checks, each with its own message: inputs nothing provides (a dangling
    input, or a missing initializer when a layer's weight is absent), graph
    outputs nothing produces, cycles, and (unless ``allow_unsorted``) nodes
    out of topological order.
    """
    problem = _dangling(model.graph, set(), "")
    if problem:
        return problem
    graphs = [("", model.graph)]
    while graphs:
        path, graph = graphs.pop()
        order, cycle = _order(graph)
        where = f" in {path}" if path else ""
        if order is None:
            names = " -> ".join(_node_label(graph.node[i], i) for i in cycle)
            return f"the graph{where} has a cycle: {names}"
        if not allow_unsorted and order != sorted(order):
            first = next(k for k, i in enumerate(order) if i != k)
            late = graph.node[order[first]]
            return (f"nodes{where} are not in topological order (node "
                    f"{_node_label(late, order[first])} must come before node "
                    f"{_node_label(graph.node[first], first)})")
        for i, node in enumerate(graph.node):
            where = f"a subgraph of node {_node_label(node, i)}"
            graphs.extend((where, g) for g in _subgraphs(node))
    return None


def sort_nodes(graph: onnx.GraphProto) -> bool:
    """Put an acyclic graph's nodes in topological order (stable); True if anything moved."""
    order, _ = _order(graph)
    if order is None or order == sorted(order):
        return False
    nodes = [onnx.NodeProto() for _ in order]
    for new, old in zip(nodes, order):
        new.CopyFrom(graph.node[old])
    del graph.node[:]
    graph.node.extend(nodes)
    return True
