"""Budgets: MAC ladders are the largest ranks within each level, the greedy allocation spends
the budget where it costs the least error, and optimize() reports which constraint bound."""
import numpy as np
import pytest

from conftest import conv_model, gemm_model, tiny_cnn
from onnxlr.budget import Ladder, allocate, plan, ranks_for_macs
from onnxlr.errors import OnnxlrError
from onnxlr.graph import to_graph
from onnxlr.latency import Trial
from onnxlr.methods import METHODS
from onnxlr.pipeline import optimize
from onnxlr.records import FACTORISED
from onnxlr.sites import find_site


def _site(model):
    from onnx.shape_inference import infer_shapes
    return find_site(to_graph(infer_shapes(model)).nodes[0])


@pytest.mark.parametrize("method", ["tucker", "cp", "svd"])
@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.1])
def test_ranks_for_macs_are_the_largest_within_the_level(rng, method, fraction):
    w = rng.standard_normal((64, 48, 3, 3)).astype(np.float32)
    site = _site(conv_model(w, x_shape=(1, 48, 14, 14), pads=[1, 1, 1, 1]))
    m = METHODS[method]()
    ranks = ranks_for_macs(m, site, fraction, 8)
    assert ranks is not None
    assert m.cost(site, ranks)[1] <= fraction * site.macs
    bigger = tuple(r + 8 for r in ranks)  # one rounding step up in every mode is over budget
    assert m.cost(site, bigger)[1] > fraction * site.macs
    assert all(r % 8 == 0 or r < 8 for r in ranks)  # rounded once a mode reaches a multiple


def test_ranks_for_macs_none_when_nothing_fits(rng):
    site = _site(gemm_model(rng.standard_normal((6, 4)).astype(np.float32), a_shape=(5, 6)))
    assert ranks_for_macs(METHODS["svd"](), site, 0.01, 8) is None


def _ladder(name, errors, macs, macs_before=100, ms=None):
    trials = [Trial((i + 1,), macs=m, local_error=e, ms_before=10.0,
                    ms_after=(ms[i] if ms else 5.0)) for i, (e, m) in enumerate(zip(errors, macs))]
    return Ladder(name, trials, macs_before, 10.0)


def test_allocate_spends_the_budget_where_error_is_cheapest():
    robust = _ladder("robust", [0.01, 0.02, 0.05], [50, 25, 12])
    fragile = _ladder("fragile", [0.3, 0.6, 0.9], [50, 25, 12])
    state, saved = allocate([robust, fragile], by="macs", need=60)
    assert state == {"robust": 1, "fragile": -1} or state["robust"] == 2 and state["fragile"] == -1
    assert saved >= 60
    state, saved = allocate([robust, fragile], by="macs", need=120)
    assert state["fragile"] >= 0 and saved >= 120  # the fragile layer only when it must


def test_allocate_by_time_ignores_options_that_are_not_faster():
    slow = _ladder("slow", [0.0, 0.0], [50, 25], ms=[12.0, 11.0])  # fewer MACs, slower
    fast = _ladder("fast", [0.1, 0.2], [50, 25], ms=[6.0, 4.0])
    state, saved = allocate([slow, fast], by="ms", need=100)
    assert state["slow"] == -1 and state["fast"] == 1 and saved == pytest.approx(6.0)
    ranks, account = plan([slow, fast], target_flops=None, target_speedup=4.0, macs_total=200,
                          model_ms=20.0)
    assert not account["reachable"] and account["predicted_speedup"] == pytest.approx(20 / 14)
    assert ranks == {"fast": (2,)}


def test_plan_validates_targets():
    with pytest.raises(OnnxlrError, match="--target-flops"):
        plan([], target_flops=1.5, target_speedup=None, macs_total=1, model_ms=None)
    with pytest.raises(OnnxlrError, match="--target-speedup"):
        plan([], target_flops=None, target_speedup=0.9, macs_total=1, model_ms=1.0)


def test_optimize_target_flops_meets_the_target_and_says_so():
    model, report = optimize(tiny_cnn(), "auto", max_error=None, target_flops=0.5,
                             latency_cache=None)
    b = report.budget
    assert b["target_flops"] == 0.5 and b["by"] == "macs"
    assert report.macs_after <= 0.5 * report.macs_before
    assert b["achieved_macs_ratio"] == pytest.approx(report.macs_after / report.macs_before)
    assert b["target_met"] and b["bound"] == "target"
    kept = [r for r in report.records if r.status == FACTORISED]
    assert kept
    for rec in kept:
        assert sum(c["chosen"] for c in rec.candidates) == 1
        assert rec.latency_before_ms > 0 and rec.extra["local_error"] is not None


def test_optimize_budget_options_validated():
    with pytest.raises(OnnxlrError, match="not both"):
        optimize(tiny_cnn(), target_flops=0.5, target_speedup=2.0)
    with pytest.raises(OnnxlrError, match="--no-verify"):
        optimize(tiny_cnn(), target_flops=0.5, verify=False, max_error=None)


def test_cli_target_flops(tmp_path):
    import json

    import onnx

    from onnxlr.cli import main
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(tiny_cnn(batch=1), src)
    assert main(["optimize", str(src), "-o", str(out), "--target-flops", "0.5",
                 "--max-error", "none", "--latency-cache", "none", "--report", str(rep)]) == 0
    data = json.loads(rep.read_text())
    assert data["summary"]["macs_ratio"] <= 0.5
    onnx.checker.check_model(onnx.load(out))
