"""Every file a command reads and every file it writes, checked before any work starts.

Two promises live here. No file onnxlr reads may be a file it writes: not the model,
not its external-data files, not the ``--inputs``/``--calib`` data (a folder's members
too), the latency cache or a metric plug-in; and no two outputs may be the same file.
And a bad output path (a missing or unwritable folder, a folder, ``newdir/``) is
refused before minutes of work, not after the model was written. Every output path
of a run is known up front: ``-o`` and its ``.data``, the ``.rejected.onnx`` twin and
its ``.data``, the reports.
"""
from __future__ import annotations

import os
from pathlib import Path

from onnxlr.errors import OnnxlrError

__all__ = ["check_output", "check_paths", "model_files", "rejected_path"]


def rejected_path(output: Path) -> Path:
    """Where ``--on-exceed fail`` writes a result that missed its bound."""
    return output.with_name(output.stem + ".rejected" + (output.suffix or ".onnx"))


def model_files(path: str | os.PathLike) -> list[Path]:
    """The model file and the external-data files it names (those that resolve safely).

    A model that cannot be parsed here is left to :func:`onnxlr.io.load_model`, which
    says why; only its own file is returned then.
    """
    import onnx
    from onnx import external_data_helper

    from onnxlr import io, validate
    from onnxlr.arrays import check_regular

    path = Path(path)
    files = [path]
    try:
        st = check_regular(path, "model")
        if st.st_size > io.PROTOBUF_LIMIT:
            return files
        model = onnx.ModelProto()
        model.ParseFromString(path.read_bytes())
    except Exception:  # noqa: BLE001 - any problem is load_model's to report
        return files
    for tensor in validate.all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            try:
                files.append(io.check_external_location(location, path.parent, what=str(path)))
            except OnnxlrError:
                pass  # load_model refuses it with the reason
    return list(dict.fromkeys(files))


def data_files(path: str | os.PathLike) -> list[Path]:
    """An inputs/calibration path and, for a folder, every file in it."""
    path = Path(path)
    if path.is_dir():
        return [path, *(p for p in sorted(path.iterdir()) if not p.is_dir())]
    return [path]


def check_output(path: str | os.PathLike, what: str) -> Path:
    """Refuse an output path that cannot be written as a file: one line naming it."""
    text = os.fspath(path)
    if not text:
        raise OnnxlrError(f"{what}: empty path")
    if "\0" in text:
        raise OnnxlrError(f"{what} {text!r}: contains a NUL byte")
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise OnnxlrError(f"{what} {text}: is a folder; give a file name")
    out = Path(text)
    folder = out.parent
    if not folder.exists():
        raise OnnxlrError(f"{what} {text}: folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise OnnxlrError(f"{what} {text}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxlrError(f"{what} {text}: folder {str(folder)!r} is not writable")
    if len(out.name.encode()) > _name_max(folder):
        raise OnnxlrError(f"{what} {text}: file name too long")
    return out


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _same(a: Path, b: Path) -> bool:
    from onnxlr.io import same_file
    return same_file(a, b)


def check_paths(reads: list[tuple[str, Path]], writes: list[tuple[str, str | Path]]) -> None:
    """Every write a writable file that is neither a read nor another write.

    Args:
        reads: (what, path) of every file the command reads.
        writes: (what, path) of every file it may write, companions (``.data``,
            ``.rejected.onnx``) included.
    """
    writes = [(what, check_output(path, what)) for what, path in writes]
    for what, path in writes:
        for read_what, read in reads:
            if _same(path, read):
                raise OnnxlrError(f"{what} {path} is {read_what} {read}, which onnxlr reads; "
                                  f"refusing to overwrite it (choose another path)")
    for i, (what, path) in enumerate(writes):
        for other_what, other in writes[:i]:
            if _same(path, other):
                raise OnnxlrError(f"{what} {path} is also {other_what}: two outputs cannot "
                                  f"be one file")


def _plugin_file(metric) -> Path | None:
    if isinstance(metric, str) and ":" in metric and metric.rsplit(":", 1)[0].endswith(".py"):
        return Path(metric.rsplit(":", 1)[0])
    return None


def check_optimize(model: str, output: str, reports=(), *, inputs=None, calib=None,
                   latency_cache=None, metric=None, evaluate=None) -> list[Path]:
    """``optimize``'s reads and writes, checked; returns the files read (never to be written).

    Raises:
        OnnxlrError: a write onto a read, two outputs on one file, or an output that cannot
            be written (see :func:`check_output`).
    """
    reads = [("the input model" if i == 0 else "the input's external data", p)
             for i, p in enumerate(model_files(model))]
    reads += [("the --inputs file", p) for p in data_files(inputs)] if inputs else []
    reads += [("--calib data", p) for p in data_files(calib)] if isinstance(calib, str) else []
    reads += [("the --eval file", p) for p in data_files(evaluate)] if evaluate else []
    if latency_cache:
        reads.append(("the --latency-cache", Path(latency_cache)))
    plugin = _plugin_file(metric)
    if plugin is not None:
        reads.append(("the --metric plug-in", plugin))
    out = check_output(output, "-o")
    rejected = rejected_path(out)
    writes = [("-o", out), ("-o's external data", out.with_name(out.name + ".data")),
              ("-o's .rejected.onnx", rejected),
              ("-o's .rejected.onnx data", rejected.with_name(rejected.name + ".data"))]
    writes += [("--report", p) for p in reports]  # as given: 'r.md/' names a folder
    check_paths(reads, writes)
    return [p for _, p in reads]


def check_bench(models, inputs=None, outputs=()) -> list[Path]:
    """``bench``'s reads (models, their data, ``--inputs``) and writes (``--json``,
    ``--markdown``), checked; returns the files read."""
    reads = [("a model" if i == 0 else "the external data of model " + str(m), p)
             for m in models for i, p in enumerate(model_files(m))]
    reads += [("the --inputs file", p) for p in data_files(inputs)] if inputs else []
    writes = [(what, p) for what, p in outputs if p]
    check_paths(reads, writes)
    return [p for _, p in reads]
