"""Wiring ``--method prune`` / ``thin`` into ``optimize``: the channel passes replace Factorize.

Apart from :mod:`onnxlr.passes.prune` and :mod:`onnxlr.passes.thin` (thin builds on prune's
ChannelPass) so that neither imports the other back.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from onnxlr.activations import _holdout_size, calibrate
from onnxlr.calib import load_calibration
from onnxlr.errors import OnnxlrError
from onnxlr.passes.prune import PrunePass
from onnxlr.passes.thin import ThinPass


def setup_channel_method(build, method: str, calib: Any, *, holdout: bool,
                         max_samples: int | None, seed: int, provider: str,
                         target_flops: float | None, accept: str):
    """Make ``optimize``'s builder run :class:`PrunePass`/:class:`ThinPass` instead of Factorize.

    The calibration samples it fits on are those :func:`onnxlr.activations.calibrate` does
    not hold out for verification (that call, with no layer statistics wanted, writes the
    held-out samples and is returned for the verifier). ``target_flops`` becomes the pass's
    MAC target (one keep-fraction for every unit).

    Returns:
        The held-out samples (an ``activations.HeldOut``) or None.
    """
    if accept == "latency":
        raise OnnxlrError(f"--accept latency times factorised chains; it does not apply to "
                          f"--method {method}")
    heldout, source = None, None
    if calib is not None:
        no_stats = dataclasses.replace(build.config, methods=dict.fromkeys(build.config.methods))
        _, heldout = calibrate(build.prepared, no_stats, calib, holdout=holdout,
                               max_samples=max_samples, seed=seed, provider=provider)
        source = load_calibration(calib, build.prepared, max_samples=max_samples)
        if heldout is not None:
            source = source.split(_holdout_size(source))[0]
    cls = PrunePass if method == "prune" else ThinPass
    build.make_pass = functools.partial(cls, calibration=source, seed=seed, provider=provider,
                                        target_macs=target_flops)
    return heldout
