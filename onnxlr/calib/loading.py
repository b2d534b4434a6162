"""Calibration sets: reading and validating them, and iterating over their batches.

What a data-aware method learns from is only as good as the samples it is fed, so every
file or feed dict is checked against the model before anything runs, and a set is read
lazily: memory holds one file plus one batch, whatever the set's size.

API (others code against it; add, do not break):

``load_calibration(source, model, *, max_samples=None, batch_size=16) -> Calibration``
    ``source`` is a ``.npz`` (one array per graph input name, first axis =
    samples; other keys such as an integer ``label`` are kept aside), a folder
    of ``.npy``/``.npz`` files (sorted by name; each ``.npz`` as above; a
    ``.npy`` named ``<input>.npy`` holds that input's samples, and for a
    single-input model any other ``.npy`` holds samples of that input, or one
    sample if it lacks the sample axis), an iterable of feed dicts (each a
    batch, first axis = samples), or a :class:`Calibration`. Every file / feed
    dict is validated against the model inputs (names, rank, fixed dims,
    dtype kind; floats are cast to the input's float type) with a one-line
    :class:`OnnxlrError` naming the file or dict and the input. Files are read
    once to validate and again, one at a time, while iterating: memory holds
    one file plus one batch. A one-shot iterator is materialised (up to
    ``max_samples``), a list is not copied.

``Calibration``
    Iterating yields feed dicts of ``batch_size`` samples (the last may be
    smaller; a model whose batch dim is fixed gets exactly that many and a
    remainder is dropped). ``num_samples``, ``num_batches``, ``input_names``,
    ``labels()`` (the ``label`` arrays, or None), ``gather()`` (every sample's inputs and
    labels in one dict, one read of the files), ``split(n)`` (first samples,
    last ``n`` samples held out), ``head(n)``.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from onnxlr.arrays import check_regular, load_npy, load_npz
from onnxlr.errors import OnnxlrError
from onnxlr.graph import feedable_inputs

logger = logging.getLogger(__name__)

__all__ = ["LABEL", "Calibration", "load_calibration"]

LABEL = "label"


@dataclass(frozen=True)
class _Input:
    """A feedable graph input: name, numpy dtype and dims (None where dynamic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...] | None


@dataclass
class _Chunk:
    """One file or feed dict: where it came from, how to (re)load it, how many samples."""

    origin: str
    load: Callable[[], dict[str, np.ndarray]]
    count: int


def _model_inputs(model: onnx.ModelProto) -> list[_Input]:
    out = []
    for vi in feedable_inputs(model):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise OnnxlrError(f"input {vi.name!r} is not a tensor: cannot feed calibration data")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in tt.shape.dim)
        out.append(_Input(vi.name, dtype, dims))
    if not out:
        raise OnnxlrError("the model has no inputs to feed calibration data to")
    return out


def _validate(arrays: dict[str, Any], inputs: list[_Input], origin: str) -> dict[str, np.ndarray]:
    """The chunk's input arrays, checked and cast; extra keys dropped except ``label``."""
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise OnnxlrError(f"calibration {origin} lacks input(s) {', '.join(map(repr, missing))}; "
                          f"it has {', '.join(map(repr, arrays)) or '(nothing)'}")
    out: dict[str, np.ndarray] = {}
    count = None
    for inp in inputs:
        arr = np.asarray(arrays[inp.name])
        if arr.dtype.kind != inp.dtype.kind and not (arr.dtype.kind in "iu" and inp.dtype.kind in "iu"):
            raise OnnxlrError(f"calibration {origin}: {inp.name!r} is {arr.dtype} but the model "
                              f"expects {inp.dtype}")
        if inp.dims is not None:
            if arr.ndim != len(inp.dims):
                raise OnnxlrError(f"calibration {origin}: {inp.name!r} has shape {arr.shape}, the "
                                  f"model expects rank {len(inp.dims)} (first axis = samples)")
            for axis in range(1, arr.ndim):
                want = inp.dims[axis]
                if want is not None and arr.shape[axis] != want:
                    raise OnnxlrError(f"calibration {origin}: {inp.name!r} has shape {arr.shape}, "
                                      f"the model fixes dim {axis} to {want}")
        if arr.ndim == 0:
            raise OnnxlrError(f"calibration {origin}: {inp.name!r} is a scalar; the first axis "
                              f"must count samples")
        if count is not None and arr.shape[0] != count:
            raise OnnxlrError(f"calibration {origin}: inputs have different sample counts "
                              f"({count} and {arr.shape[0]} for {inp.name!r})")
        count = arr.shape[0]
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            sample = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise OnnxlrError(f"calibration {origin}: {inp.name!r} holds NaN or infinite "
                              f"values (first in sample {sample}); calibration data must be "
                              f"finite")
        out[inp.name] = arr.astype(inp.dtype, copy=False)
    label = arrays.get(LABEL)
    if label is not None and LABEL not in names:
        label = np.asarray(label)
        if label.ndim == 1 and label.shape[0] == count and label.dtype.kind in "iu":
            out[LABEL] = label
    return out


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    return load_npz(path, "calibration file")  # headers checked before anything is allocated


