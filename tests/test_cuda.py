"""The CUDA path, exercised where a GPU and onnxruntime-gpu exist; skipped (with the reason)
elsewhere, e.g. in CI. The same checks as on CPU: numerics against the original, latency
acceptance never returning a slower model, I/O-bound timing."""
import numpy as np
import pytest

from conftest import tiny_cnn

ort = pytest.importorskip("onnxruntime")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("no CUDAExecutionProvider here (no GPU or CPU-only onnxruntime): "
                "CUDA checks run only on a GPU machine", allow_module_level=True)

from onnxlr import runtime  # noqa: E402
from onnxlr.pipeline import optimize  # noqa: E402


def test_cuda_session_runs_on_the_gpu_and_matches_cpu():
    model = tiny_cnn(batch=2)
    feeds = runtime.make_inputs(model, seed=0)
    gpu = runtime.make_session(model, provider="cuda")
    assert gpu.get_providers()[0] == "CUDAExecutionProvider"
    cpu = runtime.run(runtime.make_session(model), feeds)
    got = runtime.run(gpu, feeds)
    for name, ref in cpu.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-3, atol=1e-4)


def test_io_bound_timing_on_cuda():
    model = tiny_cnn(batch=2)
    feeds = runtime.make_inputs(model, seed=0)
    session = runtime.make_session(model, provider="cuda")
    lat = runtime.interleaved_latency([session, session], feeds, warmup=2, iterations=5)
    assert all(s.median_ms > 0 for s in lat.stats)


def test_accept_latency_on_cuda_is_never_slower():
    result, report = optimize(tiny_cnn(batch=2), "auto", "0.5", max_error=None,
                              accept="latency", provider="cuda", latency_cache=None)
    assert report.latency["provider"] == "cuda" and report.latency["speedup"] >= 1.0
