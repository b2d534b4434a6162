"""Weights left in their file (``onnxlr.referenced``): a model whose external data reaches
``io.REFERENCE_BYTES`` is optimised without its big weights' bytes in any proto. The
thresholds are lowered here so that a small model takes that path; what it computes and
writes must be what the ordinary path gives."""
import numpy as np
import onnx
import pytest

from conftest import ort_run, tiny_cnn
from onnxlr import io, referenced, runtime
from onnxlr.errors import OnnxlrError
from onnxlr.io import load_model, save_model
from onnxlr.pipeline import optimize


def _saved(folder, model):
    folder.mkdir(exist_ok=True)
    path = folder / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    return path


@pytest.fixture
def by_reference(monkeypatch):
    monkeypatch.setattr(io, "REFERENCE_BYTES", 0)
    monkeypatch.setattr(io, "REFERENCE_TENSOR", 16)


def _optimize(path):
    return optimize(str(path), "svd", "2", max_error=None, latency_cache=None,
                    measure_latency=False)


def test_optimize_from_the_file_gives_what_the_loaded_model_gives(tmp_path, monkeypatch, rng):
    path = _saved(tmp_path / "in", tiny_cnn())
    plain, plain_report = _optimize(path)
    monkeypatch.setattr(io, "REFERENCE_BYTES", 0)
    monkeypatch.setattr(io, "REFERENCE_TENSOR", 16)
    loaded = load_model(path)
    left = [t for t in loaded.graph.initializer if referenced.is_referenced(t)]
    assert left and not any(t.HasField("raw_data") for t in left)
    result, report = _optimize(path)
    assert [(r.name, r.status, r.ranks) for r in report.records] == \
        [(r.name, r.status, r.ranks) for r in plain_report.records]
    assert report.comparison.worst_rel_l2 == pytest.approx(plain_report.comparison.worst_rel_l2)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    save_model(result, out)
    # the bytes left in the input's file were copied over, the marker was not
    assert (out.parent / "m.onnx.data").is_file()
    assert referenced.FOLDER_KEY.encode() not in out.read_bytes()
    monkeypatch.setattr(io, "REFERENCE_BYTES", 1 << 40)
    back = load_model(out)
    x = {"input": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    for got, expected in zip(ort_run(back, x), ort_run(plain, x)):
        np.testing.assert_array_equal(got, expected)


def test_a_session_reads_the_weights_from_the_file_itself(tmp_path, by_reference, rng):
    path = _saved(tmp_path, tiny_cnn())
    model = load_model(path)
    session = runtime.make_session(model)
    assert session._onnxlr_weights is None   # nothing handed over from this side
    x = {"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    io.REFERENCE_BYTES = 1 << 40
    expected = ort_run(load_model(path), x)
    np.testing.assert_array_equal(runtime.run(session, x)["logits"], expected[0])
    # the model handed in keeps its markers (the session got a copy without them)
    assert any(referenced.is_referenced(t) for t in model.graph.initializer)


def test_a_data_file_cut_short_after_loading_is_refused_when_read(tmp_path, by_reference):
    path = _saved(tmp_path, tiny_cnn())
    model = load_model(path)
    tensor = next(t for t in model.graph.initializer if referenced.is_referenced(t))
    with open(tmp_path / "m.onnx.data", "r+b") as fh:
        fh.truncate(int(next(e.value for e in tensor.external_data if e.key == "offset")) + 4)
    with pytest.raises(OnnxlrError, match="truncated data file"):
        referenced.read_array(tensor)


def test_the_cli_writes_such_a_models_result_with_external_data(tmp_path, by_reference,
                                                                monkeypatch, capsys):
    from onnxlr.cli import main
    # only the weights factorised away stay in the file: the result refers to none of them
    monkeypatch.setattr(io, "REFERENCE_TENSOR", 256)
    path = _saved(tmp_path / "in", tiny_cnn())
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(path), str(out), "--method", "svd", "--rank", "2",
                 "--max-error", "none", "--no-latency", "--latency-cache", "none"]) == 0
    assert (tmp_path / "out.onnx.data").is_file()


@pytest.mark.parametrize("max_error,kept", [(None, False), (0.5, True)])
def test_the_factor_cache_is_dropped_when_no_later_build_needs_it(monkeypatch, max_error, kept):
    from onnxlr import pipeline
    builders = []

    class Recorded(pipeline._Builder):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            builders.append(self)
    monkeypatch.setattr(pipeline, "_Builder", Recorded)
    _, report = optimize(tiny_cnn(), "svd", "2", max_error=max_error, latency_cache=None,
                         measure_latency=False)
    assert report.factorised
    assert bool(builders[0].cache) is kept


def test_end_to_end_loads_the_result_before_the_original(monkeypatch, rng):
    from onnxlr import accept
    order = []
    real = runtime.make_session

    def recorded(model, **kw):
        order.append(model)
        return real(model, **kw)
    monkeypatch.setattr(accept.runtime, "make_session", recorded)
    original, result = tiny_cnn(), tiny_cnn(seed=1)
    feeds = {"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    timed = accept.end_to_end(original, result, feeds, iterations=2, max_seconds=1.0)
    assert order[0] is result and order[1] is original
    assert timed["before_ms"] > 0 and timed["after_ms"] > 0
