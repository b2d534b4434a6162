"""Every candidate of every layer side by side in one graph, picked by gate inputs.

For a layer ``y = L(x)`` with candidates ``C_1..C_k`` the gated graph computes
``y = If(g_0, L(x), If(g_1, C_1(x), … C_k(x)))`` where the ``g`` are entries of one extra
graph input (``onnxlr_gates``, float32 [G]). Setting one gate per layer to 1 and the others
to 0 makes the graph compute exactly that assignment, so one ONNX Runtime session scores
any combination of candidates: no trial rebuilds the graph, re-infers shapes or opens a
session (the cost the old back-off paid for every step, PITFALLS 14). Only the taken
branch of an ``If`` runs, so a gated run costs about one run of that assignment (a first
version summed every candidate times its gate: on a CRNN with 133 candidates each check
took ~10x a run of the model).

The candidates are built by the same methods, from the same cached factors, as the model
that is finally written, so what the search scores is what the user gets.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxlr import runtime
from onnxlr.errors import OnnxlrError
from onnxlr.graph import NameScope, to_graph, to_model
from onnxlr.records import Declined
from onnxlr.sites import find_site

logger = logging.getLogger(__name__)

GATES = "onnxlr_gates"


@dataclass(frozen=True)
class Option:
    """One way to replace one layer: a method at some ranks."""

    method: str
    ranks: tuple[int, ...]


class GatedModel:
    """The gated graph and a session that runs it under any assignment.

    Args:
        prepared: the prepared model (BN folded, constants as initializers).
        options: {layer name: [Option, ...]} for the layers the search may change.
        factors: ``factors(method_name, site, ranks) -> Factors`` (the shared factor cache).
        methods: ``methods(name) -> Method`` instance.
    """

    def __init__(self, prepared: onnx.ModelProto, options: dict[str, list[Option]], factors,
                 methods, *, provider: str = "cpu", threads: int | None = None):
        self.options = {k: list(v) for k, v in options.items() if v}
        self.gate_of: dict[tuple[str, int], int] = {}
        graph = to_graph(prepared)
        names = NameScope(graph)
        gates = gs.Variable(GATES, dtype=np.float32, shape=[0])  # shape fixed below
        count = 0
        for node in list(graph.nodes):
            opts = self.options.get(node.name)
            if not opts:
                continue
            site = find_site(node, graph)
            if isinstance(site, Declined):
                raise OnnxlrError(f"layer {node.name!r} cannot be gated: {site}")
            y = node.outputs[0]
            original = gs.Variable(names(f"{y.name}/original"), dtype=y.dtype)
            node.outputs.clear()
            node.outputs.append(original)
            graph.nodes.remove(node)
            branches = [self._branch(graph, [node], original, f"{node.name}/original")]
            first = count
            self.gate_of[(node.name, -1)] = count
            count += 1
            for j, opt in enumerate(opts):
                out = gs.Variable(names(f"{y.name}/option{j}"), dtype=y.dtype)
                clone = gs.Node(node.op, names(f"{node.name}/option{j}"), dict(node.attrs),
                                list(node.inputs), [out], domain=node.domain)
                branch = self._branch(graph, [clone], out, f"{node.name}/option{j}")
                methods(opt.method).build(branch, dataclasses.replace(site, node=clone),
                                          factors(opt.method, site, opt.ranks), names)
                branch.toposort()
                branches.append(branch)
                self.gate_of[(node.name, j)] = count
                count += 1
            self._select(graph, names, gates, branches, first, y, node.name)
        gates.shape = [count]
        graph.inputs.append(gates)
        self.count = count
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        self.model = to_model(graph, prepared)
        from onnxlr.verify import session  # lazy: imports onnxruntime
        self.session = session(self.model, provider)
        self.output_names = [o.name for o in prepared.graph.output]
        self.runs = 0

    @staticmethod
    def _branch(graph: gs.Graph, nodes: list[gs.Node], out: gs.Variable, name: str) -> gs.Graph:
        """A subgraph computing ``out`` (inputs come from the enclosing scope)."""
        return gs.Graph(nodes=nodes, outputs=[out], opset=graph.opset,
                        import_domains=graph.import_domains, name=name)

    @staticmethod
    def _select(graph: gs.Graph, names: NameScope, gates: gs.Variable, branches: list[gs.Graph],
                first: int, y: gs.Variable, layer: str) -> None:
        """``y`` = the branch whose gate is set: nested ``If`` nodes, the last branch the
        innermost fallback. Only the taken branch runs."""
        current = branches[-1]
        for i in range(len(branches) - 2, -1, -1):
            idx = gs.Constant(names(f"{layer}/gate_index"), np.array(first + i, dtype=np.int64))
            g = gs.Variable(names(f"{layer}/gate{first + i}"), dtype=np.float32)
            cond = gs.Variable(names(f"{layer}/gate{first + i}/on"), dtype=np.bool_)
            graph.nodes.append(gs.Node("Gather", names(f"{layer}/gate{first + i}/pick"),
                                       {"axis": 0}, [gates, idx], [g]))
            graph.nodes.append(gs.Node("Cast", names(f"{layer}/gate{first + i}/cast"),
                                       {"to": onnx.TensorProto.BOOL}, [g], [cond]))
            out = y if i == 0 else gs.Variable(names(f"{y.name}/pick{i}"), dtype=y.dtype)
            pick = gs.Node("If", names(f"{layer}/pick{i}"),
                           {"then_branch": branches[i], "else_branch": current}, [cond], [out])
            if i == 0:
                graph.nodes.append(pick)
            else:
                current = gs.Graph(nodes=[pick], outputs=[out], opset=graph.opset,
                                   import_domains=graph.import_domains, name=f"{layer}/pick{i}")

    def gates(self, assignment: dict[str, int]) -> np.ndarray:
        """The gate vector for {layer: option index} (-1 or absent: the original layer)."""
        vec = np.zeros(self.count, dtype=np.float32)
        for layer in self.options:
            j = assignment.get(layer, -1)
            vec[self.gate_of[(layer, j)]] = 1.0
        return vec

    def run(self, assignment: dict[str, int], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs += 1
        out = runtime.run(self.session, {**feeds, GATES: self.gates(assignment)})
        return {k: out[k] for k in self.output_names}
