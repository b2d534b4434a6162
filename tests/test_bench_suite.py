"""Tests for the real-model benchmark suite's pure parts (bench/real, bench/suite.py).

Nothing here downloads or needs the ``bench`` extra: metrics, decoders and feature
extraction run on synthetic data against independent references, and the
RESULTS.md rendering runs on hand-made result dicts.
"""
from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest

from bench import suite
from bench.real import MODELS, base, ddddocr, digits_cnn, magika, nudenet, results

# --- detection metric (nudenet) -----------------------------------------------------------------


def _iou_ref(a, b):
    """One pair's IoU, written out in float64."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_iou_matches_pairwise_reference():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (7, 2))
    a = np.hstack([xy, xy + rng.uniform(1, 50, (7, 2))])
    xy = rng.uniform(0, 100, (5, 2))
    b = np.hstack([xy, xy + rng.uniform(1, 50, (5, 2))])
    got = nudenet.iou(a, b)
    ref = np.array([[_iou_ref(p, q) for q in b] for p in a])
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert nudenet.iou(a[:1], a[:1])[0, 0] == pytest.approx(1.0)
    assert nudenet.iou([[0, 0, 1, 1]], [[2, 2, 3, 3]])[0, 0] == 0.0


def test_nms_keeps_best_of_overlapping_and_disjoint_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 9]], float)
    scores = np.array([0.6, 0.9, 0.5, 0.3])
    keep = nudenet.nms(boxes, scores, 0.45)
    assert keep.tolist() == [1, 2]  # 0 and 3 overlap box 1 by more than 0.45


def _yolo_output(dets, anchors=20, classes=18):
    """A fake [4 + classes, anchors] output with the given (cx, cy, w, h, class, score) rows."""
    out = np.zeros((4 + classes, anchors), np.float32)
    out[4:, :] = 0.01
    for i, (cx, cy, w, h, cls, score) in enumerate(dets):
        out[:4, i] = (cx, cy, w, h)
        out[4 + cls, i] = score
    return out


def test_decode_thresholds_converts_and_suppresses():
    out = _yolo_output([(100, 100, 40, 20, 1, 0.9), (101, 100, 40, 20, 1, 0.8),  # duplicate
                        (200, 50, 10, 10, 12, 0.3), (10, 10, 5, 5, 3, 0.2)])       # below 0.25
    det = nudenet.decode(out)
    assert det["classes"].tolist() == [1, 12]
    np.testing.assert_allclose(det["scores"], [0.9, 0.3], rtol=1e-6)
    np.testing.assert_allclose(det["boxes"][0], [80, 90, 120, 110])
    det = nudenet.decode(_yolo_output([(315, 5, 20, 20, 0, 0.5)]))
    np.testing.assert_allclose(det["boxes"][0], [305, 0, 320, 15])  # clipped to the frame


def _det(boxes, classes, scores=None):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    scores = np.linspace(0.9, 0.5, len(boxes)) if scores is None else np.asarray(scores, float)
    return {"boxes": boxes, "classes": np.asarray(classes, int), "scores": scores}


def test_box_f1_counts_class_and_overlap():
    ref = _det([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2])
    assert nudenet.box_f1([ref], [ref]) == 1.0
    moved = _det([[0, 0, 10, 10], [24, 20, 34, 30]], [1, 2])  # second IoU 6/14 < 0.5
    assert nudenet.box_f1([ref], [moved]) == pytest.approx(2 * 1 / 4)
    wrong_class = _det([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 3])
    assert nudenet.box_f1([ref], [wrong_class]) == pytest.approx(0.5)
    extra = _det([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [1, 2, 2])
    assert nudenet.box_f1([ref], [extra]) == pytest.approx(2 * 2 / 5)
    # one candidate cannot match two references
    twice = _det([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 1])
    assert nudenet.match(twice, _det([[0, 0, 10, 10]], [1])) == 1
    empty = _det(np.zeros((0, 4)), [])
    assert nudenet.box_f1([empty], [empty]) == 1.0
    assert nudenet.box_f1([ref], [empty]) == 0.0


# --- OCR decoding (ddddocr) ------------------------------------------------------------------


def test_ctc_decode_collapses_repeats_and_drops_blank():
    charset = ["", "a", "b", "c"]
    assert ddddocr.ctc_decode(np.array([0, 1, 1, 0, 1, 2, 2, 2, 0, 0, 3]), charset) == "aabc"
    assert ddddocr.ctc_decode(np.array([], int), charset) == ""
    assert ddddocr.ctc_decode(np.array([9, 1]), charset) == "a"  # out-of-range index ignored


def test_decode_batch_reads_time_major_logits():
    charset = ["", "x", "y"]
    steps = [[1, 2], [1, 0], [0, 2], [2, 2]]  # [T, N] best indices
    logits = np.full((4, 2, 3), -5.0, np.float32)
    for t, row in enumerate(steps):
        for n, k in enumerate(row):
            logits[t, n, k] = 5.0
    assert ddddocr.decode_batch(logits, charset) == ["xy", "yy"]  # a blank separates repeats


def test_load_charset_reads_the_literal_without_running_the_file(tmp_path):
    marker = tmp_path / "ran"
    src = tmp_path / "charsets.py"
    src.write_text(f"open({str(marker)!r}, 'w')\nCHARSET_OLD = ['', 'z']\n"
                   "CHARSET_BETA = ['', 'é', '字']\n", encoding="utf-8")
    assert ddddocr.load_charset(src) == ["", "é", "字"]
    assert not marker.exists()


# --- byte features (magika) -----------------------------------------------------------------

CFG = {"beg_size": 16, "end_size": 16, "padding_token": 256, "block_size": 32,
       "min_file_size_for_dl": 8}


def _features_ref(content: bytes, cfg: dict) -> list[int]:
    """magika 1.0.3's list-based extraction, transcribed independently."""
    n = min(cfg["block_size"], len(content))
    beg = list(content[:n].lstrip())[:cfg["beg_size"]]
    beg += [cfg["padding_token"]] * (cfg["beg_size"] - len(beg))
    end = list(content[len(content) - n:].rstrip())[-cfg["end_size"]:]
    end = [cfg["padding_token"]] * (cfg["end_size"] - len(end)) + end
    return beg + end


