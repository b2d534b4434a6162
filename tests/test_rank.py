"""Tests for onnxlr.rank: EVBMF and the --rank rules."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxlr.errors import OnnxlrError
from onnxlr.rank import (
    RANK_RULES,
    EnergyRank,
    FixedRank,
    RankSelector,
    RatioRank,
    VbmfRank,
    evbmf,
    evbmf_rank,
    parse_rank,
    round_rank,
)
from onnxlr.rank import vbmf as vbmf_mod


def svals(a: np.ndarray) -> np.ndarray:
    return np.linalg.svd(a, compute_uv=False)


def low_rank_plus_noise(m: int, n: int, k: int, sigma: float, seed: int) -> np.ndarray:
    """Rank-k signal whose singular values sit 3-6x above the noise edge, plus N(0, sigma^2)."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    edge = sigma * (math.sqrt(m) + math.sqrt(n))  # largest singular value of the noise
    d = np.linspace(6.0, 3.0, k) * edge
    return (u * d) @ v.T + sigma * rng.standard_normal((m, n))


@functools.lru_cache(maxsize=None)
def weight_like_spectrum(m: int, n: int, seed: int) -> np.ndarray:
    """Singular values of a smoothly decaying, trained-layer-like matrix (no clean gap)."""
    rng = np.random.default_rng(seed)
    decay = 1.0 / np.arange(1, n + 1) ** 0.7
    s = svals(0.02 * (rng.standard_normal((m, n)) * decay) @ rng.standard_normal((n, n)))
    s.setflags(write=False)
    return s


# ---------------------------------------------------------------- EVBMF


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m,n,k", [(200, 100, 10), (100, 200, 10), (300, 80, 5), (64, 576, 16)])
def test_evbmf_recovers_rank_and_noise(m, n, k, seed):
    sigma = 0.1
    res = evbmf(svals(low_rank_plus_noise(m, n, k, sigma, seed)), m, n)
    assert res.rank == k
    assert res.sigma2 == pytest.approx(sigma**2, rel=0.1)
    assert res.posterior.shape == (k,)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evbmf_scale_invariant(seed):
    # The reference VBMF code (bounded Brent search with an absolute tolerance)
    # gives ranks 34/36/35 for these spectra but 13/13/12 once scaled by 1e-3.
    m, n = 256, 128
    s = weight_like_spectrum(m, n, seed)
    base = evbmf(s, m, n)
    assert 0 < base.rank < n
    for c in (1e-3, 1e3, 1e-30, 1e30):
        scaled = evbmf(s * c, m, n)
        assert scaled.rank == base.rank
        assert scaled.sigma2 == pytest.approx(base.sigma2 * c * c, rel=1e-6)
        assert scaled.threshold == pytest.approx(base.threshold * c, rel=1e-6)
        np.testing.assert_allclose(scaled.posterior, base.posterior * c, rtol=1e-6)


def test_evbmf_scale_invariant_on_signal_plus_noise():
    s = svals(low_rank_plus_noise(200, 100, 10, 0.1, 7))
    assert {evbmf_rank(s * c, 200, 100) for c in (1.0, 1e-3, 1e3)} == {10}


@pytest.mark.parametrize("m,n", [(200, 100), (100, 200), (128, 128), (50, 400)])
def test_evbmf_pure_noise_is_rank_zero(m, n):
    rng = np.random.default_rng(m * n)
    res = evbmf(svals(rng.standard_normal((m, n))), m, n)
    assert res.rank == 0
    assert res.sigma2 == pytest.approx(1.0, rel=0.1)
    assert res.posterior.shape == (0,)


@pytest.mark.filterwarnings("error")
def test_evbmf_zero_matrix():
    res = evbmf(np.zeros(100), 200, 100)
    assert (res.rank, res.sigma2, res.threshold) == (0, 0.0, 0.0)
    assert res.posterior.shape == (0,)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("m,n,k", [(200, 100, 7), (60, 150, 12), (64, 64, 5), (50, 50, 1)])
def test_evbmf_exact_low_rank(m, n, k):
    rng = np.random.default_rng(k)
    a = rng.standard_normal((m, k)) @ rng.standard_normal((k, n))
    res = evbmf(svals(a), m, n)
    assert res.rank == k
    assert np.all(np.isfinite(res.posterior))
    # Stored as float32, the round-off is relative to each entry, not white
    # noise; eps=float32 epsilon treats it as zero.
    s32 = svals(a.astype(np.float32).astype(np.float64))
    assert evbmf_rank(s32, m, n, eps=float(np.finfo(np.float32).eps)) == k


