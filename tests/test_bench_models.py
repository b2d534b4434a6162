"""Tests for bench.models: the synthetic models are valid ONNX and run in ONNX Runtime."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bench import models
from onnxlr import runtime as rt


def _check_and_run(model: onnx.ModelProto, batch: int, classes: int) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == models.OPSET
    (inp,) = model.graph.input
    assert inp.name == "input"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]][0] == 3
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    out = rt.run(rt.make_session(model), rt.make_inputs(model, batch=batch))["output"]
    assert out.shape == (batch, classes) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and out.std() > 0
    return out


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_small_cnn():
    model = models.small_cnn(classes=10)
    _check_and_run(model, batch=3, classes=10)
    assert _ops(model) == Counter(Conv=3, Relu=4, MaxPool=3, Flatten=1, Gemm=2)
    assert _weight(model, "fc1.weight").shape == (256, 128 * 4 * 4)
    # same seed, same weights; another seed, other weights
    assert np.array_equal(_weight(model, "conv2.weight"), _weight(models.small_cnn(), "conv2.weight"))
    other = models.small_cnn(seed=1)
    assert not np.array_equal(_weight(model, "conv2.weight"), _weight(other, "conv2.weight"))


def test_small_cnn_fixed_batch():
    model = models.small_cnn(batch=2, image=16, classes=5)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    out = rt.run(rt.make_session(model), rt.make_inputs(model))["output"]
    assert out.shape == (2, 5)


def test_resnet50_small_image():
    model = models.resnet50(image=64, classes=100)
    _check_and_run(model, batch=2, classes=100)
    ops = _ops(model)
    assert ops["Conv"] == 1 + 3 * 16 + 4 and ops["BatchNormalization"] == ops["Conv"]
    assert ops["Add"] == 16 and ops["GlobalAveragePool"] == 1 and ops["Gemm"] == 1
    names = {n.name for n in model.graph.node}
    assert {"conv1", "layer2.0.conv2", "layer4.2.conv3", "layer3.0.downsample.0", "fc"} <= names
    assert "layer1.1.downsample.0" not in names
    conv2 = next(n for n in model.graph.node if n.name == "layer2.0.conv2")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv2.attribute}
    assert attrs["strides"] == [2, 2] and attrs["kernel_shape"] == [3, 3]  # stride on the 3x3
    assert _weight(model, "fc.weight").shape == (100, 2048)


def test_vgg16_small_image():
    model = models.vgg16(image=32, classes=10)
    _check_and_run(model, batch=1, classes=10)
    ops = _ops(model)
    assert ops == Counter(Conv=13, Relu=15, MaxPool=5, Flatten=1, Gemm=3)
    assert _weight(model, "fc6.weight").shape == (4096, 512)  # 512 * (32 / 32) ** 2
    assert _weight(model, "fc7.weight").shape == (4096, 4096)
    assert _weight(model, "conv5_3.weight").shape == (512, 512, 3, 3)


def test_vgg16_batchnorm_and_image_size():
    model = models.vgg16(image=64, batchnorm=True, classes=10)
    onnx.checker.check_model(model)
    assert _ops(model)["BatchNormalization"] == 13
    assert [n.name for n in model.graph.node][:3] == ["conv1_1", "bn1_1", "relu1_1"]
    assert _weight(model, "fc6.weight").shape == (4096, 512 * 2 * 2)  # classifier follows the image size


def test_bad_image_size():
    with pytest.raises(ValueError, match="multiple of 32"):
        models.vgg16(image=48)
    assert set(models.BUILDERS) == {"vgg16", "resnet50", "small_cnn"}
