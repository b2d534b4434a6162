"""Untrusted model files: external data paths, resource limits, model text as data.

Every refusal must be an OnnxlrError naming the file or tensor, raised before
anything outside the model's folder is read or written and before a declared
size is allocated.
"""
from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import onnx
import pytest
from conftest import init, make_model, vinfo
from hostile import (digest_tree, lying_header, save_external, small_conv, weight,
                     with_external)
from onnx import TensorProto, helper

from onnxlr import io, sites
from onnxlr.errors import OnnxlrError
from onnxlr.inspect import format_views, inspect_model
from onnxlr.io import load_model, save_model
from onnxlr.pipeline import optimize
from onnxlr.runtime import make_inputs


@pytest.fixture
def outside(tmp_path):
    """A secret file outside the model's folder, and the model folder."""
    secret = tmp_path / "outside" / "secret.data"
    secret.parent.mkdir()
    secret.write_bytes(small_conv().graph.initializer[0].raw_data)
    folder = tmp_path / "model"
    folder.mkdir()
    return secret, folder


# --- external data on read ----------------------------------------------------------------

def test_safe_external_data_loads_exactly(tmp_path):
    path = save_external(tmp_path)
    model = load_model(path)
    t = model.graph.initializer[0]
    assert t.data_location == TensorProto.DEFAULT and not t.external_data
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), weight())


@pytest.mark.parametrize("make_location,expected", [
    (lambda secret, folder: str(secret), "is absolute"),
    (lambda secret, folder: "../outside/secret.data", "contains '..'"),
    (lambda secret, folder: "sub/../../outside/secret.data", "contains '..'"),
    (lambda secret, folder: "C:secret.data", "is absolute"),
    (lambda secret, folder: "", "empty location"),
])
def test_unsafe_location_refused(outside, make_location, expected):
    secret, folder = outside
    path = save_external(folder, make_location(secret, folder), data_path=None)
    before = digest_tree(secret.parent.parent)
    with pytest.raises(OnnxlrError, match=expected) as err:
        load_model(path)
    assert str(path) in str(err.value) and "'W'" in str(err.value)
    assert digest_tree(secret.parent.parent) == before


def test_symlinked_data_file_refused(outside):
    secret, folder = outside
    (folder / "w.data").symlink_to(secret)
    path = save_external(folder, "w.data", data_path=None)
    with pytest.raises(OnnxlrError, match="is a symlink"):
        load_model(path)


def test_location_through_symlinked_folder_resolving_outside_refused(outside):
    secret, folder = outside
    (folder / "sub").symlink_to(secret.parent, target_is_directory=True)
    path = save_external(folder, "sub/secret.data", data_path=None)
    with pytest.raises(OnnxlrError, match="symlink"):
        load_model(path)


def test_hard_linked_data_file_refused(outside):
    secret, folder = outside
    os.link(secret, folder / "w.data")
    path = save_external(folder, "w.data", data_path=None)
    with pytest.raises(OnnxlrError, match="hard link"):
        load_model(path)


def test_symlink_swapped_in_after_the_path_check_refused(outside, monkeypatch):
    """The open itself follows no link (O_NOFOLLOW per component), whatever the check saw."""
    secret, folder = outside
    (folder / "w.data").symlink_to(secret)
    path = save_external(folder, "w.data", data_path=None)
    monkeypatch.setattr(io, "check_external_location", lambda loc, base, what: base / loc)
    with pytest.raises(OnnxlrError, match="through a symlink"):
        load_model(path)


@pytest.mark.parametrize("kw,expected", [
    ({"length": 100}, "external data length 100 bytes, but its declared shape needs 4608"),
    ({"offset": 1}, "holds 4608 bytes, the tensor needs 4608 from offset 1"),
])
def test_external_data_header_must_match_file(tmp_path, kw, expected):
    path = save_external(tmp_path, **kw)
    with pytest.raises(OnnxlrError, match=expected):
        load_model(path)


