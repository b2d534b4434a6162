"""Magika's file-type classifier (``standard_v3_3``) on real files of this machine.

The model comes out of the ``magika`` wheel (Apache-2.0); magika itself is never
installed. Its input is 2048 byte values: the first 1024 bytes of the file's
first 4096 after stripping leading whitespace, then the last 1024 of its last
4096 after stripping trailing whitespace, padded with token 256. That
preprocessing is reimplemented here in numpy, following
``magika/magika.py`` (``_extract_features_from_seekable``,
``_get_beg_ints_with_padding``, ``_get_end_ints_with_padding``,
``_get_raw_predictions``) of magika 1.0.3 and its ``config.min.json``.

Files are real ones on this machine (the Python standard library, this
interpreter's site-packages, ``/usr/share``); the label a file *should* get is
the content type whose extension list (``content_types_kb.min.json``) is the
only one in the model's label space to claim the file's extension. Accuracy is
the raw model's top-1 label against that, before magika's thresholds and
overwrite map; agreement is top-1 agreement with the original model.
"""
from __future__ import annotations

import json
import os
import sysconfig
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.real.base import Task, extract, fetch_wheel, sha256, top1_accuracy, top1_agreement

NAME = "magika"
VERSION = "1.0.3"
PLATFORM = "manylinux_2_28_x86_64"  # the wheels are per platform; the model in each is the same
MODEL = "magika/models/standard_v3_3"
SEED = 0
#: whitespace that Python's ``bytes.strip()`` removes, as magika relies on it
WHITESPACE = b" \t\n\r\x0b\x0c"


def features(head: bytes, tail: bytes, size: int, config: dict) -> np.ndarray:
    """Model input for one file: ``beg_size`` + ``end_size`` int32 tokens.

    Args:
        head: the first ``min(block_size, size)`` bytes of the file.
        tail: the last ``min(block_size, size)`` bytes of the file.
        size: file size in bytes (magika reads ``min(block_size, size)`` from each end).
        config: the model's ``config.min.json`` (beg_size, end_size, padding_token, block_size).
    """
    n = min(config["block_size"], size)
    beg = head[:n].lstrip(WHITESPACE)[:config["beg_size"]]
    end = tail[-n:].rstrip(WHITESPACE) if n else b""
    end = end[len(end) - config["end_size"]:] if len(end) > config["end_size"] else end
    pad = config["padding_token"]
    out = np.full(config["beg_size"] + config["end_size"], pad, dtype=np.int32)
    out[:len(beg)] = np.frombuffer(beg, dtype=np.uint8)
    if end:
        out[len(out) - len(end):] = np.frombuffer(end, dtype=np.uint8)
    return out


def file_features(path: Path, config: dict) -> np.ndarray | None:
    """Features of a file, or None where magika would not run the model on it
    (fewer than ``min_file_size_for_dl`` meaningful bytes)."""
    size = path.stat().st_size
    if size < config["min_file_size_for_dl"]:
        return None
    n = min(config["block_size"], size)
    with open(path, "rb") as fh:
        head = fh.read(n)
        fh.seek(size - n)
        tail = fh.read(n)
    feats = features(head, tail, size, config)
    if feats[config["min_file_size_for_dl"] - 1] == config["padding_token"]:
        return None
    return feats


def extension_labels(kb: dict, labels: list[str]) -> dict[str, str]:
    """Extension → label, for extensions that exactly one label of the model claims."""
    claims: dict[str, set] = defaultdict(set)
    for label, info in kb.items():
        if label in labels:
            for ext in info.get("extensions", []):
                claims[ext.lower()].add(label)
    return {ext: next(iter(ls)) for ext, ls in claims.items() if len(ls) == 1}


def find_files(roots: list[Path], ext_labels: dict[str, str], *, max_files: int = 300000):
    """(path, label) for regular files under ``roots`` whose extension has a label, sorted."""
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fname in sorted(filenames):
                ext = fname.rsplit(".", 1)[-1].lower() if "." in fname else None
                label = ext_labels.get(ext)
                path = Path(dirpath) / fname
                if label is None or path.is_symlink() or not path.is_file():
                    continue
                found.append((path, label))
                if len(found) >= max_files:
                    return found
    return found


