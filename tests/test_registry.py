"""One door for methods: a new method is one class and one register() line, and the CLI help,
the size limits, the factorise pass and the search all see it without other edits."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest

from conftest import matmul_model, ort_run
from onnxlr import methods
from onnxlr.methods.base import Factors, Method, constant, detach, new_node
from onnxlr.pipeline import optimize


class ToyRankK(Method):
    """A toy: MatMul → two MatMuls from numpy's SVD at the rule's rank (no rounding)."""

    name = "toy"
    kinds = frozenset({"matmul"})
    help = "toy rank-k split (a test method)"
    max_elements = 10_000

    def choose_ranks(self, site, selector, multiple):
        s = np.linalg.svd(site.matrix.astype(np.float64), compute_uv=False)
        return (max(1, int(selector.select(s, *site.matrix.shape))),)

    def full_ranks(self, site):
        return (min(site.matrix.shape),)

    def cost(self, site, ranks):
        (k,), (m, n) = ranks, site.matrix.shape
        return k * (m + n), k * (m + n) * site.out_positions

    def decompose(self, site, ranks):
        u, s, vt = np.linalg.svd(site.matrix.astype(np.float64), full_matrices=False)
        k = ranks[0]
        a, b = u[:, :k] * s[:k], vt[:k]
        return Factors((a, b), float(np.linalg.norm(site.matrix - a @ b) / np.linalg.norm(site.matrix)))

    def build(self, graph: gs.Graph, site, factors, names):
        a, b = factors.arrays
        x, y = detach(site)
        dtype = site.weight.dtype
        h = new_node(graph, names, f"{site.name}/toy/a", "MatMul",
                     [x, constant(names, "toy_a", a, dtype)], {}, None, dtype)
        new_node(graph, names, f"{site.name}/toy/b", "MatMul",
                 [h, constant(names, "toy_b", b, dtype)], {}, y, dtype)


@pytest.fixture
def toy():
    methods.register(ToyRankK)
    yield ToyRankK
    methods.METHODS.pop("toy")


def test_a_registered_method_is_used_described_and_bounded(toy, rng):
    w = rng.standard_normal((40, 30)).astype(np.float32)
    model = matmul_model(w, (6, 40))
    out, report = optimize(model, "toy", "4", max_error=None, verify=False)
    (rec,) = report.records
    assert rec.status == "factorised" and rec.method == "toy" and rec.ranks == (4,)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    expected = x.astype(np.float64) @ (u[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)
    from onnxlr.cli import build_parser
    helptext = build_parser()._subparsers._group_actions[0].choices["optimize"].format_help()
    assert "toy: toy rank-k split (a test method) [matmul]" in " ".join(helptext.split())
    big = matmul_model(rng.standard_normal((200, 100)).astype(np.float32), (2, 200))
    _, report = optimize(big, "toy", "4", max_error=None, verify=False)
    assert "over the toy limit of 10000" in report.records[0].reason


def test_register_refuses_a_method_without_kinds():
    class Nameless(ToyRankK):
        kinds = frozenset()
    with pytest.raises(Exception, match="needs a name and kinds"):
        methods.register(Nameless)
