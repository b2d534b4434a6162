#!/usr/bin/env python3
"""Train the bundled example model ``examples/digits_cnn.onnx``.

A small VGG-style CNN trained on scikit-learn's handwritten digits data
(1797 grayscale 8x8 images, 10 classes; the data ships inside the
scikit-learn wheel, so no network access is needed).

Preprocessing (done here, once; the stored test split is already preprocessed):
    pixel values 0..16  ->  divide by 16  ->  bilinear upsample 8x8 -> 16x16
    giving float32 tensors of shape [N, 1, 16, 16].

Architecture (input [N,1,16,16] -> logits [N,10]):
    conv1  Conv3x3   1 ->  32, BN, ReLU        16x16
    conv2  Conv3x3  32 ->  64, BN, ReLU        16x16
           MaxPool 2x2                         8x8
    conv3  Conv3x3  64 ->  64, BN, ReLU        8x8
    conv4  Conv3x3  64 -> 128, BN, ReLU        8x8
           MaxPool 2x2                         4x4
    conv5  Conv1x1 128 -> 128, BN, ReLU        4x4
           MaxPool 2x2                         2x2
           Flatten                             512
    fc1    Gemm    512 -> 256, ReLU  (dropout in training only)
    fc2    Gemm    256 ->  10

Outputs (written to --out, default ``examples/``):
    digits_cnn.onnx   opset 17, input ``input`` [N,1,16,16] float32 (dynamic N),
                      output ``logits`` [N,10]. BatchNormalization nodes are kept
                      (not folded into the convolutions).
    digits_test.npz   held-out test split: ``input`` float32 [450,1,16,16],
                      ``label`` int64 [450].

Usage (CPU only; 20 epochs take one to a few minutes on 2 cores, depending on
machine load; not run by CI):
    python -m venv /tmp/venv-train
    /tmp/venv-train/bin/pip install torch==2.13.0 numpy scikit-learn onnx onnxruntime
    /tmp/venv-train/bin/python tools/train_digits_cnn.py --out examples/
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

IMAGE_SIZE = 16
OPSET = 17


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(size: int = IMAGE_SIZE):
    """Return (x_train, y_train, x_test, y_test), images as float32 [N,1,size,size]."""
    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # [1797, 8, 8], values in [0, 1]
    y = digits.target.astype(np.int64)
    x = torch.from_numpy(x)[:, None]  # [N, 1, 8, 8]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.numpy().astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=450, random_state=0, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 32, 3),     # conv1
            conv_bn_relu(32, 64, 3),    # conv2
            nn.MaxPool2d(2),            # 16 -> 8
            conv_bn_relu(64, 64, 3),    # conv3
            conv_bn_relu(64, 128, 3),   # conv4
            nn.MaxPool2d(2),            # 8 -> 4
            conv_bn_relu(128, 128, 1),  # conv5 (1x1)
            nn.MaxPool2d(2),            # 4 -> 2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),               # 128 * 2 * 2 = 512
            nn.Linear(512, 256),        # fc1
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, num_classes),  # fc2
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def augment(x: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero padded)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2))
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def train(model, x_tr, y_tr, epochs: int, batch_size: int, lr: float) -> None:
    x_tr_t = torch.from_numpy(x_tr)
    y_tr_t = torch.from_numpy(y_tr)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_tr) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            xb, yb = augment(x_tr_t[idx]), y_tr_t[idx]
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == 0:
            print(f"epoch {epoch + 1:3d}  loss {total / len(x_tr):.4f}")


def export_onnx(model: nn.Module, path: str) -> None:
    """Export with opset 17, dynamic batch, BatchNormalization kept unfolded.

    The TorchScript-based exporter is used: with ``training=PRESERVE`` on a
    model in eval mode it emits inference-mode BatchNormalization nodes
    instead of fusing them into the preceding Conv.
    """
    model.eval()
    dummy = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    torch.onnx.export(
        model,
        (dummy,),
        path,
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )


def layer_report(model_path: str) -> None:
    """Print op-type counts and per-layer parameter / FLOP estimates (1 image)."""
    m = onnx.load(model_path)
    inits = {t.name: t for t in m.graph.initializer}
    counts = collections.Counter(n.op_type for n in m.graph.node)
    print("op types:", dict(sorted(counts.items())))
    m = onnx.shape_inference.infer_shapes(m)
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in list(m.graph.value_info) + list(m.graph.output)
    }
    print(f"{'node':<44}{'op':<6}{'weight':<18}{'params':>9}{'MFLOPs':>9}")
    tot_p = tot_f = 0
    for n in m.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        w = inits[n.input[1]]
        params = int(np.prod(w.dims)) + sum(
            int(np.prod(inits[i].dims)) for i in n.input[2:] if i in inits
        )
        macs = int(np.prod(w.dims))
        if n.op_type == "Conv":
            out = shapes[n.output[0]]
            macs *= out[2] * out[3]
        flops = 2 * macs
        tot_p += params
        tot_f += flops
        print(f"{n.name:<44}{n.op_type:<6}{str(list(w.dims)):<18}{params:>9}{flops / 1e6:>9.2f}")
    print(f"{'total (Conv+Gemm)':<68}{tot_p:>9}{tot_f / 1e6:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="examples", help="output directory")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    set_seeds(args.seed)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    x_tr, y_tr, x_te, y_te = load_data()
    print(f"train {x_tr.shape}  test {x_te.shape}")

    model = DigitsCNN()
    t0 = time.time()
    train(model, x_tr, y_tr, args.epochs, args.batch_size, args.lr)
    print(f"trained in {time.time() - t0:.0f}s")
    acc_pt = evaluate(model, x_te, y_te)
    print(f"PyTorch test accuracy: {acc_pt:.4f}")

    onnx_path = os.path.join(args.out, "digits_cnn.onnx")
    npz_path = os.path.join(args.out, "digits_test.npz")
    export_onnx(model, onnx_path)
    np.savez_compressed(npz_path, input=x_te.astype(np.float32), label=y_te.astype(np.int64))

    # --- verify the exported model ---------------------------------------
    onnx.checker.check_model(onnx.load(onnx_path), full_check=True)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    logits_ort = sess.run(["logits"], {"input": x_te})[0]
    with torch.no_grad():
        logits_pt = model(torch.from_numpy(x_te)).numpy()
    acc_ort = float((logits_ort.argmax(1) == y_te).mean())
    print(f"ONNX Runtime test accuracy: {acc_ort:.4f}")
    print(f"max |PyTorch - ORT| logits: {np.abs(logits_pt - logits_ort).max():.3e}")
    layer_report(onnx_path)
    for p in (onnx_path, npz_path):
        print(f"{p}: {os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
