"""Per-layer records: what was done to each candidate layer and why.

The report is built from these records alone, never re-derived from graphs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

FACTORISED = "factorised"
DECLINED = "declined"
REVERTED = "reverted"


@dataclass
class LayerRecord:
    """One candidate layer (a Gemm, MatMul or Conv with a constant weight)."""

    name: str
    op: str
    kind: str | None = None          # gemm | matmul | conv1x1 | conv
    weight_shape: tuple[int, ...] = ()
    method: str | None = None
    rank_rule: str | None = None
    ranks: tuple[int, ...] | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    weight_error: float | None = None    # relative Frobenius error of the weight
    output_error: float | None = None    # model output rel. L2 error with only this layer changed
    status: str = DECLINED
    reason: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def factorised(self) -> bool:
        return self.status == FACTORISED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["ranks"] = list(self.ranks) if self.ranks is not None else None
        return d
