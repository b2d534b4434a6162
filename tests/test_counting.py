"""MACs per sample on the shapes a model ran at, where the graph's dims are symbolic."""
import numpy as np

from conftest import init, make_model, vinfo
from onnx import helper

from onnxlr.counting import PER_SAMPLE
from onnxlr.pipeline import optimize


def test_a_symbolic_length_is_counted_per_sample_on_the_real_input(rng):
    """A 1-D conv over [N, 16, L] with L symbolic: the graph alone can count only per
    position (L = 1); run at L = 50 the count is 50 positions × 32·16·3 per sample."""
    w = rng.standard_normal((32, 16, 3)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1])],
                       [vinfo("x", ["N", 16, "L"])], [vinfo("y", None)], [init("w", w)])
    _, report = optimize(model, "svd", rank="0.25", input_shapes={"x": [4, 16, 50]},
                         max_error=None)
    (rec,) = report.records
    assert rec.extra["macs_note"] == PER_SAMPLE
    assert rec.macs_before == 50 * 32 * 16 * 3
    if rec.factorised:      # channel SVD at rank r: k×1 conv with r filters, then 1×1
        r = rec.ranks[0]
        assert rec.macs_after == 50 * (r * 16 * 3 + 32 * r)
    else:
        assert rec.macs_after == rec.macs_before
