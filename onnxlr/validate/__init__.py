"""Checking an untrusted model before anything reads its weights or walks its graph.

Why this module exists (``onnx.checker`` alone is not enough):
- A tensor's header is a claim: ``dims`` may promise 10¹² elements over 4 kB of
  data. numpy then fails deep inside a reshape, or a loader allocates what the
  header says. :func:`check_tensors` compares every tensor's declared size with
  the bytes it holds.
- With protobuf's upb backend every read of ``raw_data`` copies the bytes, and
  ``ByteSize()`` serialises the whole message: on a model that means a second
  copy of every weight. Here weights are touched one tensor at a time, and
  whole-model work (sizes, shape inference, the checker) runs on a
  :func:`light_copy` that has the structure but not the weights' bytes.
- The checker's messages for broken graphs are not one line and not specific
  (a cycle, a dangling input and a missing initializer all read "Nodes in a
  graph must be topologically sorted, however input 'x' of node: …").
  :func:`graph_problem` names the node and the tensor for each case.
- The checker needs the whole model in one protobuf (< 2 GiB) and insists on a
  ``shape`` for every graph input and output, which exporters do not always
  write. :func:`check_model` runs it on a *probe*: a copy without the weights'
  bytes (checked here instead) and with absent I/O shapes filled in for the
  probe only. The model itself is never changed.

The three jobs are three modules (``tensors``, ``structure``, ``probe``); the names above
are re-exported here, so ``from onnxlr import validate; validate.check_model(...)`` works
as before the split.
"""
from __future__ import annotations

# One job a module: tensors (sizes against headers; quote), structure (graph problems
# named), probe (light copies, the checker on one). Everything public is re-exported here.
from onnxlr.validate.probe import check_model, copy_meta, light_copy, model_bytes
from onnxlr.validate.structure import graph_problem, sort_nodes
from onnxlr.validate.tensors import (all_tensors, check_tensors, declared_bytes,
                                     declared_elements, physical_memory, quote, raw_size,
                                     sparse_problem, sparse_tensors, tensor_problem)

__all__ = ["all_tensors", "check_model", "check_tensors", "copy_meta", "declared_bytes",
           "declared_elements", "graph_problem", "light_copy", "model_bytes",
           "physical_memory", "quote", "raw_size", "sort_nodes", "sparse_problem",
           "sparse_tensors", "tensor_problem"]