def _read_npy(path: Path) -> np.ndarray:
    return load_npy(path, "calibration file")


def _file_chunk(loader: Callable[[], dict[str, np.ndarray]], inputs: list[_Input],
                origin: str) -> _Chunk:
    first = _validate(loader(), inputs, origin)  # read once now: errors surface at load time
    count = next(iter(first.values())).shape[0]
    del first
    return _Chunk(origin, lambda: _validate(loader(), inputs, origin), count)


def _folder_chunks(folder: Path, inputs: list[_Input]) -> list[_Chunk]:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".npz") and not p.is_dir())
    if not files:
        raise OnnxlrError(f"calibration folder {folder} has no .npy or .npz files")
    names = {i.name for i in inputs}
    chunks = []
    named = {p.stem: p for p in files if p.suffix == ".npy" and p.stem in names}
    if named:  # <input>.npy files together form one chunk
        def load_named() -> dict[str, np.ndarray]:
            return {stem: _read_npy(p) for stem, p in named.items()}
        chunks.append(_file_chunk(load_named, inputs, f"folder {folder} (<input>.npy files)"))
    for path in files:
        if path.suffix == ".npz":
            chunks.append(_file_chunk(lambda p=path: _read_npz(p), inputs, f"file {path}"))
        elif path.stem not in named:
            if len(inputs) != 1:
                raise OnnxlrError(f"calibration file {path}: a model with several inputs needs "
                                  f".npz files or one <input>.npy per input "
                                  f"({', '.join(sorted(names))})")
            chunks.append(_file_chunk(lambda p=path: {inputs[0].name: _one_sample(_read_npy(p),
                                                                                  inputs[0])},
                                      inputs, f"file {path}"))
    return chunks


def _one_sample(arr: np.ndarray, inp: _Input) -> np.ndarray:
    """A lone sample (rank one less than the input) gets its sample axis."""
    if inp.dims is not None and arr.ndim == len(inp.dims) - 1:
        return arr[None]
    return arr


def _iterable_chunks(source: Iterable, inputs: list[_Input], max_samples: int | None) -> list[_Chunk]:
    chunks, total = [], 0
    for i, feeds in enumerate(source):
        origin = f"feed dict #{i}"
        if not isinstance(feeds, dict):
            raise OnnxlrError(f"calibration {origin} is a {type(feeds).__name__}, not a dict of "
                              f"arrays keyed by input name")
        arrays = _validate(feeds, inputs, origin)
        count = next(iter(arrays.values())).shape[0]
        chunks.append(_Chunk(origin, lambda a=arrays: a, count))
        total += count
        if max_samples is not None and total >= max_samples:
            break
    return chunks


