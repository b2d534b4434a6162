"""Rank selection for truncated factorisations.

``parse_rank`` turns a ``--rank`` string into a :class:`RankSelector`
(fixed, ratio, energy or EVBMF); ``round_rank`` rounds a chosen rank up to a
hardware-friendly multiple; ``evbmf``/``evbmf_rank`` expose the empirical
variational Bayesian matrix factorisation of Nakajima et al. (JMLR 2013).
"""
from onnxlr.rank.selectors import (
    RANK_RULES,
    EnergyRank,
    FixedRank,
    RankRule,
    RankSelector,
    RatioRank,
    VbmfRank,
    parse_rank,
    round_rank,
)
from onnxlr.rank.vbmf import EvbmfResult, evbmf, evbmf_rank

__all__ = [
    "RANK_RULES",
    "EnergyRank",
    "EvbmfResult",
    "FixedRank",
    "RankRule",
    "RankSelector",
    "RatioRank",
    "VbmfRank",
    "evbmf",
    "evbmf_rank",
    "parse_rank",
    "round_rank",
]
