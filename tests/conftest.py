"""Model builders shared by the tests: single layers and small graphs from onnx.helper."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET, extra_opsets=(), **kw):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, **kw)
    model.ir_version = 8
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for o in model.graph.output:
            if not o.type.tensor_type.HasField("shape") and known.get(o.name) is not None:
                o.CopyFrom(known[o.name])
    onnx.checker.check_model(model)
    return model


def vinfo(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def conv_model(w, b=None, x_shape=(1, 4, 9, 9), **attrs):
    """One Conv layer with a constant weight (and bias)."""
    inputs = ["x", "W"] + (["B"] if b is not None else [])
    inits = [init("W", w)] + ([init("B", b)] if b is not None else [])
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    return make_model([node], [vinfo("x", list(x_shape))], [vinfo("y", None)], inits)


def gemm_model(b, c=None, a_shape=(5, 6), **attrs):
    inputs = ["a", "B"] + (["C"] if c is not None else [])
    inits = [init("B", b)] + ([init("C", c)] if c is not None else [])
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", **attrs)
    return make_model([node], [vinfo("a", list(a_shape))], [vinfo("y", None)], inits)


def matmul_model(w, x_shape, bias=None):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h" if bias is not None else "y"], name="proj")]
    inits = [init("W", w)]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["h", "bias"], ["y"], name="proj_bias"))
        inits.append(init("bias", bias))
    return make_model(nodes, [vinfo("x", list(x_shape))], [vinfo("y", None)], inits)


def ort_run(model, feeds):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def tiny_cnn(seed: int = 0, batch="N"):
    """Conv3x3+BN+Relu → Conv3x3 s2 → Conv1x1 → GAP → Gemm (weight from a Constant node)
    → MatMul + Add; a second output through an ``ai.onnx.ml`` Normalizer; doc strings and
    metadata set, so the pipeline's preservation can be checked."""
    r = np.random.default_rng(seed)

    def he(*shape):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return (r.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    c1, c2 = 16, 32
    inits = [
        init("w1", he(c1, 3, 3, 3)), init("b1", np.zeros(c1, np.float32)),
        init("bn_g", (1 + 0.1 * r.standard_normal(c1)).astype(np.float32)),
        init("bn_b", (0.1 * r.standard_normal(c1)).astype(np.float32)),
        init("bn_m", (0.1 * r.standard_normal(c1)).astype(np.float32)),
        init("bn_v", (1 + 0.1 * r.random(c1)).astype(np.float32)),
        init("w2", he(c2, c1, 3, 3)), init("w3", he(c2, c2, 1, 1)),
        init("b3", (0.1 * r.standard_normal(c2)).astype(np.float32)),
        init("fc1_b", np.zeros(24, np.float32)),
        init("w_out", he(24, 10)), init("b_out", np.zeros(10, np.float32)),
        init("flat_shape", np.array([0, -1], np.int64)),
    ]
    fc1_w = numpy_helper.from_array(he(24, c2), "fc1_w_value")
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_g", "bn_b", "bn_m", "bn_v"], ["n1"],
                         name="bn1", epsilon=1e-5),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
        helper.make_node("Reshape", ["g", "flat_shape"], ["f"], name="flatten"),
        helper.make_node("Constant", [], ["fc1_w"], name="fc1_w_const", value=fc1_w),
        helper.make_node("Gemm", ["f", "fc1_w", "fc1_b"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu4"),
        helper.make_node("MatMul", ["hr", "w_out"], ["mm"], name="fc2"),
        helper.make_node("Add", ["mm", "b_out"], ["logits"], name="fc2_bias"),
        helper.make_node("Normalizer", ["logits"], ["normalized"], name="norm",
                         domain="ai.onnx.ml", norm="L2"),
    ]
    model = make_model(nodes, [vinfo("input", [batch, 3, 8, 8])],
                       [vinfo("logits", [batch, 10]), vinfo("normalized", [batch, 10])], inits,
                       extra_opsets=[("ai.onnx.ml", 3)], doc_string="tiny test model",
                       producer_name="onnxlr-tests")
    model.graph.doc_string = "graph doc"
    model.metadata_props.add(key="author", value="tests")
    return model
