"""The broker: align (weight matching), merge, and try-before-buy valuation of weights."""

from paramarket_jax.broker.align import BACKENDS, align, align_pairs, align_to, aligned, hungarian
from paramarket_jax.broker.merge import (
    PAPER_ALPHAS,
    merge,
    merge_alphas,
    merge_many,
    select_layers,
)
from paramarket_jax.broker.value import (
    Valuation,
    all_candidates,
    all_pairs,
    loss_and_accuracy,
    merge_settled,
    merge_trades,
    sample_candidates,
    value_candidates,
    value_pairs,
    value_with_perms,
)

__all__ = [
    "BACKENDS",
    "PAPER_ALPHAS",
    "Valuation",
    "align",
    "align_pairs",
    "align_to",
    "aligned",
    "all_candidates",
    "all_pairs",
    "hungarian",
    "loss_and_accuracy",
    "merge",
    "merge_alphas",
    "merge_many",
    "merge_settled",
    "merge_trades",
    "sample_candidates",
    "select_layers",
    "value_candidates",
    "value_pairs",
    "value_with_perms",
]