@pytest.mark.parametrize("content", [
    b"hello", b"  \n\t  x  \r\n", b"abcdefghijklmnop" * 5, b" " * 40 + b"tail",
    b"\x00\x01\x02" * 13, b"head" + b" " * 50, bytes(range(256))])
def test_magika_features_match_reference(content):
    got = magika.features(content[:32], content[-32:], len(content), CFG)
    assert got.dtype == np.int32 and got.shape == (32,)
    assert got.tolist() == _features_ref(content, CFG)


def test_magika_file_features_on_files(tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"tiny")
    assert magika.file_features(small, CFG) is None  # under min_file_size_for_dl
    mostly_space = tmp_path / "space.txt"
    mostly_space.write_bytes(b" " * 30 + b"abc")
    assert magika.file_features(mostly_space, CFG) is None  # too few bytes after stripping
    big = tmp_path / "big.py"
    content = b"import os\n" * 20 + b"print(1)\n\n"
    big.write_bytes(content)
    assert magika.file_features(big, CFG).tolist() == _features_ref(content, CFG)


def test_extension_labels_drop_ambiguous_and_unknown_labels():
    kb = {"perl": {"extensions": ["pl", "pm"]}, "prolog": {"extensions": ["pl", "pro"]},
          "python": {"extensions": ["py", "PYI"]}, "other": {"extensions": ["oth"]}}
    assert magika.extension_labels(kb, ["perl", "prolog", "python"]) == {
        "pm": "perl", "pro": "prolog", "py": "python", "pyi": "python"}


def test_choose_is_seeded_and_capped(tmp_path):
    found = [(tmp_path / f"f{i}.{ext}", ext) for i in range(30) for ext in ("py", "json")]
    first = magika.choose(found, per_label=5, total=8, seed=3)
    assert first == magika.choose(found, per_label=5, total=8, seed=3)
    assert len(first) == 8
    assert all(sum(1 for _, lab in first if lab == ext) <= 5 for ext in ("py", "json"))


# --- wheels and the bundled model -----------------------------------------------------------


