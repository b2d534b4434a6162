"""Recipes: every ``optimize`` option in a JSON file a pipeline keeps next to its model.

``onnxlr optimize model.onnx out.onnx --recipe r.json`` reads the options from ``r.json``;
options given on the command line win over the recipe's (lists such as ``include`` add up).
``--write-recipe used.json`` writes the options a run used, so it can be replayed. A recipe is
a JSON object whose keys are the long option names with ``_`` for ``-`` (``max_error``,
``layer_rank``, ``metric``, ``target_speedup``, ``provider``, …); the published JSON Schema is
``onnxlr/schemas/recipe.schema.json`` (generated from the CLI's own options, so the two cannot
drift; a test checks it). JSON rather than YAML: no extra dependency, and every JSON file is
also YAML.

A recipe is turned into command-line tokens and parsed by the same parser as the command
line, so every value gets the same checks and the same one-line error as a flag would.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from onnxlr.errors import OnnxlrError

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
RECIPE_SCHEMA = SCHEMA_DIR / "recipe.schema.json"
REPORT_SCHEMA = SCHEMA_DIR / "report.schema.json"
RECIPE_ID = "onnxlr.recipe/1"
#: Options that are about this run's files or terminal, not about how to optimise.
NOT_IN_RECIPES = {"help", "model", "output", "output_positional", "recipe", "write_recipe",
                  "report", "verbose", "quiet"}


def recipe_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The optimize subparser's options that a recipe may set, by key."""
    return {a.dest: a for a in parser._actions  # noqa: SLF001 (argparse has no public list)
            if a.dest not in NOT_IN_RECIPES and a.option_strings}


def _flag(action: argparse.Action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))


def _json_type(action: argparse.Action) -> dict:
    if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
        return {"type": "boolean"}
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001
        return {"type": "array", "items": {"type": "string"}}
    if action.choices:
        return {"enum": list(action.choices)}
    name = getattr(action.type, "__name__", "")
    if name == "integer":
        return {"type": ["integer", "null"]} if action.default is None else {"type": "integer"}
    if name == "number" or action.type is float:
        return {"type": ["number", "null"]}
    return {"type": ["string", "null"]}


def schema(parser: argparse.ArgumentParser) -> dict:
    """The recipe's JSON Schema (draft 2020-12), from the optimize subparser."""
    props = {"schema": {"const": RECIPE_ID}}
    for key, action in sorted(recipe_actions(parser).items()):
        props[key] = {**_json_type(action), "description": " ".join((action.help or "").split())}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": RECIPE_ID, "title": "onnxlr optimize recipe", "type": "object",
            "properties": props, "additionalProperties": False}


def to_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """Command-line tokens for the recipe at ``path``.

    Raises:
        OnnxlrError: unreadable or not JSON, not an object, an unknown key, or a value of
            the wrong kind (the parser then checks each value like a flag's).
    """
    if not os.path.isfile(path):
        raise OnnxlrError(f"recipe {path}: no such file")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise OnnxlrError(f"recipe {path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OnnxlrError(f"recipe {path}: expected a JSON object of options")
    if data.get("schema", RECIPE_ID) != RECIPE_ID:
        raise OnnxlrError(f"recipe {path}: schema {data['schema']!r} is not {RECIPE_ID}")
    actions = recipe_actions(parser)
    argv: list[str] = []
    for key, value in data.items():
        if key == "schema":
            continue
        action = actions.get(key)
        if action is None:
            raise OnnxlrError(f"recipe {path}: unknown option {key!r} (known: "
                              f"{', '.join(sorted(actions))})")
        flag = _flag(action)
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            if not isinstance(value, bool):
                raise OnnxlrError(f"recipe {path}: {key} must be true or false")
            argv += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):  # noqa: SLF001
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise OnnxlrError(f"recipe {path}: {key} must be a list of strings")
            for v in value:
                argv += [flag, v]
        elif value is None:  # the default, except where None means "off"
            argv += [flag, "none"] if key == "max_error" else []
        elif isinstance(value, (bool, dict, list)):
            raise OnnxlrError(f"recipe {path}: {key} must be a string or a number")
        else:
            argv += [flag, str(value)]
    return argv


def from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The options a run used, as a recipe (JSON-ready)."""
    out: dict = {"schema": RECIPE_ID}
    for key in sorted(recipe_actions(parser)):
        value = getattr(args, key, None)
        if isinstance(value, Path):
            value = str(value)
        out[key] = value
    return out
