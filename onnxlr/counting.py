"""MACs counted on the shapes the model really ran at, per sample.

Layer sites count MACs from the graph's inferred shapes; where a dim is symbolic (a batch
or sequence axis left dynamic by the export) it counts as 1 and the count is *per position*:
a 1-D conv net over 1,000 frames was reported at 22.2M MACs instead of ~1.4G per sample.
Once the model has been run on real feeds their shapes are known: the original and the
result are re-inferred with the graph inputs fixed to those shapes, every layer is counted
again, and the records that were per position get per-sample counts (the batch divided out)
with a note saying so. A layer replaced by several nodes (``<layer>/svd/...``) is the sum of
its nodes.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

logger = logging.getLogger(__name__)

PER_POSITION = "shapes unknown: MACs counted per position"
PER_SAMPLE = "MACs per sample, counted on the shapes of the inputs it ran on"


def _fixed(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto | None:
    """The model's shapes inferred with the inputs at ``shapes``, on a copy without the
    weights' bytes (inference needs only their dims: no second copy of them, and no
    serialisation of a model over 2 GB)."""
    from onnxlr.graph import _SHAPE_DATA_BYTES
    from onnxlr.validate import light_copy

    probe, _ = light_copy(model, keep_below=_SHAPE_DATA_BYTES)
    for vi in probe.graph.input:
        if vi.name not in shapes or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(shapes[vi.name]):
            continue
        for d, n in zip(dims, shapes[vi.name]):
            d.ClearField("dim_param")
            d.dim_value = int(n)
    del probe.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(probe)
    except Exception as exc:  # noqa: BLE001 (custom ops, inconsistent exports: keep the count)
        logger.debug("MAC recount: shape inference failed: %s", exc)
        return None


def layer_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, int] | None:
    """{node name: MACs} of every layer node, with the inputs at ``shapes``; None when the
    shapes cannot be inferred."""
    from onnxlr.graph import apply_shapes, to_graph
    from onnxlr.records import Declined
    from onnxlr.sites import LAYER_OPS, find_site

    fixed = _fixed(model, shapes)
    if fixed is None:
        return None
    graph = to_graph(model)
    apply_shapes(graph, fixed, replace=True)
    out = {}
    for node in graph.nodes:
        if node.op not in LAYER_OPS + ("ConvTranspose",):
            continue
        site = find_site(node, graph)
        if not isinstance(site, Declined) and site.shapes_known:
            out[node.name] = int(site.macs)
    return out


def recount(original: onnx.ModelProto, result: onnx.ModelProto, records,
            feeds: dict[str, np.ndarray]) -> int:
    """Per-sample MACs for the records counted per position; returns how many changed."""
    from onnxlr.sites import MATRIX_KINDS
    todo = [r for r in records if r.extra.get("macs_note") == PER_POSITION]
    if not todo or any("changed_by" in r.extra or "neighbour_saving" in r.extra for r in records):
        return 0  # channel pruning's neighbour accounting stays in one unit
    shapes = {k: tuple(np.asarray(v).shape) for k, v in feeds.items()}
    batch = {s[0] for s in shapes.values() if s}
    batch = batch.pop() if len(batch) == 1 else 1
    before, after = layer_macs(original, shapes), layer_macs(result, shapes)
    if before is None or after is None:
        return 0
    changed = 0
    for rec in todo:
        if rec.name not in before:
            continue
        parts = [m for name, m in after.items() if name == rec.name or
                 name.startswith(rec.name + "/")]
        # a conv's count leaves the batch out already; a matrix product's counts every row
        scale = batch if rec.kind in MATRIX_KINDS else 1
        rec.macs_before = int(round(before[rec.name] / scale))
        rec.macs_after = int(round(sum(parts) / scale)) if parts else rec.macs_before
        if not rec.changed and not parts:
            rec.macs_after = rec.macs_before
        rec.extra["macs_note"] = PER_SAMPLE
        changed += 1
    return changed