class Calibration:
    """A validated calibration set: iterable over feed dicts of ``batch_size`` samples.

    Build it with :func:`load_calibration`. Iteration re-reads files one at a
    time, so it can be repeated and holds one file and one batch at most.
    """

    def __init__(self, chunks: list[_Chunk], inputs: list[_Input], batch_size: int,
                 start: int = 0, stop: int | None = None, description: str = ""):
        self._chunks, self._inputs = chunks, inputs
        total = sum(c.count for c in chunks)
        self.start, self.stop = start, min(total if stop is None else stop, total)
        fixed = {i.dims[0] for i in inputs if i.dims and i.dims[0] is not None}
        self.fixed_batch = fixed.pop() if len(fixed) == 1 else None
        self.batch_size = self.fixed_batch or max(1, int(batch_size))
        self.description = description

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._inputs]

    @property
    def num_samples(self) -> int:
        n = max(0, self.stop - self.start)
        return n - n % self.fixed_batch if self.fixed_batch else n

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def _pieces(self) -> Iterator[dict[str, np.ndarray]]:
        """Each chunk's slice that lies in [start, stop), in order."""
        offset = 0
        for chunk in self._chunks:
            lo, hi = max(self.start - offset, 0), min(self.stop - offset, chunk.count)
            if lo < hi:
                arrays = chunk.load()
                yield {k: v[lo:hi] for k, v in arrays.items()}
            offset += chunk.count
            if offset >= self.stop:
                return

    def _batches(self, with_labels: bool) -> Iterator[dict[str, np.ndarray]]:
        buffer: list[dict[str, np.ndarray]] = []
        buffered, remaining = 0, self.num_samples

        def key(piece: dict) -> tuple:
            return tuple(piece[n].shape[1:] for n in self.input_names)

        def flush(n: int) -> dict[str, np.ndarray]:
            nonlocal buffer, buffered
            names = self.input_names + ([LABEL] if with_labels else [])
            if with_labels and not all(LABEL in p for p in buffer):
                names = self.input_names
            joined = {k: np.concatenate([p[k] for p in buffer]) if len(buffer) > 1 else buffer[0][k]
                      for k in names}
            out = {k: v[:n] for k, v in joined.items()}
            rest = {k: v[n:] for k, v in joined.items()}
            buffered -= n
            buffer = [rest] if buffered else []
            return out

        for piece in self._pieces():
            if buffer and key(piece) != key(buffer[0]):
                # shapes changed (dynamic dims): a batch cannot mix them
                while buffered and remaining > 0:
                    n = min(buffered, self.batch_size, remaining)
                    if self.fixed_batch and n < self.fixed_batch:
                        break
                    remaining -= n
                    yield flush(n)
                buffer, buffered = [], 0
            buffer.append(piece)
            buffered += next(iter(piece.values())).shape[0]
            while buffered >= self.batch_size and remaining > 0:
                n = min(self.batch_size, remaining)
                remaining -= n
                yield flush(n)
        while buffered and remaining > 0:
            n = min(buffered, self.batch_size, remaining)
            remaining -= n
            yield flush(n)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._batches(with_labels=False)

    def labels(self) -> np.ndarray | None:
        """The integer ``label`` of every sample, when every file/dict has one; else None."""
        parts = []
        for batch in self._batches(with_labels=True):
            if LABEL not in batch:
                return None
            parts.append(batch[LABEL])
        return np.concatenate(parts) if parts else None

    def gather(self) -> dict[str, np.ndarray]:
        """Every sample in one dict: each input concatenated, and ``label`` when every
        file/dict has one; the files are read once (``labels()`` beside the inputs would read
        them twice)."""
        batches = list(self._batches(with_labels=True))
        names = self.input_names + ([LABEL] if batches and all(LABEL in b for b in batches)
                                    else [])
        return {k: np.concatenate([b[k] for b in batches]) for k in names}

    def _view(self, start: int, stop: int) -> "Calibration":
        return Calibration(self._chunks, self._inputs, self.batch_size, start, stop,
                           self.description)

    def head(self, n: int) -> "Calibration":
        """The first ``n`` samples."""
        return self._view(self.start, min(self.stop, self.start + max(0, n)))

    def split(self, holdout: int) -> tuple["Calibration", "Calibration"]:
        """(all but the last ``holdout`` samples, the last ``holdout`` samples)."""
        cut = max(self.start, self.stop - max(0, holdout))
        return self._view(self.start, cut), self._view(cut, self.stop)

    def __repr__(self) -> str:
        return (f"Calibration({self.num_samples} samples, batch {self.batch_size}, "
                f"inputs {self.input_names})")


def load_calibration(source: Any, model: onnx.ModelProto, *, max_samples: int | None = None,
                     batch_size: int = 16) -> Calibration:
    """Read and validate calibration inputs for ``model``; see the module docstring.

    Raises:
        OnnxlrError: unreadable or empty source, missing input, wrong rank, fixed dim or
            dtype kind (one line naming the file or feed dict and the input).
    """
    if isinstance(source, Calibration):
        return source if max_samples is None else source.head(max_samples)
    if max_samples is not None and max_samples < 1:
        raise OnnxlrError(f"invalid calibration max_samples {max_samples}: must be >= 1")
    inputs = _model_inputs(model)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            chunks = _folder_chunks(path, inputs)
        else:
            check_regular(path, "calibration data")  # a FIFO is refused, not waited on
            chunks = [_file_chunk(lambda: _read_npz(path), inputs, f"file {path}")]
        description = str(path)
    elif isinstance(source, dict):
        chunks = _iterable_chunks([source], inputs, max_samples)
        description = "a feed dict"
    elif isinstance(source, Iterable):
        chunks = _iterable_chunks(source, inputs, max_samples)
        description = "feed dicts"
    else:
        raise OnnxlrError(f"calibration source must be a .npz path, a folder or an iterable of "
                          f"feed dicts, not {type(source).__name__}")
    calib = Calibration(chunks, inputs, batch_size, 0, max_samples, description)
    if calib.num_samples == 0:
        raise OnnxlrError(f"calibration data {description} holds no samples"
                          + (f" (the model's batch dim is fixed to {calib.fixed_batch})"
                             if calib.fixed_batch else ""))
    logger.info("calibration: %d samples from %s, batches of %d", calib.num_samples, description,
                calib.batch_size)
    return calib