def choose(found: list, per_label: int, total: int, seed: int) -> list:
    """Up to ``per_label`` files of each label (seeded draw), at most ``total`` in all."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list] = defaultdict(list)
    for path, label in found:
        by_label[label].append(path)
    picked = []
    for label in sorted(by_label):
        paths = by_label[label]
        idx = rng.permutation(len(paths))[:per_label]
        picked += [(paths[i], label) for i in sorted(idx)]
    order = rng.permutation(len(picked))[:total]
    return [picked[i] for i in sorted(order)]


def roots() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(paths["stdlib"]), Path(paths["purelib"]), Path("/usr/share")]


#: Calibration files drawn before the test files (the rest, if any, after them).
FIRST_CALIB = 64
#: Calibration files in all. The search judges on half of them, and a drop is resolved to
#: one file in that half: with 205 files (102 judged), one flipped file was a 1-point drop,
#: so no change to a layer could ever pass a 1-point bound with confidence.
CALIB_FILES = 1024
#: Files of each type the second draw may add (the test files hold at most 8 of each).
EXTRA_PER_LABEL = 16


def prepare(cache: Path, quick: bool = False) -> Task:
    wheel = fetch_wheel("magika", VERSION, cache, platform=PLATFORM)
    folder = cache / NAME
    model = extract(wheel, f"{MODEL}/model.onnx", folder / "model.onnx")
    config = json.loads(extract(wheel, f"{MODEL}/config.min.json", folder / "config.min.json")
                        .read_text())
    kb = json.loads(extract(wheel, "magika/config/content_types_kb.min.json",
                            folder / "content_types_kb.min.json").read_text())
    labels = config["target_labels_space"]
    index = {label: i for i, label in enumerate(labels)}
    found = find_files(roots(), extension_labels(kb, labels))
    n_eval, n_calib = (64, 16) if quick else (200, CALIB_FILES)
    first = min(n_calib, FIRST_CALIB)
    # the same files and test split as the earlier runs (64 calibration files drawn first);
    # further calibration files come from the files those runs did not use, and then from a
    # second draw of files none of them used (up to EXTRA_PER_LABEL more of each type)
    chosen = choose(found, per_label=8, total=10 * (n_eval + first), seed=SEED)
    used = {path for path, _ in chosen}
    extra = choose([(p, lab) for p, lab in found if p not in used], per_label=EXTRA_PER_LABEL,
                   total=n_calib, seed=SEED + 2) if not quick else []
    rows, names, truth = [], [], []

    def read(pairs) -> None:
        for path, label in pairs:
            try:
                feats = file_features(path, config)
            except OSError:
                continue
            if feats is not None:
                rows.append(feats)
                names.append(str(path))
                truth.append(index[label])

    read(chosen)
    n_first = len(rows)  # rows from the first draw (the test split is drawn from these only)
    read(extra)
    order = np.random.default_rng(SEED + 1).permutation(n_first)
    eval_idx = np.sort(order[first:first + n_eval])
    calib_idx = np.concatenate([order[:first], order[first + n_eval:],
                                np.arange(n_first, len(rows))])[:n_calib]
    x, y = np.stack(rows), np.asarray(truth)
    test_y = y[eval_idx]

    def score(outputs: list[dict]) -> float:
        return float(np.mean(outputs[0]["target_label"].argmax(1) == test_y))

    counts = defaultdict(int)
    for i in eval_idx:
        counts[labels[y[i]]] += 1
    return Task(
        name=NAME, title=f"Magika {VERSION} file-type classifier (standard_v3_3)",
        source=f"magika=={VERSION} wheel ({PLATFORM}), {MODEL}/model.onnx, Apache-2.0",
        model_path=model, calib={"bytes": x[calib_idx]}, evaluate=[{"bytes": x[eval_idx]}],
        timing={"bytes": x[eval_idx[:1]]}, metric="accuracy vs extension", score=score,
        agree=lambda r, c: top1_agreement(r, c, "target_label"),
        calib_labels=y[calib_idx], labelled=lambda out, lab: top1_accuracy(out, lab, "target_label"),
        agreement="top-1 agreement with the original",
        notes=[f"{len(eval_idx)} real files ({len(counts)} types, at most 8 each) from the Python "
               f"stdlib, site-packages and /usr/share, labelled by extension; {len(calib_idx)} other "
               f"files for calibration; timed at batch 1 (one file: ~0.3 GMAC)",
               "the files depend on the machine: their list and digests are in the JSON"],
        info={"model_sha256": sha256(model), "candidates": len(found),
              "evaluate": int(len(eval_idx)), "calib": int(len(calib_idx)),
              "types": dict(sorted(counts.items())),
              "files": [[names[i], labels[y[i]]] for i in eval_idx]})
