"""Price-setting mechanisms behind one registry (Krishna; Nisan et al. AGT ch. 9; McAfee 1992)."""

from paramarket_jax.mechanisms.auctions import first_price, k_vickrey, second_price
from paramarket_jax.mechanisms.bargaining import nash_bargaining, nash_price
from paramarket_jax.mechanisms.base import (
    CLAIMS,
    DOMAINS,
    Knobs,
    Market,
    Mechanism,
    Outcome,
    default_knobs,
)
from paramarket_jax.mechanisms.double import mcafee_double
from paramarket_jax.mechanisms.posted import posted_price, take_it
from paramarket_jax.mechanisms.registry import MECHANISMS, make_mechanism, options
from paramarket_jax.mechanisms.settle import Settlement, cap_bids, settle
from paramarket_jax.mechanisms.vcg import vcg_assignment

__all__ = [
    "CLAIMS",
    "DOMAINS",
    "MECHANISMS",
    "Knobs",
    "Market",
    "Mechanism",
    "Outcome",
    "Settlement",
    "cap_bids",
    "default_knobs",
    "first_price",
    "k_vickrey",
    "make_mechanism",
    "mcafee_double",
    "nash_bargaining",
    "nash_price",
    "options",
    "posted_price",
    "second_price",
    "settle",
    "take_it",
    "vcg_assignment",
]
