"""Per-layer input statistics from calibration data, for data-aware factorisation.

Each candidate layer is a linear map of what it reads: a Gemm/MatMul of its
input rows, a conv of its input *patches* (im2col: S·k₁·…·k_d values per output
position, padding zeros included, stride and dilation applied). The data-aware
methods need only the second moment of those rows (:class:`LayerStats`), so
one pass of :func:`onnxlr.calib.capture` streams each batch through a reducer
and nothing else is kept: memory is O(d²) per layer whatever the sample count.
Conv patches are taken at ``max_positions`` random output positions per sample
(seeded); a Gram update costs rows·d² flops, which is the price to watch on
VGG-sized layers (d = 512·9 = 4608).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import weakref
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from onnxlr.calib import Calibration, capture, load_calibration
from onnxlr.linalg.whiten import LayerStats
from onnxlr.records import Declined
from onnxlr.sites import LAYER_OPS, LayerSite, find_site

logger = logging.getLogger(__name__)

__all__ = ["HeldOut", "calibrate", "collect_layer_stats", "conv_geometry", "conv_patches",
           "site_rows"]


def conv_geometry(site: LayerSite, in_spatial: tuple[int, ...]) -> dict[str, Any]:
    """Kernel, strides, dilations and explicit pads of a conv site (auto_pad resolved)."""
    a = site.node.attrs
    kernel = tuple(int(k) for k in site.weight.shape[2:])
    d = len(kernel)
    strides = tuple(a.get("strides", [1] * d))
    dilations = tuple(a.get("dilations", [1] * d))
    pads = list(a.get("pads", [0] * (2 * d)))
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        pads = [0] * (2 * d)
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * d)
        for i in range(d):
            out = math.ceil(in_spatial[i] / strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_spatial[i], 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[d + i] = (small, big) if auto == "SAME_UPPER" else (big, small)
    return {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": tuple(pads)}


def conv_patches(x: np.ndarray, kernel, strides, dilations, pads, *,
                 max_positions: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """im2col rows of ``x`` (N, S, *spatial): (N·P, S·k₁·…·k_d), in the weight's C order.

    With ``max_positions``, P is at most that many output positions per sample,
    drawn at random (``rng``); otherwise every output position, in order.
    """
    d = len(kernel)
    n, s = x.shape[:2]
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[d + i]) for i in range(d)])
    extent = tuple((k - 1) * dl + 1 for k, dl in zip(kernel, dilations))
    win = sliding_window_view(x, extent, axis=tuple(range(2, 2 + d)))
    # win: (N, S, *positions, *extent) → dilate inside the window, stride across positions
    index = ((slice(None), slice(None)) + tuple(slice(None, None, st) for st in strides)
             + tuple(slice(None, None, dl) for dl in dilations))
    win = np.moveaxis(win[index], 1, 1 + d)  # (N, *out_spatial, S, *kernel), still a view
    out_sp = win.shape[1:1 + d]
    p, kk = math.prod(out_sp), math.prod(kernel)
    if max_positions is not None and p > max_positions:
        rng = rng or np.random.default_rng(0)
        idx = np.stack([rng.choice(p, size=max_positions, replace=False) for _ in range(n)])
        coords = np.unravel_index(idx, out_sp)  # d arrays of (N, m)
        return win[(np.arange(n)[:, None],) + coords].reshape(n * max_positions, s * kk)
    return win.reshape(n * p, s * kk)


def site_rows(site: LayerSite, x: np.ndarray, *, max_positions: int | None,
              rng: np.random.Generator) -> np.ndarray:
    """The rows a site's weight multiplies, from its captured input ``x``."""
    if site.kind in ("conv", "conv1x1"):
        g = conv_geometry(site, tuple(x.shape[2:]))
        return conv_patches(x, g["kernel"], g["strides"], g["dilations"], g["pads"],
                            max_positions=max_positions, rng=rng)
    if site.kind == "gemm" and int(site.node.attrs.get("transA", 0)):
        x = x.T
    return x.reshape(-1, x.shape[-1])


#: Largest statistic onnxlr accumulates for one layer: a (d × d) float64 second moment with
#: d = S·k₁·…·k_d (conv patches) or the row width (Gemm/MatMul). 8192² float64 is 512 MiB;
#: a 1024-channel conv with 64-tap kernels (d = 65,536) would need 32 GiB (PITFALLS 11).
#: Larger layers are factorised from their weights alone, with that reason recorded.
MAX_STAT_DIM = 8192


def stat_dim(site: LayerSite) -> int:
    """Width of the rows a site's weight multiplies: the size of its second moment's side."""
    if site.kind in ("conv", "conv1x1"):
        return int(math.prod(site.weight.shape[1:]))
    return int(site.matrix.shape[0])


def too_big_for_stats(site: LayerSite) -> str | None:
    d = stat_dim(site)
    if d <= MAX_STAT_DIM:
        return None
    return (f"calibration statistics skipped: {d} values per input row would need a "
            f"{d}×{d} float64 second moment ({d * d * 8 / 2**30:.1f} GiB, over the "
            f"{MAX_STAT_DIM}×{MAX_STAT_DIM} bound); factorised from the weights alone")


