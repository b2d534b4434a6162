"""Synthetic benchmark models built from scratch with ``onnx.helper``.

onnxlr's benchmarks and tests need realistic graphs (VGG-16, ResNet-50) without
downloading weights from a model zoo. These builders produce the same
topologies with seeded random weights (He-uniform initialisation, so activations stay
finite through the depth), opset 17, checker-clean, with readable node names
(``conv1_1``, ``layer2.0.conv2``, ``fc6``) because onnxlr reports per node.
Random weights have flat singular spectra, so they measure speed and graph
plumbing, not how well trained weights compress.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

__all__ = ["BUILDERS", "resnet50", "small_cnn", "vgg16"]

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; keeps older ORT builds happy

_VGG16_CFG = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
_RESNET50_STAGES = [(64, 3), (128, 4), (256, 6), (512, 3)]  # (bottleneck width, blocks)


class _Builder:
    """Collects nodes and initializers; a node's output tensor is named after the node
    (the last one writes the graph output ``output``)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def _init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def _he(self, shape: tuple[int, ...], fan_in: int, gain: float = 2.0) -> np.ndarray:
        """He-uniform weights: variance ``gain / fan_in`` (uniform is ~2x faster to draw than normal)."""
        w = self.rng.random(shape, dtype=np.float32)
        bound = np.float32(np.sqrt(3.0 * gain / fan_in))
        w *= 2 * bound
        w -= bound
        return w

    def node(self, op: str, name: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out or name], name=name, **attrs))
        return out or name

    def conv(self, name: str, x: str, cin: int, cout: int, k: int, stride: int = 1,
             bias: bool = True) -> str:
        inputs = [x, self._init(f"{name}.weight", self._he((cout, cin, k, k), cin * k * k))]
        if bias:
            inputs.append(self._init(f"{name}.bias", 0.01 * self.rng.standard_normal(cout)))
        return self.node("Conv", name, inputs, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[k // 2] * 4)

    def bn(self, name: str, x: str, c: int, scale: tuple[float, float] = (0.5, 1.5)) -> str:
        rng = self.rng
        params = [rng.uniform(*scale, c), 0.1 * rng.standard_normal(c),  # gamma, beta
                  0.1 * rng.standard_normal(c), rng.uniform(0.5, 1.5, c)]  # running mean, var
        keys = ("weight", "bias", "running_mean", "running_var")
        names = [self._init(f"{name}.{k}", a) for k, a in zip(keys, params)]
        return self.node("BatchNormalization", name, [x, *names], epsilon=1e-5)

    def gemm(self, name: str, x: str, fin: int, fout: int, gain: float = 2.0,
             out: str | None = None) -> str:
        w = self._init(f"{name}.weight", self._he((fout, fin), fin, gain))
        b = self._init(f"{name}.bias", 0.01 * self.rng.standard_normal(fout))
        return self.node("Gemm", name, [x, w, b], out=out, transB=1)

    def model(self, name: str, batch: int | str, image: int, classes: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, image, image])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, classes])],
            self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="onnxlr-bench")
        model.ir_version = IR_VERSION
        return model


def _check_image(image: int, multiple: int, who: str) -> None:
    if image < multiple or image % multiple:
        raise ValueError(f"{who}: image size must be a positive multiple of {multiple}, got {image}")


