"""Prepare a model for every later step: constants as initializers, constant transposes
folded, BatchNorm folded, nodes named uniquely. Nothing is factorised here; ``inspect`` and ``optimize`` both start from it.
"""
from __future__ import annotations

import onnx

from onnxlr.graph import to_graph, to_model
from onnxlr.passes.base import PassManager
from onnxlr.passes.constants import ConstantsToInitializers, FoldConstantTranspose
from onnxlr.passes.fold_bn import FoldBatchNorm


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant weights → initializers, transposes of constant weights folded, BatchNorm
    folded into Convs, every node named uniquely; nothing factorised."""
    graph = to_graph(model)
    name_nodes(graph)
    PassManager([ConstantsToInitializers(), FoldConstantTranspose(), FoldBatchNorm()],
                max_steps=2)(graph)
    return to_model(graph, model)


def name_nodes(graph) -> int:
    """Give every unnamed node a name (``<op>_<index>``) and every repeated name a suffix.

    Node names are optional in ONNX and need not be unique, but every piece of per-layer
    state (the factor cache, records, ``--include``/``--layer-rank``, ladders, reports) is
    keyed by the layer's name: two layers sharing one name would share factors. Naming
    them here, once, before anything is keyed, makes a layer's identity unique. Returns
    how many nodes were (re)named.
    """
    used = {n.name for n in graph.nodes if n.name}
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(graph.nodes):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op}_{i}"
        name, k = base, 1
        while name in used or name in seen:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)
        used.add(name)
        renamed += 1
    return renamed