class _SiteReducer:
    """A capture reducer: input tensor → patch/row Gram of every site reading it."""

    def __init__(self, sites: dict[str, list[LayerSite]], max_positions: int | None, seed: int):
        self.sites, self.max_positions, self.seed = sites, max_positions, seed
        self.sums: dict[str, np.ndarray] = {}
        self.grams: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __call__(self, tensor: str, x: np.ndarray) -> None:
        call = self.calls[tensor] = self.calls.get(tensor, -1) + 1
        for i, site in enumerate(self.sites.get(tensor, [])):
            rng = np.random.default_rng([self.seed, call, i])
            rows = site_rows(site, x, max_positions=self.max_positions, rng=rng).astype(np.float64)
            name = site.name
            if name not in self.grams:
                dim = rows.shape[1]
                self.sums[name], self.grams[name], self.counts[name] = (
                    np.zeros(dim), np.zeros((dim, dim)), 0)
            self.sums[name] += rows.sum(axis=0)
            self.grams[name] += rows.T @ rows
            self.counts[name] += rows.shape[0]

    def stats(self) -> dict[str, LayerStats]:
        return {k: LayerStats(self.grams[k] / n, self.sums[k] / n, n)
                for k, n in self.counts.items() if n > 0}


def collect_layer_stats(model: onnx.ModelProto, calibration: Any, *,
                        select: Callable[[LayerSite], bool] | None = None,
                        max_positions: int | None = 256, seed: int = 0, provider: str = "cpu",
                        progress: Callable | None = None,
                        skipped: dict[str, str] | None = None) -> dict[str, LayerStats]:
    """Input statistics of every candidate layer (``select`` filters sites), by node name.

    Args:
        model: the model whose layers will be factorised (after BN folding: the stats are
            of the layers' inputs, which folding does not change).
        calibration: anything :func:`onnxlr.calib.load_calibration` accepts.
        select: keep only sites for which it returns True.
        max_positions: conv output positions sampled per sample (None: all).
        seed, provider, progress: passed to :func:`onnxlr.calib.capture`.
        skipped: filled with {layer: reason} for layers too big for statistics.
    """
    from onnxlr.graph import to_graph

    graph = to_graph(model)
    by_tensor: dict[str, list[LayerSite]] = {}
    for node in graph.nodes:
        if node.op not in LAYER_OPS or node.domain:
            continue
        site = find_site(node)
        if isinstance(site, Declined) or (select is not None and not select(site)):
            continue
        why = too_big_for_stats(site)
        if why:  # sized before anything is allocated: no MemoryError, ever
            logger.warning("%s: %s", site.name, why)
            if skipped is not None:
                skipped[site.name] = why
            continue
        by_tensor.setdefault(node.inputs[0].name, []).append(site)
    if not by_tensor:
        return {}
    calib = load_calibration(calibration, model)
    reducer = _SiteReducer(by_tensor, max_positions, seed)
    capture(model, calib, list(by_tensor), provider=provider, seed=seed, progress=progress,
            reducer=reducer)
    stats = reducer.stats()
    logger.info("calibration statistics for %d layers from %d samples", len(stats),
                calib.num_samples)
    return stats


@dataclass
class HeldOut:
    """Held-out calibration samples written to a temporary ``.npz`` for the verifier."""

    path: str
    description: str

    def __post_init__(self) -> None:
        # whatever fails before the pipeline cleans up, the folder goes with this object
        # (or at exit): it never outlives the run
        self._remove = weakref.finalize(self, shutil.rmtree, os.path.dirname(self.path), True)

    def cleanup(self) -> None:
        self._remove()


def _holdout_size(calib: Calibration, fraction: float = 0.2, cap: int = 256) -> int:
    """How many samples verification keeps for itself: a fifth (a metric search: half, up to
    512, since a task metric on ~100 samples moves in 1-point steps), none below 10."""
    n = calib.num_samples
    if calib.fixed_batch:
        return calib.fixed_batch if n >= 2 * calib.fixed_batch else 0
    return 0 if n < 10 else min(max(int(n * fraction), 1), cap)


def calibrate(model: onnx.ModelProto, config: Any, source: Any, *, holdout: bool,
              max_samples: int | None = None, max_positions: int | None = 256, seed: int = 0,
              provider: str = "cpu", progress: Callable | None = None,
              holdout_fraction: float = 0.2,
              holdout_cap: int = 256) -> tuple[Any, HeldOut | None]:
    """A copy of ``config`` (a dataclass, ``dataclasses.replace``; ``config`` itself is not
    changed) whose ``calibration`` holds the input statistics of the layers it will factorise
    and whose ``calibration_notes`` say why a layer has none; and the held-out samples.

    With ``holdout``, the last samples (a fifth, at most 256) are kept out of the
    statistics and returned as a temporary ``.npz`` to verify on (None when the set
    is too small to split; verification then uses random inputs).
    """
    calib = load_calibration(source, model, max_samples=max_samples)
    held = None
    size = _holdout_size(calib, holdout_fraction, holdout_cap)
    if holdout and size:
        calib, rest = calib.split(size)
        arrays = rest.gather()  # inputs and labels: one read of the files
        folder = tempfile.mkdtemp(prefix="onnxlr-holdout-")
        path = os.path.join(folder, "holdout.npz")
        held = HeldOut(path, f"{rest.num_samples} held-out calibration samples from "
                             f"{calib.description} (the other {calib.num_samples} gave the "
                             f"layer statistics)")
        np.savez(path, **arrays)

    def wanted(site: LayerSite) -> bool:
        return config.selected(site.name) is None and config.methods.get(site.kind) is not None

    def step(done: int, total: int, what: str) -> None:  # the pipeline's (index, total, label)
        progress(done - 1, total, f"{what} samples")

    notes = dict(config.calibration_notes)
    try:
        stats = collect_layer_stats(model, calib, select=wanted, max_positions=max_positions,
                                    seed=seed, provider=provider,
                                    progress=step if progress else None, skipped=notes)
    except BaseException:
        if held is not None:
            held.cleanup()
        raise
    return dataclasses.replace(config, calibration=stats, calibration_notes=notes), held
