"""The published JSON Schemas: recipes (generated from the CLI, so they cannot drift) and the
report (hand-written), checked with jsonschema against real files onnxlr writes."""
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from conftest import tiny_cnn
from onnxlr.cli import _optimize_parser
from onnxlr.pipeline import optimize
from onnxlr.recipe import RECIPE_SCHEMA, REPORT_SCHEMA, schema

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "digits_cnn.onnx")


def _validator(path):
    return jsonschema.Draft202012Validator(json.loads(path.read_text()))


def test_the_shipped_recipe_schema_is_the_one_the_cli_generates():
    assert json.loads(RECIPE_SCHEMA.read_text()) == json.loads(json.dumps(schema(_optimize_parser())))
    jsonschema.Draft202012Validator.check_schema(json.loads(RECIPE_SCHEMA.read_text()))
    jsonschema.Draft202012Validator.check_schema(json.loads(REPORT_SCHEMA.read_text()))


@pytest.mark.parametrize("kwargs", [
    {"method": "auto", "rank": "0.5", "max_error": None, "verify": False},
    {"method": "auto", "rank": "0.5", "batch": 3},
    {"metric": "rel_l2", "max_drop": 0.5, "batch": 3},
])
def test_real_reports_match_the_report_schema(tmp_path, kwargs):
    _, report = optimize(tiny_cnn(), latency_cache=str(tmp_path / "l.json"), **kwargs)
    data = json.loads(report.to_json())
    _validator(REPORT_SCHEMA).validate(data)
    assert data["onnxlr_version"]


def test_a_written_recipe_validates_and_replays(tmp_path):
    run = [sys.executable, "-m", "onnxlr", "optimize", EXAMPLE]
    first = subprocess.run(run + ["a.onnx", "--rank", "0.5", "--max-error", "none", "--no-verify",
                                  "--exclude", "*classifier*", "--write-recipe", "r.json", "-q"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    recipe = json.loads((tmp_path / "r.json").read_text())
    _validator(RECIPE_SCHEMA).validate(recipe)
    assert recipe["rank"] == "0.5" and recipe["max_error"] is None
    assert recipe["exclude"] == ["*classifier*"]
    again = subprocess.run(run + ["b.onnx", "--recipe", "r.json", "-q"], capture_output=True,
                           text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # the command line wins over the recipe
    third = subprocess.run(run + ["c.onnx", "--recipe", "r.json", "--rank", "0.25", "-q"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert third.returncode == 0 and (tmp_path / "c.onnx").read_bytes() != (tmp_path / "a.onnx").read_bytes()


@pytest.mark.parametrize("content, message", [
    ("{", "not readable JSON"),
    ("[1]", "expected a JSON object"),
    ('{"rank_multipel": 8}', "unknown option 'rank_multipel'"),
    ('{"include": "a*"}', "include must be a list of strings"),
    ('{"no_verify": "yes"}', "no_verify must be true or false"),
])
def test_bad_recipes_are_one_line(tmp_path, content, message):
    (tmp_path / "r.json").write_text(content)
    proc = subprocess.run([sys.executable, "-m", "onnxlr", "optimize", EXAMPLE, "o.onnx",
                           "--recipe", "r.json"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()