def test_external_offset_not_an_integer(tmp_path):
    path = save_external(tmp_path)
    model = onnx.load(path, load_external_data=False)
    model.graph.initializer[0].external_data[1].value = "12; rm -rf /"
    onnx.save(model, path)
    with pytest.raises(OnnxlrError, match="not integers"):
        load_model(path)


def test_external_data_over_machine_memory_refused_before_reading(tmp_path, monkeypatch):
    path = save_external(tmp_path)
    monkeypatch.setattr(io, "_physical_memory", lambda: 1000)
    opened = []
    monkeypatch.setattr(io, "_open_inside", lambda *a: opened.append(a))
    with pytest.raises(OnnxlrError, match="more than this machine's memory"):
        load_model(path)
    assert not opened


# --- external data on write ---------------------------------------------------------------

def test_external_save_stays_in_output_folder_and_round_trips(tmp_path):
    model = small_conv()
    model.graph.initializer.append(init("tiny", np.arange(3, dtype=np.float32)))
    before = model.SerializeToString()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    save_model(model, out_dir / "m.onnx", threshold=100)  # small model, small threshold
    assert model.SerializeToString() == before  # the model given is not touched
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.onnx", "m.onnx.data", "out"]
    stored = onnx.load(out_dir / "m.onnx", load_external_data=False)
    big, tiny = stored.graph.initializer
    assert big.data_location == TensorProto.EXTERNAL and tiny.data_location == TensorProto.DEFAULT
    info = {e.key: e.value for e in big.external_data}
    assert info["location"] == "m.onnx.data" and int(info["offset"]) % io.ALIGNMENT == 0
    loaded = load_model(out_dir / "m.onnx")
    assert loaded.SerializeToString() == before


def test_save_refuses_symlinked_external_data_target(outside):
    secret, folder = outside
    (folder / "m.onnx.data").symlink_to(secret)
    before = digest_tree(secret.parent.parent)
    with pytest.raises(OnnxlrError, match="symlink"):
        save_model(small_conv(), folder / "m.onnx", external_data=True)
    assert digest_tree(secret.parent.parent) == before
    assert not (folder / "m.onnx").exists()


def test_save_refuses_hard_linked_external_data_target(outside):
    secret, folder = outside
    os.link(secret, folder / "m.onnx.data")
    with pytest.raises(OnnxlrError, match="hard link"):
        save_model(small_conv(), folder / "m.onnx", external_data=True)
    assert not (folder / "m.onnx").exists()