def test_evbmf_degenerate_shapes():
    assert evbmf(np.array([3.0]), 1, 50).rank == 0
    assert evbmf(np.array([3.0]), 50, 1).rank_bound == 0
    assert evbmf(np.array([100.0, 1e-3]), 2, 2).rank == 0
    assert evbmf(np.zeros(0), 0, 5).rank == 0


def test_evbmf_rank_bound():
    # ceil(L / (1 + L/M)) - 1: at most about half the rank of a square matrix.
    assert evbmf(np.ones(100), 200, 100).rank_bound == 66
    assert evbmf(np.ones(64), 64, 64).rank_bound == 31
    # An exact rank above the bound is reported at the bound, never full rank.
    rng = np.random.default_rng(3)
    a = rng.standard_normal((100, 90)) @ rng.standard_normal((90, 200))
    res = evbmf(svals(a), 100, 200)
    assert res.rank <= res.rank_bound == 66


def test_evbmf_order_of_input_does_not_matter():
    s = svals(low_rank_plus_noise(120, 60, 6, 0.1, 4))
    assert evbmf_rank(s[::-1], 120, 60) == evbmf_rank(s, 120, 60) == 6


def test_evbmf_sigma2_is_global_minimum_of_free_energy():
    m, n = 256, 128
    s = weight_like_spectrum(m, n, 0)
    res = evbmf(s, m, n)
    big_l, big_m = n, m
    alpha = big_l / big_m
    tau = vbmf_mod._tau_bar(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    h_bar = res.rank_bound
    scale = math.sqrt(np.sum(s**2) / (big_l * big_m))
    g2 = (s / scale) ** 2
    lower = max(g2[h_bar] / (big_m * x_bar), g2[h_bar:].mean() / big_m)
    grid = np.linspace(math.log(lower), 0.0, 5001)
    energy = vbmf_mod._free_energy(grid, g2[:h_bar], g2[h_bar:].sum(), big_l, big_m, x_bar)
    found = vbmf_mod._free_energy(np.array([math.log(res.sigma2 / scale**2)]), g2[:h_bar],
                                  g2[h_bar:].sum(), big_l, big_m, x_bar)[0]
    assert found <= energy.min() + 1e-9


def test_tau_bar_matches_paper():
    assert vbmf_mod._tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)
    for alpha in (0.5, 0.1, 0.01):
        tau = vbmf_mod._tau_bar(alpha)
        # Zero of Xi(tau) = Phi(tau) + Phi(tau / alpha), Phi(z) = log(1+z)/z - 1/2.
        assert math.log1p(tau) / tau + math.log1p(tau / alpha) / (tau / alpha) - 1 == pytest.approx(0, abs=1e-12)
        assert tau == pytest.approx(2.5129 * math.sqrt(alpha), rel=0.15)


def test_evbmf_bad_input():
    with pytest.raises(ValueError, match="expected 100 singular values"):
        evbmf(np.ones(99), 200, 100)
    with pytest.raises(OnnxlrError, match="not finite"):
        evbmf(np.array([1.0, np.nan]), 2, 5)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       log_scale=st.floats(-20, 20))
def test_evbmf_invariants(m, n, seed, log_scale):
    rng = np.random.default_rng(seed)
    k = rng.integers(0, min(m, n) + 1)
    a = rng.standard_normal((m, k)) @ rng.standard_normal((k, n)) * 3 + rng.standard_normal((m, n))
    s = svals(a) * 10.0**log_scale
    res = evbmf(s, m, n)
    assert 0 <= res.rank <= res.rank_bound < max(min(m, n), 1)
    assert res.rank == int(np.sum(s > res.threshold))
    assert np.all((res.posterior > 0) & (res.posterior <= s[: res.rank]))
    assert math.isfinite(res.sigma2) and res.sigma2 > 0


# ---------------------------------------------------------------- rules


def test_parse_forms():
    assert parse_rank("32") == FixedRank(32)
    assert parse_rank(" 32 ").spec == "32"
    assert parse_rank("1") == FixedRank(1)
    assert parse_rank("0.25") == RatioRank(0.25)
    assert parse_rank("1.0") == RatioRank(1.0)
    assert parse_rank(".5") == RatioRank(0.5)
    assert parse_rank("energy:0.95") == EnergyRank(0.95)
    assert parse_rank("Energy:1") == EnergyRank(1.0)
    assert isinstance(parse_rank("vbmf"), VbmfRank)
    assert parse_rank("energy:0.95").spec == "energy:0.95"


