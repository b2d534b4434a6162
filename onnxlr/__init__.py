"""onnxlr: make trained ONNX models smaller and faster after training.

Low-rank factorisation of Gemm, MatMul and Conv layers (truncated SVD,
Tucker-2, CP) on the ONNX graph itself, with ranks from a rule (fixed, ratio,
energy, VBMF) and every result checked against the original with ONNX Runtime.

>>> import onnxlr
>>> model, report = onnxlr.optimize("model.onnx", method="auto", rank="vbmf")  # doctest: +SKIP
>>> opts = onnxlr.OptimizeOptions(rank="energy:0.95", max_error=0.02)  # doctest: +SKIP
>>> model, report = onnxlr.optimize("model.onnx", opts, batch=4)  # doctest: +SKIP
"""
__version__ = "0.1.0"


def optimize(*args, **kwargs):
    """See :func:`onnxlr.pipeline.optimize` (imported lazily to keep ``import onnxlr`` light)."""
    from onnxlr.pipeline import optimize as _optimize
    return _optimize(*args, **kwargs)


def __getattr__(name: str):
    """``onnxlr.OptimizeOptions`` (:mod:`onnxlr.settings`), imported when first asked for."""
    if name == "OptimizeOptions":
        from onnxlr.settings import OptimizeOptions
        return OptimizeOptions
    raise AttributeError(f"module 'onnxlr' has no attribute {name!r}")


__all__ = ["OptimizeOptions", "__version__", "optimize"]