def test_save_refuses_to_pass_on_an_unloaded_external_reference(tmp_path):
    model = with_external(small_conv(), "../../etc/passwd")
    with pytest.raises(OnnxlrError, match="never loaded"):
        save_model(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# --- resource limits ----------------------------------------------------------------------

def test_absurd_input_shape_refused_before_allocating():
    model = small_conv()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[2].dim_value = 2**20, 2**20  # 7.9e13 elements: OOM if allocated
    with pytest.raises(OnnxlrError, match="input 'x' would have 79164837199872 elements"):
        make_inputs(model)
    with pytest.raises(OnnxlrError, match="over onnxlr's limit"):
        optimize(model, "auto", "0.5", max_error=0.5)


@pytest.mark.parametrize("dim0,expected", [
    (1000, "declares shape 1000x8x3x3 (288000 bytes) but holds 4608 bytes"),
    (8, "declares shape 8x8x3x3 (2304 bytes) but holds 4608 bytes"),
    (2**40, "declares shape 1099511627776x8x3x3"),
    (-3, "negative dimension"),
])
def test_lying_tensor_header_refused(tmp_path, dim0, expected):
    model = lying_header(dim0)
    with pytest.raises(OnnxlrError, match=re.escape(expected)):
        optimize(model, "auto", "0.5", max_error=None, verify=False)
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(OnnxlrError, match=re.escape(expected)):
        load_model(tmp_path / "m.onnx")


def test_lying_header_in_typed_field_and_constant_node():
    model = small_conv()
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.float_data.extend([0.5] * 10)  # typed field, 10 values for 1152 declared
    with pytest.raises(OnnxlrError, match=r"tensor 'W' declares shape 16x8x3x3 \(1152 values\)"):
        optimize(model, "auto", "0.5", max_error=None, verify=False)
    value = onnx.numpy_helper.from_array(weight(), "W_value")
    value.dims[0] = 99
    nodes = [helper.make_node("Constant", [], ["W"], name="w_const", value=value),
             helper.make_node("Conv", ["x", "W"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [vinfo("x", [1, 8, 9, 9])], [vinfo("y", None)])
    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OnnxlrError, match="tensor 'W_value' declares shape 99x8x3x3"):
        optimize(bad, "auto", "0.5", max_error=None, verify=False)


def test_decomposition_size_is_bounded_per_layer_and_method(monkeypatch):
    """CP gets the smallest budget; a layer over it is declined, with the reason, not started."""
    from onnxlr.methods.cp import CpMethod
    monkeypatch.setattr(CpMethod, "max_elements", 1000)
    calls = []
    monkeypatch.setattr(CpMethod, "decompose", lambda *a, **k: calls.append(a))
    _, report = optimize(small_conv(), "cp", "8", max_error=None, verify=False)
    (rec,) = report.records
    assert rec.status == "declined" and "over the cp limit of 1000" in rec.reason
    assert not calls
    _, report = optimize(small_conv(), "tucker", "0.5", max_error=None, verify=False)
    assert report.records[0].status == "factorised"  # Tucker's limit is far above 1152


# --- model text is data -------------------------------------------------------------------

EVIL = "conv{0}%s|x\nfactorised | 1 |<script>alert(1)</script>\x1b[2J"


def evil_model() -> onnx.ModelProto:
    w = weight()
    nodes = [helper.make_node("Conv", ["x", "W"], [EVIL + "_y"], name=EVIL,
                              doc_string="<b>{__class__}</b> %n")]
    model = make_model(nodes, [vinfo("x", [1, 8, 9, 9])], [vinfo(EVIL + "_y", None)],
                       [init("W", w)], doc_string="{0} %s <script>")
    model.metadata_props.add(key="evil{0}", value="%s\n<script>")
    return model


def test_names_and_doc_strings_are_data_in_reports(caplog):
    caplog.set_level(logging.DEBUG)  # every log call formats the names too
    out, report = optimize(evil_model(), "tucker", "0.5", max_error=1.0)
    (rec,) = report.records
    assert rec.name == EVIL and rec.status == "factorised"
    assert out.doc_string == "{0} %s <script>"
    assert {p.key: p.value for p in out.metadata_props}["evil{0}"] == "%s\n<script>"
    data = json.loads(report.to_json())
    assert data["layers"][0]["name"] == EVIL  # JSON keeps the name exactly, escaped by json
    md = report.to_markdown()
    assert "<script>" not in md and "\x1b" not in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 1  # header, rule, one layer: the name's newline and pipes stay inside
    text = report.to_text()
    assert "\x1b" not in text
    table = text.split("\n\n")[0].splitlines()
    assert len(table) == 1 + 1, "a node name must not be able to add lines to the table"


def test_model_text_cannot_break_one_line_errors_or_inspect():
    model = lying_header(1000)
    model.graph.initializer[0].name = "W\nonnxlr: ok, nothing wrong {0} %s"
    model.graph.node[0].input[1] = model.graph.initializer[0].name
    with pytest.raises(OnnxlrError) as err:
        optimize(model, "auto", "0.5", max_error=None, verify=False)
    assert "\n" not in str(err.value) and "declares shape" in str(err.value)
    table = format_views(inspect_model(evil_model(), rules=("0.5",)), ("0.5",))
    assert len(table.splitlines()) == 2 and "\x1b" not in table
