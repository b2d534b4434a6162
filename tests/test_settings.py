"""``OptimizeOptions`` (onnxlr/settings.py): one validated, frozen options object, each default
written once; ``optimize()``'s keywords and the CLI's flags both build it."""
from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import tiny_cnn

import onnxlr
from onnxlr.cli import _optimize_parser, options_from_args
from onnxlr.errors import OnnxlrError, OptionError
from onnxlr.pipeline import optimize
from onnxlr.settings import OPTION_NAMES, OptimizeOptions, default, make_options

INIT_FIELDS = [f for f in dataclasses.fields(OptimizeOptions) if f.init]


def test_the_cli_defaults_are_the_options_defaults():
    """``onnxlr optimize m.onnx o.onnx`` with no flags asks for exactly the defaults: every
    field, one by one (the CLI has no second copy of any)."""
    args = _optimize_parser().parse_args(["m.onnx", "o.onnx"])
    built = options_from_args(args)
    for f in INIT_FIELDS:
        assert getattr(built, f.name) == f.default, f.name
    assert built == OptimizeOptions()
    assert [f.name for f in INIT_FIELDS] == list(OPTION_NAMES)
    assert default("max_error") == 0.05 and default("method") == "auto"


def test_the_cli_help_states_the_defaults_it_takes_from_the_options():
    text = " ".join(_optimize_parser().format_help().split())
    assert f"(default {default('max_error'):g};" in text
    assert f"(default {default('cp_max_seconds'):g})" in text
    assert f"(default {default('min_layer_speedup'):g})" in text


def test_cli_flags_become_options():
    args = _optimize_parser().parse_args(
        ["m.onnx", "o.onnx", "--method", "tucker", "--rank", "0.5", "--max-error", "none",
         "--no-verify", "--include", "conv*", "--layer-rank", "fc=4", "--latency-cache", "none",
         "--input-shape", "x:1x3x8x8"])
    o = options_from_args(args)
    assert (o.method, o.rank, o.max_error, o.verify, o.measure_latency) == \
        ("tucker", "0.5", None, False, False)
    assert o.include == ("conv*",) and o.layer_ranks == ("fc=4",) and o.latency_cache is None
    assert o.input_shapes == {"x": (1, 3, 8, 8)}
    assert o.method_plan["conv"] == "tucker" and o.rank_rule.spec == "0.5"
    assert [g for g, _ in o.layer_rank_rules] == ["fc"]


def test_the_options_are_frozen():
    o = OptimizeOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.max_error = 0.1
    changed = o.replace(max_error=0.1, include=["a*"])
    assert o.max_error == 0.05 and changed.max_error == 0.1 and changed.include == ("a*",)
    assert o.replace() is o


def test_an_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="'max_eror'.*did you mean 'max_error'"):
        optimize("no-such-model.onnx", max_eror=0.1)  # refused before the model is read
    with pytest.raises(TypeError, match="'bogus'"):
        make_options(OptimizeOptions(), bogus=1)
    with pytest.raises(TypeError, match="'bogus'"):
        OptimizeOptions().replace(bogus=1)
    with pytest.raises(TypeError, match="OptimizeOptions"):
        optimize(tiny_cnn(), options={"rank": "0.5"})


@pytest.mark.parametrize("changes, names", [
    ({"max_error": 0}, "--max-error"),
    ({"max_error": math.nan}, "--max-error"),
    ({"rank_multiple": 0}, "--rank-multiple"),
    ({"batch": 0}, "--batch"),
    ({"batch": True}, "--batch"),
    ({"cp_max_seconds": math.inf}, "--cp-max-seconds"),
    ({"on_exceed": "shrug"}, "on_exceed"),
    ({"accept": "speed"}, "--accept"),
    ({"min_layer_speedup": 0}, "--min-layer-speedup"),
    ({"timing_batch": 0}, "--timing-batch"),
    ({"max_drop": -1.0}, "--max-drop"),
    ({"evaluate": "e.npz"}, "--eval"),
    ({"target_flops": 0.5, "target_speedup": 2.0}, "--target-flops or --target-speedup"),
    ({"verify": False}, "--max-error"),  # the default bound needs verification
    ({"verify": False, "max_error": None, "profile": True}, "--profile"),
    ({"metric": "top1", "method": "prune"}, "--method prune"),
    ({"method": "nope"}, "method 'nope'"),
    ({"method": 3}, "--method"),
    ({"rank": "bogus"}, "rank 'bogus'"),
    ({"layer_ranks": ["fc"]}, "--layer-rank 'fc'"),
    ({"layer_ranks": ["fc=bogus"]}, "--layer-rank 'fc=bogus'"),
])
def test_a_bad_value_is_a_one_line_value_error_naming_the_option(changes, names):
    with pytest.raises(ValueError) as caught:
        OptimizeOptions(**changes)
    message = str(caught.value)
    assert names in message and "\n" not in message
    assert isinstance(caught.value, OptionError) and isinstance(caught.value, OnnxlrError)
    with pytest.raises(OptionError):  # optimize() refuses it before reading the model
        optimize("no-such-model.onnx", **changes)


def test_optimize_takes_the_options_object_its_keywords_or_both():
    opts = OptimizeOptions(method="tucker", rank="0.5", max_error=None, verify=False)
    _, by_object = optimize(tiny_cnn(), opts)
    _, by_keyword = optimize(tiny_cnn(), options=opts)
    _, by_positional = optimize(tiny_cnn(), "tucker", "0.5", max_error=None, verify=False)
    _, overridden = optimize(tiny_cnn(), options=opts, rank="0.25")
    ranks = [[r.ranks for r in rep.records] for rep in (by_object, by_keyword, by_positional)]
    assert ranks[0] == ranks[1] == ranks[2] and any(ranks[0])
    assert overridden.rank == "0.25" and by_object.rank == "0.5"
    assert opts.rank == "0.5"  # the caller's options are never changed
    with pytest.raises(TypeError, match="twice"):
        optimize(tiny_cnn(), opts, options=opts)
    assert onnxlr.OptimizeOptions is OptimizeOptions
