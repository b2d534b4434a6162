"""The house's import rules, read from the source with ``ast`` (nothing is imported to check).

Two kinds of import are told apart: *module-level* ones run when the module is imported
(a ``try``/``if`` at module level included), *lazy* ones sit in a function or method and
run when it is called. A cycle of module-level imports breaks at import time in some order;
a cycle through lazy ones does not break, but it still ties two rooms into one. Both are
checked: module-level cycles with no exception, lazy ones against the known list below.

The root package is left out of the lazy graph: ``onnxlr/__init__.py`` imports nothing at
import time and hands ``onnxlr.optimize`` on to ``onnxlr.pipeline`` lazily, and every module
may read ``onnxlr.__version__`` from it.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxlr"

#: Lazy cycles that exist and are being removed elsewhere (report ⇄ html_report belongs to the
#: report room's rewrite). A new one fails the test; one that disappears is fine.
KNOWN_LAZY_CYCLES: set[frozenset[str]] = set()   # report ⇄ html_report is gone (formats.py)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The deepest onnxlr module a dotted name falls in (a ``from m import f`` names m.f)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(module-level, lazy) onnxlr modules that ``module`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top: set[str] = set()
    lazy: set[str] = set()

    def names(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        return [f"{base}.{a.name}" for a in node.names]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in names(child):
                    target = _resolve(name)
                    if target and target != module:
                        (lazy if in_function else top).add(target)
            elif isinstance(child, ast.If) and _type_checking(child.test):
                continue   # annotations only: never imported when the code runs
            else:
                visit(child, in_function or isinstance(
                    child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, lazy - top


IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_the_import_parser_sees_module_level_and_lazy_imports():
    top, lazy = IMPORTS["onnxlr.pipeline"]
    assert "onnxlr.passes.factorize" in top and "onnxlr.search.run" in lazy
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle_at_module_level():
    assert _cycles({m: top for m, (top, _) in IMPORTS.items()}) == []


def test_no_import_cycle_through_lazy_imports_beyond_the_known_ones():
    edges = {m: top | lazy for m, (top, lazy) in IMPORTS.items() if m != "onnxlr"}
    new = [sorted(c) for c in _cycles(edges) if frozenset(c) not in KNOWN_LAZY_CYCLES]
    assert new == []


#: Rooms that the flow reaches later: the rooms below them never import them, lazily or not.
UPPER = ("onnxlr.search", "onnxlr.pipeline", "onnxlr.cli", "onnxlr.report",
         "onnxlr.html_report", "onnxlr.charts", "onnxlr.benchmark", "onnxlr.recipe")
LOWER = ("onnxlr.errors", "onnxlr.escape", "onnxlr.records", "onnxlr.validate", "onnxlr.arrays",
         "onnxlr.io", "onnxlr.graph", "onnxlr.sites", "onnxlr.linalg", "onnxlr.rank",
         "onnxlr.methods", "onnxlr.passes", "onnxlr.runtime", "onnxlr.verify", "onnxlr.calib",
         "onnxlr.activations", "onnxlr.latency", "onnxlr.profiling")


def _within(module: str, rooms: tuple[str, ...]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in rooms)


def test_lower_rooms_never_import_upper_ones():
    reaching = {m: sorted(t for t in top | lazy if _within(t, UPPER))
                for m, (top, lazy) in IMPORTS.items() if _within(m, LOWER)}
    assert {m: t for m, t in reaching.items() if t} == {}


def test_linalg_is_numpy_only():
    """The numerics see arrays, never ONNX (``linalg/`` is tested without a model)."""
    for module, path in MODULES.items():
        if not _within(module, ("onnxlr.linalg",)):
            continue
        top, lazy = IMPORTS[module]
        assert all(_within(t, ("onnxlr.linalg", "onnxlr.errors")) for t in top | lazy), module
        text = path.read_text(encoding="utf-8")
        assert "import onnx" not in text and "onnxruntime" not in text, module


def test_inspect_imports_neither_onnxruntime_nor_the_search(tmp_path):
    """``onnxlr inspect`` reads a model and its layers: it must start without onnxruntime
    (slow to import, absent on a machine that only looks at models) or the search."""
    from conftest import tiny_cnn
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), str(path))
    code = ("import json, sys\n"
            "from onnxlr.cli import main\n"
            f"code = main(['inspect', {str(path)!r}])\n"
            "print(json.dumps([code, sorted(sys.modules)]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=tmp_path)
    code, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert code == 0
    heavy = [m for m in loaded if m == "onnxruntime" or m.startswith("onnxruntime.")
             or _within(m, ("onnxlr.search", "onnxlr.pipeline", "onnxlr.runtime",
                            "onnxlr.verify", "onnxlr.latency", "onnxlr.calib"))]
    assert heavy == []
