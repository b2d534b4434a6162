"""Per-layer records: what was done to each candidate layer and why.

The report is built from these records alone, never re-derived from graphs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

FACTORISED = "factorised"   # replaced by a chain of smaller layers (a low-rank method)
PRUNED = "pruned"           # channels removed (channel pruning, thin layers, a search's prune rung)
DECLINED = "declined"
REVERTED = "reverted"
#: the statuses of a layer that is different in the result
CHANGED = (FACTORISED, PRUNED)


class Declined(str):
    """Why a layer is not a candidate (``sites.find_site``) or why a method finds no useful
    ranks for it (``Method.choose_ranks``): the reason, as a person reads it.

    Callers tell a decline by ``isinstance(x, Declined)``, never by ``isinstance(x, str)``.
    It is a ``str`` subclass so that the reason reads as text wherever it is shown;
    ``reason`` is the plain string a ``LayerRecord.reason`` stores.
    """

    __slots__ = ()

    @property
    def reason(self) -> str:
        return str(self)


@dataclass
class LayerRecord:
    """One candidate layer (a Gemm, MatMul or Conv with a constant weight) and what happened
    to it: ``status`` is factorised (``ranks``, ``weight_error``), pruned (``kept_channels``,
    ``fit_error``), declined or reverted (``reason`` says why)."""

    name: str
    op: str
    kind: str | None = None          # gemm | matmul | conv1x1 | conv | rnn (LSTM/GRU/RNN input weights)
    weight_shape: tuple[int, ...] = ()
    method: str | None = None
    rank_rule: str | None = None
    ranks: tuple[int, ...] | None = None     # a low-rank method's ranks (None when pruned)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    weight_error: float | None = None    # relative Frobenius error of the weight (factorised)
    output_error: float | None = None    # model output rel. L2 error with only this layer changed
    status: str = DECLINED
    reason: str = ""
    seconds: float = 0.0
    # the layer timed alone at its real input shape (onnxlr.latency): original vs its
    # factorised chain, median ms, A/B interleaved
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    # ranks tried by a search, each {"ranks", "macs", "weight_error", "local_error",
    # "latency_ms", "chosen"}: the data behind error-vs-rank and speed-vs-error plots
    candidates: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    # a pruned layer's (last, after the positional fields above, which callers pass in order):
    # the channels its chain keeps, its input channels (channel pruning) or a thin layer's
    # outputs (the next layer's inputs), None unless channels were counted for pruning; and
    # the relative L2 error of the refit layer's output (the pruned layer; a thin layer's next
    # layer) on the samples it was fitted to, None when nothing was fitted (data-free)
    kept_channels: int | None = None
    fit_error: float | None = None

    @property
    def layer_speedup(self) -> float | None:
        if self.latency_before_ms and self.latency_after_ms:
            return self.latency_before_ms / self.latency_after_ms
        return None

    @property
    def factorised(self) -> bool:
        return self.status == FACTORISED

    @property
    def pruned(self) -> bool:
        return self.status == PRUNED

    @property
    def changed(self) -> bool:
        """The layer is different in the result: factorised or pruned."""
        return self.status in CHANGED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["ranks"] = list(self.ranks) if self.ranks is not None else None
        # in JSON a pruned layer's fields sit beside the factorised layer's ones
        after = {"ranks": "kept_channels", "weight_error": "fit_error"}
        out = {}
        for key, value in d.items():
            if key not in after.values():
                out[key] = value
                if key in after:
                    out[after[key]] = d[after[key]]
        return out
