"""Pure-math decompositions of weight tensors (numpy/scipy, no ONNX).

* :mod:`onnxlr.linalg.svd`: truncated SVD of a matrix (Fast R-CNN split).
* :mod:`onnxlr.linalg.tucker`: Tucker-2 of a conv kernel on its channel modes
  (HOSVD + HOOI; Kim et al. 2016).
* :mod:`onnxlr.linalg.cp`: CP of a conv kernel with bounded time and memory
  (compression + CP-ALS with line search; Lebedev et al. 2015).

All functions compute in float64 and return float64 arrays; callers cast.
"""
from onnxlr.linalg.cp import CP, cp_conv
from onnxlr.linalg.svd import relative_error, singular_values, truncated_svd
from onnxlr.linalg.tucker import Tucker2, tucker2, unfolding_singular_values

__all__ = ["CP", "cp_conv", "relative_error", "singular_values", "truncated_svd",
           "Tucker2", "tucker2", "unfolding_singular_values"]
