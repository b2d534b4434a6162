"""A synthetic decoder-only transformer over 2 GB: peak memory and tool time of one optimize.

No model hub is reachable, so the model is built here with random weights (they are fine
for memory and time; its outputs mean nothing): ``--layers`` blocks of a pre-norm decoder
MLP stack, each block ``x + W2·gelu(W1·LayerNorm(x))`` plus a ``d×d`` attention-output
projection, at ``--width`` d and FFN width 4d; saved with external data (one file) in a
temporary folder. Then ``onnxlr optimize`` runs on it in a child process with the SVD at a
fixed rank (no calibration: this measures the big-model path, not the search), and the
child's peak RSS (its ``VmHWM``), the model's size on disk and each phase's time are
printed and appended to ``bench/results/big_model.md``.

Run: ``python bench/bench_big_model.py [--layers 32 --width 2048]`` (the default: 32 blocks
of 9·2048² = 37.7M weights, 1.21B parameters, 4.8 GB in float32).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "big_model.md"


def build(path: Path, layers: int, width: int, seed: int = 0) -> int:
    """Write the model (external data, one file), one weight in memory at a time (built
    whole, 32 blocks held every weight twice: ~14 GB); returns its parameter count."""
    rng = np.random.default_rng(seed)
    d, f = width, 4 * width
    nodes, inits = [], []
    x = "x"
    params = 0
    data = path.parent / (path.name + ".data")
    fh = open(data, "wb")

    def weight(name, shape, w=None):
        nonlocal params
        if w is None:
            w = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(
                np.float32)
            params += w.size
        fh.write(b"\0" * (-fh.tell() % 4096))
        offset = fh.tell()
        fh.write(w.tobytes())
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape),
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", data.name), ("offset", str(offset)),
                           ("length", str(w.nbytes))):
            t.external_data.add(key=key, value=value)
        inits.append(t)

    weight("ln_scale", (d,), np.ones(d, np.float32))
    weight("ln_bias", (d,), np.zeros(d, np.float32))
    for i in range(layers):
        p = f"blocks.{i}"
        weight(f"{p}.attn_out", (d, d))
        weight(f"{p}.up", (d, f))
        weight(f"{p}.down", (f, d))
        nodes += [
            helper.make_node("LayerNormalization", [x, "ln_scale", "ln_bias"], [f"{p}.ln"],
                             name=f"{p}/ln", axis=-1),
            helper.make_node("MatMul", [f"{p}.ln", f"{p}.attn_out"], [f"{p}.a"],
                             name=f"{p}/attn_out/MatMul"),
            helper.make_node("Add", [x, f"{p}.a"], [f"{p}.r1"], name=f"{p}/res1"),
            helper.make_node("MatMul", [f"{p}.r1", f"{p}.up"], [f"{p}.h"], name=f"{p}/up/MatMul"),
            helper.make_node("Gelu", [f"{p}.h"], [f"{p}.g"], name=f"{p}/gelu"),
            helper.make_node("MatMul", [f"{p}.g", f"{p}.down"], [f"{p}.o"],
                             name=f"{p}/down/MatMul"),
            helper.make_node("Add", [f"{p}.r1", f"{p}.o"], [f"{p}.out"], name=f"{p}/res2"),
        ]
        x = f"{p}.out"
    graph = helper.make_graph(nodes, "synthetic_decoder",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, d])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    fh.close()
    onnx.save_model(model, str(path))
    return params


#: Runs onnxlr's CLI and writes the process's VmHWM (KiB) to argv[1] at exit. Not getrusage:
#: a child's ``ru_maxrss`` includes the RSS of the process it was spawned from (Linux records
#: the old address space's peak at exec), here the builder's.
_PEAK = """
import atexit, sys
def peak(path=sys.argv[1]):
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(path, 'w').write(line.split()[1])
atexit.register(peak)
from onnxlr.cli import main
sys.exit(main(sys.argv[2:]))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--rank", default="128")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxlr-big-") as tmp:
        folder = Path(tmp)
        src, dst = folder / "decoder.onnx", folder / "decoder.lr.onnx"
        t0 = time.perf_counter()
        params = build(src, args.layers, args.width)
        t_build = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"built {params / 1e9:.2f}B parameters, {size / 2**30:.2f} GiB on disk in "
              f"{t_build:.0f} s", flush=True)
        hwm = folder / "vmhwm"
        cmd = [sys.executable, "-c", _PEAK, str(hwm), "optimize", str(src), str(dst), "--method", "svd",
               "--rank", args.rank, "--max-error", "none", "--input-shape", "x:1,16," +
               str(args.width), "--report", str(folder / "report.json")]
        t1 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t1
        peak = int(hwm.read_text()) / 2**20 if hwm.exists() else float("nan")  # KiB → GiB
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        row = {"params": params, "disk_gib": size / 2**30, "rank": args.rank,
               "exit": proc.returncode, "seconds": seconds, "peak_rss_gib": peak}
        if proc.returncode == 0:
            out_size = sum(p.stat().st_size for p in folder.iterdir()
                           if p.name.startswith("decoder.lr")) / 2**30
            report = json.loads((folder / "report.json").read_text())
            row.update(out_gib=out_size, speedup=(report.get("latency") or {}).get("speedup"),
                       layers=sum(1 for r in report.get("layers", []) if r.get("status") in
                                  ("factorised", "pruned")))
        print(json.dumps(row, indent=1))
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with open(OUT, "a") as fh:
            fh.write(f"| {time.strftime('%Y-%m-%d')} | {params / 1e9:.2f}B | {size / 2**30:.2f} GiB"
                     f" | svd rank {args.rank} | exit {proc.returncode} | {seconds:.0f} s | "
                     f"peak RSS {peak:.2f} GiB (VmHWM) | {row.get('out_gib', 0):.2f} GiB out | "
                     f"{row.get('speedup')} |\n")
        if args.keep:
            print("kept", subprocess.run(["cp", "-r", tmp, "/tmp/onnxlr-big-kept"]).returncode)
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
