"""Sessions for models too big to serialise: the large initializers go to ONNX Runtime from
memory. The threshold is lowered here so that a small model takes that path."""
import numpy as np
import pytest

from conftest import ort_run, tiny_cnn
from onnxlr import runtime
from onnxlr.runtime import sessions
from onnxlr.pipeline import prepare


@pytest.mark.parametrize("threshold", [0, 1 << 40])
def test_a_session_from_memory_computes_what_the_serialised_one_does(monkeypatch, threshold, rng):
    model = prepare(tiny_cnn())
    monkeypatch.setattr(sessions, "IN_MEMORY_BYTES", threshold)
    monkeypatch.setattr(sessions, "IN_MEMORY_TENSOR", 64)
    session = runtime.make_session(model)
    x = {"input": rng.standard_normal((3, 3, 8, 8)).astype(np.float32)}
    got = runtime.run(session, x)
    expected = ort_run(model, x)
    np.testing.assert_allclose(got["logits"], expected[0], rtol=1e-6, atol=1e-6)
    handed = session._onnxlr_weights
    if threshold == 0:
        assert handed and len(handed[0]) >= 3   # the convs' and the Gemm's weights
        # the arrays are views of the model's own bytes: nothing was copied on this side
        assert all(not a.flags.owndata for a in handed[0])
    else:
        assert handed is None
    # the model itself is untouched
    assert all(t.data_location != 1 for t in model.graph.initializer)
