"""Sequential (asymmetric) reconstruction: refit each replaced layer's last stage on the
inputs the already-compressed prefix produces, against the original model's outputs.

Each layer's factors were fitted to the *original* model's activations; in the compressed
model a layer sees activations that earlier replacements have already moved, and errors
compound through depth. Zhang et al. (TPAMI 2016, "asymmetric reconstruction") and He et al.
(2017) refit layer by layer in topological order instead: for a chain whose last stage is a
linear map of its hidden ``z`` (Gemm/MatMul SVD: the second product; Tucker-2 and channel SVD
of a conv: the output 1×1 conv), the last stage and its bias are re-solved by least squares so
that ``B·z̃ + c ≈ y``, where ``z̃`` is the hidden computed in the compressed model (every
earlier layer already refitted) and ``y`` is the original layer's output in the original
model. The statistics are channel-level (k × k and k × T per layer, never patch-sized), the
positions of a conv are all used, and each layer costs one run of each model on the fitting
samples. Layers whose chain ends in its k×k core (Tucker with an unfactorised output mode)
are left as they are.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlr import runtime

logger = logging.getLogger(__name__)

#: The last stage of each method's chain (node-name suffixes the methods emit).
LAST_STAGES = ("/svd/gemm_out", "/svd/matmul_out", "/svd/conv_out", "/tucker/conv_out")
#: Ridge on the hidden's second moment, relative to its mean diagonal (numerical safety).
RIDGE = 1e-6


@dataclass
class Refitted:
    layer: str
    before: float   # relative output error of the layer in the compressed model, before
    after: float    # ... and after the refit (on the fitting samples)


def _rows(a: np.ndarray, kind: str) -> np.ndarray:
    """(N, C, *sp) → (N·P, C) for convs; (..., C) → (rows, C) for matrix products."""
    a = np.asarray(a, dtype=np.float64)
    if kind == "conv":
        return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])
    return a.reshape(-1, a.shape[-1])


def _stage(model: onnx.ModelProto, layer: str, pruned: bool = False) -> onnx.NodeProto | None:
    """The node whose weight the refit re-solves: a chain's last stage, or a pruned layer
    itself when it is a matrix product or a 1×1 conv (a k×k conv's rows are patches)."""
    if pruned:
        node = next((n for n in model.graph.node if n.name == layer), None)
        if node is None or node.op_type not in ("Gemm", "MatMul", "Conv"):
            return None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            return None
        if node.op_type == "Conv":
            w = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
            if w is None or any(d != 1 for d in w.dims[2:]) or attrs.get("group", 1) != 1 or \
                    any(attrs.get("pads", [0])) or any(s != 1 for s in attrs.get("strides", [1])):
                return None
        return node
    names = {f"{layer}{suffix}" for suffix in LAST_STAGES}
    return next((n for n in model.graph.node if n.name in names), None)


def _session(model: onnx.ModelProto, tensors: list[str], provider: str):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in have:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    from onnxlr.verify import session
    return session(probe, provider)


def refit_sequentially(original: onnx.ModelProto, model: onnx.ModelProto, layers: list[str],
                       batches: list[dict], *, provider: str = "cpu", progress=None,
                       pruned: set[str] | frozenset = frozenset()
                       ) -> tuple[onnx.ModelProto, list[Refitted]]:
    """A copy of ``model`` with every listed layer's last stage refitted, in graph order.

    Args:
        original: the prepared original model (its layer outputs are the targets).
        model: the compressed model built from it (same layer names).
        layers: the replaced layers to refit (others are skipped).
        batches: fitting feeds (never the samples the result is judged on).
        pruned: the layers that lost input channels (their own weight is refit).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    order = {n.name: i for i, n in enumerate(out.graph.node)}
    known = {o for n in original.graph.node for o in n.output}
    stages = {lay: _stage(out, lay, lay in pruned) for lay in layers}
    # the target is the original layer's output, by name: a stage must write that tensor
    stages = {lay: st for lay, st in stages.items() if st is not None and st.output[0] in known}
    todo = sorted(stages, key=lambda lay: order[stages[lay].name])
    done: list[Refitted] = []
    if not todo:
        return out, done
    t0 = time.perf_counter()
    # one session of the original serves every layer's target (the model itself never changes)
    ref_session = _session(original, [stages[lay].output[0] for lay in todo], provider)
    for i, layer in enumerate(todo):
        if progress:
            progress(i, len(todo), f"refit {layer}")
        node = stages[layer]
        kind = "conv" if node.op_type == "Conv" else "matrix"
        hidden, target = node.input[0], node.output[0]
        weight = inits.get(node.input[1])
        if weight is None:
            continue
        cur_session = _session(out, [hidden, target], provider)
        k = None
        for feeds in batches:
            y = _rows(runtime.run(ref_session, feeds)[target], kind)
            got = runtime.run(cur_session, feeds)
            z, y_now = _rows(got[hidden], kind), _rows(got[target], kind)
            if y_now.shape[1] != y.shape[1]:
                # its consumer pruned this layer's outputs: the original's target no longer
                # lines up column for column (left as fitted)
                k = None
                break
            z1 = np.hstack([z, np.ones((z.shape[0], 1))])
            if k is None:
                k = z.shape[1]
                gram, cross = np.zeros((k + 1, k + 1)), np.zeros((k + 1, y.shape[1]))
                err_num = 0.0
                ysum, ysq, n = np.zeros(y.shape[1]), np.zeros(y.shape[1]), 0
            gram += z1.T @ z1
            cross += z1.T @ y
            err_num += float(np.sum((y - y_now) ** 2))
            ysum += y.sum(0)
            ysq += (y ** 2).sum(0)
            n += y.shape[0]
        if not k or n <= k + 1:
            continue
        err_den = float(np.sum(ysq - ysum ** 2 / n))
        solution = _solve(node, gram, cross)
        if solution is None:
            continue
        b, c = solution
        w_old = numpy_helper.to_array(weight)
        # the refit's own residual on the fitting rows, from the accumulated moments
        coef = np.vstack([b, c[None, :]])
        resid = float(np.sum(ysq) - 2 * np.sum(coef * cross) + np.sum(coef * (gram @ coef)))
        before = np.sqrt(err_num / err_den) if err_den > 0 else 0.0
        after = np.sqrt(max(resid, 0.0) / err_den) if err_den > 0 else 0.0
        if not after < before:  # the refit must help on its own fitting rows
            continue
        _write(node, out, inits, w_old, b, c)
        done.append(Refitted(layer, before, after))
        logger.debug("refit %s: layer output error %.4g → %.4g", layer, before, after)
    logger.info("refit: %d of %d layers re-solved on the compressed prefix in %.1f s",
                len(done), len(todo), time.perf_counter() - t0)
    return out, done


def _solve(node, gram, cross):
    """(B [k, T], c [T]) minimising Σ‖B·z + c − y‖² (+ a tiny ridge), intercept where the
    last stage can carry a bias (Gemm's C, a Conv's bias; a MatMul's comes after it)."""
    k = gram.shape[0] - 1
    ridge = RIDGE * max(np.trace(gram[:k, :k]) / max(k, 1), 1e-12)
    if node.op_type == "MatMul":
        g = gram[:k, :k] + ridge * np.eye(k)
        try:
            b = np.linalg.solve(g, cross[:k])
        except np.linalg.LinAlgError:
            return None
        return b, np.zeros(cross.shape[1])
    g = gram + np.diag([ridge] * k + [0.0])
    try:
        coef = np.linalg.solve(g, cross)
    except np.linalg.LinAlgError:
        return None
    return coef[:k], coef[k]


def _write(node, model, inits, w_old, b, c) -> None:
    """Put B (and c) into the last stage's weight (and bias), in the weight's dtype."""
    dtype = w_old.dtype
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":       # weight [T, k, 1, ...]
        w_new = b.T.reshape(w_old.shape)
    elif node.op_type == "Gemm":     # out = alpha·h·op(W) + beta·C
        alpha = float(attrs.get("alpha", 1.0))
        w_new = (b.T if attrs.get("transB", 0) else b) / alpha
    else:                            # MatMul h·W
        w_new = b
    _replace(model, inits, node, 1, np.asarray(w_new, dtype=dtype))
    if node.op_type == "MatMul":
        return
    beta = float(attrs.get("beta", 1.0)) if node.op_type == "Gemm" else 1.0
    bias_index = 2
    bias = c / (beta if beta else 1.0)
    if len(node.input) > bias_index and node.input[bias_index] in inits:
        old = numpy_helper.to_array(inits[node.input[bias_index]])
        if old.shape == bias.shape:
            _replace(model, inits, node, bias_index, bias.astype(old.dtype))
            return
    name = f"{node.name}/refit_bias"
    t = numpy_helper.from_array(bias.astype(dtype), name)
    model.graph.initializer.append(t)
    inits[name] = model.graph.initializer[-1]
    while len(node.input) < bias_index:
        node.input.append("")
    if len(node.input) > bias_index:
        node.input[bias_index] = name
    else:
        node.input.append(name)
    if node.op_type == "Gemm" and not beta:
        for a in node.attribute:
            if a.name == "beta":
                a.f = 1.0


def _private(model, name: str) -> bool:
    """True when only one node reads the tensor (a shared bias must not change under others)."""
    return sum(name in n.input for n in model.graph.node) == 1


def _replace(model, inits, node, index: int, array: np.ndarray) -> None:
    """Set ``node``'s input ``index`` to ``array``: in place when only this node reads the
    initializer, else as a new initializer of its own (the others keep the old values)."""
    name = node.input[index]
    if _private(model, name):
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
        return
    new = f"{node.name}/refit_{index}"
    model.graph.initializer.append(numpy_helper.from_array(array, new))
    inits[new] = model.graph.initializer[-1]
    node.input[index] = new