@pytest.mark.parametrize("bad", ["abc", "-3", "0", "1.5", "energy:2", "energy:", "energy:0",
                                 "energy:x", "vbmf:x", "", "nan", "inf", "0.0", "32.0",
                                 "fixed:3", "1e2"])
def test_parse_errors(bad):
    with pytest.raises(OnnxlrError) as info:
        parse_rank(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "energy:F" in message and "vbmf" in message and "\n" not in message


def test_fixed_and_ratio():
    s = np.arange(10, 0, -1.0)
    assert FixedRank(32).select(s, 10, 20) == 10
    assert FixedRank(3).select(s, 20, 10) == 3
    assert RatioRank(0.25).select(s, 10, 20) == 3  # ceil(2.5)
    assert RatioRank(0.3).select(s, 10, 20) == 3  # 0.3 * 10 rounds to 3.0000000000000004
    assert RatioRank(0.01).select(s, 10, 20) == 1  # at least one
    assert RatioRank(1.0).select(s, 10, 20) == 10
    assert RatioRank(0.5).select(np.zeros(0), 0, 4) == 0


@pytest.mark.parametrize("energy,expected", [(0.4, 1), (0.5, 2), (0.7, 2), (0.71, 3),
                                             (0.9, 3), (0.91, 4), (1.0, 4), (1e-9, 1)])
def test_energy_known_spectrum(energy, expected):
    s = np.sqrt([4.0, 3.0, 2.0, 1.0])  # energies 40%, 30%, 20%, 10%
    assert EnergyRank(energy).select(s, 4, 7) == expected


def test_energy_edge_cases():
    assert EnergyRank(0.75).select(np.full(4, 0.1), 4, 4) == 3
    assert EnergyRank(0.95).select(np.zeros(5), 5, 8) == 0
    assert EnergyRank(1.0).select(np.array([2.0, 1.0, 0.0, 0.0]), 4, 4) == 2
    assert EnergyRank(0.5).select(np.array([1e-200, 1e-200]), 2, 2) == 1
    assert EnergyRank(0.5).select(np.array([1e200, 1e200]), 2, 2) == 1
    with pytest.raises(OnnxlrError):
        EnergyRank(0.5).select(np.array([np.inf, 1.0]), 2, 2)


def test_vbmf_rule_matches_evbmf():
    s = svals(low_rank_plus_noise(200, 100, 10, 0.1, 0))
    assert parse_rank("vbmf").select(s, 200, 100) == evbmf_rank(s, 200, 100) == 10


def test_select_checks_length():
    with pytest.raises(ValueError):
        FixedRank(3).select(np.ones(5), 10, 4)


@settings(max_examples=30, deadline=None)
@given(spec=st.sampled_from(["1", "7", "1000", "0.1", "0.5", "1.0", "energy:0.5",
                             "energy:0.99", "energy:1", "vbmf"]),
       m=st.integers(1, 30), n=st.integers(1, 30),
       s=st.lists(st.floats(0, 1e6), min_size=30, max_size=30))
def test_select_in_range(spec, m, n, s):
    spectrum = np.sort(np.asarray(s[: min(m, n)]))[::-1]
    rank = parse_rank(spec).select(spectrum, m, n)
    assert isinstance(rank, int) and 0 <= rank <= min(m, n)


def test_registry():
    assert set(RANK_RULES) == {"fixed", "ratio", "energy", "vbmf"}
    for rule in RANK_RULES.values():
        assert issubclass(rule.cls, RankSelector)
        assert rule.help and "\n" not in rule.help


@pytest.mark.parametrize("rank,multiple,full,expected", [
    (63, 64, 1000, 64), (64, 64, 1000, 64), (65, 64, 1000, 128), (65, 64, 100, 100),
    (0, 64, 100, 0), (5, 1, 100, 5), (5, 0, 100, 5), (130, 64, 128, 128), (1, 8, 3, 3),
    (33, 32, 64, 64),
])
def test_round_rank(rank, multiple, full, expected):
    assert round_rank(rank, multiple, full) == expected


def test_round_rank_rejects_negative():
    with pytest.raises(ValueError):
        round_rank(-1, 8, 10)
