"""Pass machinery: a pass changes the graph in place and says what it did.

Modelled on onnx-ir's ``PassBase``/``PassResult``: a pass is callable and
returns a :class:`PassResult` whose ``modified`` flag lets a
:class:`PassManager` repeat a sequence until nothing changes, and whose
``records`` carry per-layer facts for the report.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxlr.records import LayerRecord

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    modified: bool
    records: list[LayerRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Pass(abc.ABC):
    """One graph transformation with a single idea."""

    name: str = ""

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = self.call(graph)
        if result.modified:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        logger.debug("pass %s: modified=%s", self.name, result.modified)
        return result

    @abc.abstractmethod
    def call(self, graph: gs.Graph) -> PassResult:
        """Transform ``graph`` in place."""


class PassManager:
    """Run passes in order, repeating the sequence until none modifies the graph."""

    def __init__(self, passes: list[Pass], max_steps: int = 1):
        self.passes = passes
        self.max_steps = max_steps

    def __call__(self, graph: gs.Graph) -> list[PassResult]:
        results: list[PassResult] = []
        for _ in range(self.max_steps):
            step = [p(graph) for p in self.passes]
            results.extend(step)
            if not any(r.modified for r in step):
                break
        return results
