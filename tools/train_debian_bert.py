#!/usr/bin/env python3
"""Train the benchmark suite's transformer: a small BERT-style encoder on Debian package descriptions.

The data, split and tokenizer are in ``bench/real/debian_bert.py`` (this script
only adds PyTorch); the suite calls :func:`train` on first use. Seeded, CPU, one
thread, deterministic algorithms (two builds gave the same accuracy to the last
digit), and kind to the other jobs of a shared machine: 155 s for 20 epochs on the
build machine. Not run by the tests.

AdamW (lr 5e-4, weight decay 0.01, 10% warm-up then linear decay), batch 8 of
texts of similar length (less padding), dropout 0.1, the first 64 tokens of each
text (the synopsis and the first sentences; half the time of 128).

Writes to ``--out`` (default ``bench/.cache/debian_bert``):
    model.onnx     opset 17, inputs input_ids / attention_mask / token_type_ids
                   (int64 [batch, seq], both dims dynamic), output logits [batch, 8]
    vocab.json     token → id (the tokenizer's whole state)
    packages.json  the dpkg records used (the data differs between machines)
    meta.json      sections, split sizes, held-out accuracy (PyTorch and ONNX Runtime), time

Usage:
    pip install torch==2.13.0      # the CPU wheel
    python tools/train_debian_bert.py --out bench/.cache/debian_bert
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.real import debian_bert as data  # noqa: E402

OPSET = 17
LAYERS, HIDDEN, HEADS, FFN, POSITIONS = 4, 256, 4, 1024, 256
EPOCHS, BATCH, LR, WARMUP, DROPOUT = 20, 8, 5e-4, 0.1, 0.1
TRAIN_LEN = 64  # tokens per training text (synopsis and the first sentences): half the time
REPORT = 2  # epochs between progress lines


class Layer(nn.Module):
    """Post-LN encoder layer as in BERT, with attention written out (plain MatMul/Softmax in
    the export, like the Hugging Face BERT export, rather than a fused op)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.up, self.down = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)
        self.drop = nn.Dropout(DROPOUT)

    def forward(self, x, bias):
        b, s, _ = x.shape
        heads = [t(x).view(b, s, HEADS, HIDDEN // HEADS).transpose(1, 2) for t in (self.q, self.k, self.v)]
        q, k, v = heads
        att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HIDDEN // HEADS) + bias
        ctx = torch.matmul(self.drop(att.softmax(-1)), v).transpose(1, 2).reshape(b, s, HIDDEN)
        x = self.ln1(x + self.drop(self.o(ctx)))
        return self.ln2(x + self.drop(self.down(F.gelu(self.up(x)))))


class Encoder(nn.Module):
    def __init__(self, vocab: int, classes: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, HIDDEN)
        self.pos = nn.Embedding(POSITIONS, HIDDEN)
        self.typ = nn.Embedding(2, HIDDEN)
        self.ln = nn.LayerNorm(HIDDEN)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.pool = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, classes)
        self.drop = nn.Dropout(DROPOUT)
        self.apply(_init)

    def forward(self, input_ids, attention_mask, token_type_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.drop(self.ln(self.tok(input_ids) + self.pos(pos) + self.typ(token_type_ids)))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        # mean over the real tokens rather than BERT's [CLS] alone: from scratch on a few
        # hundred texts, [CLS] pooling stays at the majority class for many epochs
        mask = attention_mask[:, :, None].to(x.dtype)
        pooled = (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(self.drop(torch.tanh(self.pool(pooled))))


def _init(module: nn.Module) -> None:
    """BERT's initialisation (normal, std 0.02); PyTorch's N(0, 1) embeddings train slowly."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)


def _tensors(feeds: dict) -> list[torch.Tensor]:
    return [torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]


def accuracy_torch(model: nn.Module, feeds: dict, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(*_tensors(feeds)).argmax(1).numpy() == labels).mean())


def export(model: nn.Module, feeds: dict, path: Path) -> None:
    model.eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(
        model, tuple(t[:2] for t in _tensors(feeds)), str(path), dynamo=False,
        opset_version=OPSET, input_names=names, output_names=["logits"],
        dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "logits": {0: "batch"}})


def train(out: Path, seed: int = data.SEED, epochs: int = EPOCHS) -> Path:
    """Train, export and check the model; return the ONNX path."""
    import onnxruntime as ort
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    packages, sections = data.keep_top(data.load_data(out))
    train_set, test_set = data.split(packages, seed)
    vocab = data.build_vocab([f"{p.synopsis} {p.long}" for p in train_set])
    label = {s: i for i, s in enumerate(sections)}
    y_train = np.array([label[p.section] for p in train_set])
    y_test = np.array([label[p.section] for p in test_set])
    test_feeds = data.batch(vocab, test_set, pad_to=data.MAX_LEN)

    model = Encoder(len(vocab), len(sections))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    steps = epochs * math.ceil(len(train_set) / BATCH)
    warm = max(1, int(WARMUP * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warm, max(0.0, (steps - i) / (steps - warm))))
    rng = np.random.default_rng(seed)
    lengths = np.array([len(data.encode(vocab, p.synopsis, p.long, TRAIN_LEN)[0]) for p in train_set])
    for epoch in range(epochs):
        model.train()
        # batches of similar lengths (in a random order): far less padding to compute on
        order = np.argsort(lengths + rng.uniform(0, 16, len(lengths)), kind="stable")
        chunks = [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
        total = 0.0
        for c in rng.permutation(len(chunks)):
            idx = chunks[c]
            # padded to the longest text of the batch: the model never depends on the pad length
            feeds = data.batch(vocab, [train_set[i] for i in idx], TRAIN_LEN)
            loss = F.cross_entropy(model(*_tensors(feeds)), torch.from_numpy(y_train[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % REPORT == REPORT - 1 or epoch == epochs - 1:
            print(f"epoch {epoch + 1}: loss {total / len(lengths):.3f}  held-out accuracy "
                  f"{accuracy_torch(model, test_feeds, y_test):.3f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)

    acc = accuracy_torch(model, test_feeds, y_test)
    path = out / "model.onnx"
    tmp = out / "model.onnx.part"
    export(model, test_feeds, tmp)
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], test_feeds)[0]
    acc_ort = float((logits.argmax(1) == y_test).mean())
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "packages.json").write_text(json.dumps([p.__dict__ for p in packages], indent=0))
    meta = {"sections": sections, "train": len(train_set), "test": len(test_set),
            "vocab": len(vocab), "accuracy": acc_ort, "accuracy_torch": acc,
            "majority": float(np.mean(y_test == np.bincount(y_train).argmax())),
            "records": data.records_digest(packages), "torch": torch.__version__, "seed": seed,
            "epochs": epochs, "seconds": round(time.perf_counter() - t0, 1),
            "params": sum(p.numel() for p in model.parameters())}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(path)  # last: a model on disk means the rest is there too
    print(json.dumps(meta))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / data.NAME)
    parser.add_argument("--seed", type=int, default=data.SEED)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    train(args.out, args.seed, args.epochs)


if __name__ == "__main__":
    main()