def vgg16(batch: int | str = "N", image: int = 224, batchnorm: bool = False, seed: int = 0,
          classes: int = 1000) -> onnx.ModelProto:
    """VGG-16 (configuration D): 13 conv3x3 + 3 fully connected layers.

    At ``image=224`` this has ~138 M parameters (~528 MB of float32
    initializers, under the 2 GB protobuf limit). fc6 takes
    ``512 * (image // 32) ** 2`` features.

    Args:
        batch: batch dim: a name (symbolic) or a fixed int.
        image: input height and width; a multiple of 32.
        batchnorm: put BatchNormalization after each conv (VGG-16-BN).
        seed: weight seed.
        classes: outputs of fc8.

    Returns:
        Model with input ``input`` [batch, 3, image, image] and output ``output`` [batch, classes].
    """
    _check_image(image, 32, "vgg16")
    b = _Builder(seed)
    x, cin = "input", 3
    for stage, widths in enumerate(_VGG16_CFG, start=1):
        for i, cout in enumerate(widths, start=1):
            x = b.conv(f"conv{stage}_{i}", x, cin, cout, 3)
            if batchnorm:
                x = b.bn(f"bn{stage}_{i}", x, cout)
            x = b.node("Relu", f"relu{stage}_{i}", [x])
            cin = cout
        x = b.node("MaxPool", f"pool{stage}", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Flatten", "flatten", [x], axis=1)
    x = b.node("Relu", "relu6", [b.gemm("fc6", x, 512 * (image // 32) ** 2, 4096)])
    x = b.node("Relu", "relu7", [b.gemm("fc7", x, 4096, 4096)])
    b.gemm("fc8", x, 4096, classes, gain=1.0, out="output")
    return b.model("vgg16_bn" if batchnorm else "vgg16", batch, image, classes)


def resnet50(batch: int | str = "N", image: int = 224, seed: int = 0,
             classes: int = 1000) -> onnx.ModelProto:
    """ResNet-50 (v1.5: the stride sits on the 3x3 conv of each bottleneck).

    Names follow torchvision: ``conv1``, ``bn1``, ``layer3.2.conv2``,
    ``layer2.0.downsample.0`` (projection conv), ``fc``. The last BatchNorm of
    each residual branch gets a small gamma (0.2-0.4) so the residual sum does
    not double the activation variance at every block.

    Args:
        batch: batch dim: a name (symbolic) or a fixed int.
        image: input height and width; a multiple of 32.
        seed: weight seed.
        classes: outputs of fc.

    Returns:
        Model with input ``input`` [batch, 3, image, image] and output ``output`` [batch, classes].
    """
    _check_image(image, 32, "resnet50")
    b = _Builder(seed)
    x = b.node("Relu", "relu", [b.bn("bn1", b.conv("conv1", "input", 3, 64, 7, 2, bias=False), 64)])
    x = b.node("MaxPool", "maxpool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (width, blocks) in enumerate(_RESNET50_STAGES, start=1):
        cout = 4 * width
        for blk in range(blocks):
            p = f"layer{stage}.{blk}"
            stride = 2 if blk == 0 and stage > 1 else 1
            y = b.conv(f"{p}.conv1", x, cin, width, 1, bias=False)
            y = b.node("Relu", f"{p}.relu1", [b.bn(f"{p}.bn1", y, width)])
            y = b.conv(f"{p}.conv2", y, width, width, 3, stride, bias=False)
            y = b.node("Relu", f"{p}.relu2", [b.bn(f"{p}.bn2", y, width)])
            y = b.conv(f"{p}.conv3", y, width, cout, 1, bias=False)
            y = b.bn(f"{p}.bn3", y, cout, scale=(0.2, 0.4))
            shortcut = x
            if blk == 0:
                shortcut = b.bn(f"{p}.downsample.1",
                                b.conv(f"{p}.downsample.0", x, cin, cout, 1, stride, bias=False), cout)
            x = b.node("Relu", f"{p}.relu3", [b.node("Add", f"{p}.add", [y, shortcut])])
            cin = cout
    x = b.node("Flatten", "flatten", [b.node("GlobalAveragePool", "avgpool", [x])], axis=1)
    b.gemm("fc", x, 2048, classes, gain=1.0, out="output")
    return b.model("resnet50", batch, image, classes)


def small_cnn(batch: int | str = "N", image: int = 32, seed: int = 0, classes: int = 10,
              widths: tuple[int, int, int] = (32, 64, 128), hidden: int = 256) -> onnx.ModelProto:
    """A tiny VGG-like net for fast tests: 3x (conv3x3 + Relu + MaxPool 2x2), fc1 + Relu, fc2.

    Nodes: ``conv1..conv3``, ``relu1..relu3``, ``pool1..pool3``, ``flatten``,
    ``fc1``, ``relu4``, ``fc2``. fc1 takes ``widths[2] * (image // 8) ** 2`` features.

    Args:
        batch: batch dim: a name (symbolic) or a fixed int.
        image: input height and width; a multiple of 8.
        seed: weight seed.
        classes: outputs of fc2.
        widths: output channels of the three convs.
        hidden: outputs of fc1.

    Returns:
        Model with input ``input`` [batch, 3, image, image] and output ``output`` [batch, classes].
    """
    _check_image(image, 8, "small_cnn")
    b = _Builder(seed)
    x, cin = "input", 3
    for i, cout in enumerate(widths, start=1):
        x = b.node("Relu", f"relu{i}", [b.conv(f"conv{i}", x, cin, cout, 3)])
        x = b.node("MaxPool", f"pool{i}", [x], kernel_shape=[2, 2], strides=[2, 2])
        cin = cout
    x = b.node("Flatten", "flatten", [x], axis=1)
    x = b.node("Relu", "relu4", [b.gemm("fc1", x, widths[2] * (image // 8) ** 2, hidden)])
    b.gemm("fc2", x, hidden, classes, gain=1.0, out="output")
    return b.model("small_cnn", batch, image, classes)


#: Builder by name, for benchmark scripts and ``--model`` style options.
BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "vgg16": vgg16, "resnet50": resnet50, "small_cnn": small_cnn}