def test_extract_and_cached_wheel(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "some_pkg-1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("some_pkg/model.onnx", b"not really onnx")
    monkeypatch.setattr(base.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    assert base.fetch_wheel("some-pkg", "1.2", tmp_path) == wheel
    out = base.extract(wheel, "some_pkg/model.onnx", tmp_path / "x" / "m.onnx")
    assert out.read_bytes() == b"not really onnx"
    assert base.sha256(out) == hashlib.sha256(b"not really onnx").hexdigest()
    (tmp_path / "x" / "m.onnx").write_bytes(b"kept")
    assert base.extract(wheel, "some_pkg/model.onnx", out).read_bytes() == b"kept"  # once only


def test_fetch_wheel_reports_pip_failure(tmp_path, monkeypatch):
    class Proc:
        returncode, stderr = 1, "ERROR: No matching distribution found for nope==9"
    monkeypatch.setattr(base.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(RuntimeError, match="No matching distribution"):
        base.fetch_wheel("nope", "9", tmp_path)


def test_digits_task_splits_and_scores(tmp_path):
    task = digits_cnn.prepare(tmp_path)
    calib = np.load(digits_cnn.ROOT / "digits_calib.npz")["input"]
    np.testing.assert_array_equal(task.calib["input"], calib)  # training images, not test
    test = np.load(digits_cnn.ROOT / "digits_test.npz")["input"]
    assert not any(np.array_equal(c, t) for c in calib[:32] for t in test)
    n = task.evaluate[0]["input"].shape[0]
    assert n + digits_cnn.OLD_CALIB == 450
    labels = np.load(digits_cnn.ROOT / "digits_test.npz")["label"][digits_cnn.OLD_CALIB:]
    perfect = np.eye(10, dtype=np.float32)[labels]
    assert task.score([{"logits": perfect}]) == 1.0
    shifted = np.eye(10, dtype=np.float32)[(labels + 1) % 10]
    assert task.score([{"logits": shifted}]) == 0.0
    assert task.agree([{"logits": perfect}], [{"logits": shifted}]) == 0.0


# --- the suite and its results --------------------------------------------------------------


def test_output_error_against_float64_reference():
    rng = np.random.default_rng(1)
    ref = [{"y": rng.standard_normal((4, 3)).astype(np.float32),
            "label": np.array([1, 2, 3, 4])} for _ in range(2)]
    cand = [{"y": r["y"] + 0.01 * rng.standard_normal((4, 3)).astype(np.float32),
             "label": np.array([1, 2, 0, 4])} for r in ref]
    a = np.concatenate([r["y"] for r in ref]).astype(np.float64)
    b = np.concatenate([c["y"] for c in cand]).astype(np.float64)
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert suite.output_error(ref, cand) == pytest.approx(max(rel, 2 / 8), rel=1e-9)
    assert suite.output_error(ref, ref) == 0.0


def test_settings_follow_optimize_parameters():
    base_params = {"method", "rank", "rank_multiple", "max_error"}
    labels = [s for s, _ in suite.settings_for("digits_cnn", False, base_params)]
    assert "default" in labels and "cp 0.5" in labels
    assert "latency-aware" not in labels and "data-aware" not in labels
    labels = [s for s, _ in suite.settings_for("digits_cnn", False, base_params | {"accept", "calib"})]
    assert {"latency-aware", "data-aware"} <= set(labels)
    mlp = [s for s, _ in suite.settings_for("sklearn_mlp", False, base_params)]
    assert "tucker 0.5" not in mlp and "cp 0.5" not in mlp
    quick = [s for s, _ in suite.settings_for("nudenet", True, base_params | {"accept"})]
    assert set(quick) <= suite.QUICK
    assert set(MODELS) >= {"digits_cnn", "magika", "ddddocr", "nudenet", "sklearn_mlp"}


def _row(setting, bound, met, metric, speedup, layers=2, **kw):
    return {"setting": setting, "method": "auto", "rank": "vbmf", "rank_multiple": 1,
            "bound": bound, "bound_met": met, "layers": layers, "candidates": 5,
            "params_ratio": 0.5, "macs_ratio": 0.4, "speedup": speedup, "spread": 1.1,
            "efficiency": speedup * 0.4, "output_error": 0.03, "metric": metric,
            "agreement": 0.99, "seconds": 3.0, **kw}


def _result(name, rows, labels=True):
    return {"schema": results.SCHEMA, "name": name, "title": f"Model {name}", "source": "here",
            "metric": "accuracy" if labels else "box F1 vs original", "agreement": "top-1",
            "has_labels": labels, "notes": ["a note"], "info": {}, "quick": False,
            "date": "2026-01-02 03:04", "threads": 2, "rounds": 30, "seconds": 12.0,
            "machine": {"cpu": "Test CPU", "cores": 2, "onnxruntime": "1.0", "load_start": "1.0"},
            "baseline": {"metric": 0.95 if labels else None}, "rows": rows}


def test_best_safe_needs_bound_met_and_metric_kept():
    res = _result("m", [_row("unbounded fast", None, None, 0.95, 3.0),
                        _row("bound missed", 0.05, False, 0.95, 2.5),
                        _row("accuracy lost", 0.05, True, 0.90, 2.0),
                        _row("nothing changed", 0.05, True, 0.95, 1.9, layers=0),
                        _row("safe slow", 0.05, True, 0.95, 1.1),
                        _row("safe fast", 0.05, True, 0.945, 1.4),
                        {"setting": "broken", "error": "OnnxlrError: boom", "bound": 0.05}])
    assert results.best_safe(res)["setting"] == "safe fast"
    assert results.best_safe(_result("n", [_row("x", None, None, 0.95, 2.0)])) is None


def test_render_results_md(tmp_path):
    res = _result("m", [_row("default", 0.05, True, 0.95, 1.4),
                        _row("vbmf, no bound", None, None, 0.50, 3.0),
                        _row("missed", 0.05, False, 0.95, 1.0),
                        {"setting": "broken", "method": "cp", "rank": "0.5", "bound": None,
                         "error": "OnnxlrError: a|b"}])
    res["not_run"] = ["cp 0.5"]
    det = _result("d", [_row("default", 0.05, True, None, 1.2, agreement=0.97)], labels=False)
    (tmp_path / "vgg16.md").write_text("## VGG-16\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    text = results.render([res, det], results.read_fragments(tmp_path))
    assert text.startswith("# Results")
    assert "Test CPU, 2 cores" in text and "2 intra-op threads" in text
    assert "### Model m" in text and "### Model d" in text
    assert "| m | default | 2/5 | 0.400x | 1.40x | accuracy | 0.950 → 0.950 |" in text
    # agreement 0.97 < 1.0 - SAFE_DROP: not safe, the default row is shown with the reason
    assert "| d | no safe setting; default: task metric lost | 2/5 | 0.400x | 1.20x |" in text
    assert "| vbmf, no bound | auto | vbmf | none |" in text and "0.950 → 0.500" in text
    assert "0.05 (missed)" in text
    assert "error: OnnxlrError: a/b" in text  # a pipe would break the table
    assert "1.000 → 0.970" in text  # agreement-only metric: before is the original itself
    assert "- **not run** (the run was stopped before them): cp 0.5" in text
    assert "<!-- bench/results/vgg16.md -->\n## VGG-16\n\n| a | b |" in text
    header = next(line for line in text.splitlines() if line.startswith("| setting"))
    assert header.count("|") - 1 == len(results.COLUMNS)
    for line in text.splitlines():
        if line.startswith("| default | auto"):
            assert line.count("|") - 1 == len(results.COLUMNS)


def test_render_only_rewrites_results_from_json(tmp_path):
    import json
    folder = tmp_path / "results"
    folder.mkdir()
    res = _result("magika", [_row("default", 0.05, True, 0.95, 1.3)])
    (folder / "magika.json").write_text(json.dumps(res))
    (folder / "notes.md").write_text("## Notes\n")
    out = tmp_path / "RESULTS.md"
    assert suite.main(["--render-only", "--results", str(folder), "--out", str(out)]) == 0
    text = out.read_text()
    assert "### Model magika" in text and "| magika | default |" in text
    assert text.rstrip().endswith("## Notes")


def test_search_plugin_is_the_task_metric_on_calibration_labels(tmp_path):
    """With calibration labels the search is judged by the task metric against them (the
    issue's yardstick), not by agreement with the original; without, by the agreement."""
    task = digits_cnn.prepare(tmp_path)
    assert task.calib_labels is not None and len(task.calib_labels) == len(task.calib["input"])
    plugin = suite._task_metric(task)
    logits = np.eye(10, dtype=np.float32)[[1, 2, 3, 4]]
    wrong = np.eye(10, dtype=np.float32)[[1, 2, 0, 0]]
    labels = np.array([1, 2, 3, 4])
    assert plugin({"logits": logits}, {"logits": logits}, labels) == 1.0
    assert plugin({"logits": logits}, {"logits": wrong}, labels) == 0.5
    # a candidate that fixes an original's mistake scores higher, unlike agreement
    assert plugin({"logits": wrong}, {"logits": logits}, labels) == 1.0
    no_labels = base.Task(**{**task.__dict__, "calib_labels": None})
    agree = suite._task_metric(no_labels)
    assert agree({"logits": wrong}, {"logits": logits}) == 0.5


def test_setting_labels_keep_labels_that_hold_a_comma():
    assert suite.setting_labels("vbmf, no bound,auto 0.5,auto 0.25, bound") == {
        "vbmf, no bound", "auto 0.5", "auto 0.25, bound"}
    assert suite.setting_labels("search,nonsense") == {"search", "nonsense"}
