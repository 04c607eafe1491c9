"""Sealed-bid licence auctions: first price, Vickrey, k-unit Vickrey (Krishna, Auction Theory)."""

import jax
import jax.numpy as jnp

from paramarket_jax.errors import ParamarketError
from paramarket_jax.mechanisms.base import (
    Knobs,
    Market,
    Mechanism,
    Outcome,
    best_per_row,
    candidates,
    outcome_from_prices,
)

_AUCTION_CLAIMS = frozenset(
    {"feasible", "individually_rational", "weakly_budget_balanced", "strongly_budget_balanced"}
)


def _licence_auction(name: str, k: int, pay_own_bid: bool) -> Mechanism:
    """Every seller sells ``k`` exclusive licences in a sealed-bid auction; see ``k_vickrey``."""

    def run(market: Market, knobs: Knobs) -> Outcome:
        n = market.bids.shape[-1]
        bids = market.bids
        # Personal reserve: the auction's reserve, raised to the seller's ask of this buyer.
        reserve = jnp.maximum(knobs.reserve, market.asks)
        eligible = candidates(market) & (bids >= reserve)
        # Each buyer enters one auction (its highest eligible bid), so it wins at most once.
        entered = best_per_row(bids, eligible)
        width = max(n, k + 1)
        scores = jnp.full((n, width), -jnp.inf, bids.dtype)
        scores = scores.at[:, :n].set(jnp.where(entered, bids, -jnp.inf).T)  # (seller, buyer)
        top, who = jax.lax.top_k(scores, k + 1)  # (N, k + 1) per seller, descending
        won = jnp.isfinite(top[:, :k])
        rows = jnp.arange(n)[:, None]
        alloc = jnp.zeros((n, width), bool).at[rows, who[:, :k]].set(won)[:, :n].T
        # Vickrey: a winner pays its threshold bid, its reserve or the (k+1)-th entered bid.
        price = bids if pay_own_bid else jnp.maximum(reserve, top[:, k][None, :])
        return outcome_from_prices(alloc, price)

    truthful = set() if pay_own_bid else {"truthful_buyers"}
    return Mechanism(
        name=name,
        run=run,
        claims=_AUCTION_CLAIMS | truthful,
        exclusive=True,
        capacity=k,
        domain="any" if pay_own_bid else "single_seller",
    )


def k_vickrey(k: int = 2) -> Mechanism:
    """Each seller sells ``k`` exclusive licences; winners pay the uniform (k+1)-th price.

    Design (shared by ``first_price`` and ``second_price``, the ``k = 1`` cases):

    1. Buyer i may buy from seller j only if ``bids[i, j] >= max(reserve, asks[i, j])``:
       the seller's ask acts as a personal reserve for that buyer.
    2. Each buyer enters exactly one auction: the eligible seller it bids most for. So each
       buyer wins at most once and all sellers' auctions run in parallel.
    3. In each seller's auction the ``k`` highest entered bids win and each winner pays
       ``max(reserve, asks[i, j], (k+1)-th entered bid)``, its threshold bid; with asks at or
       below the reserve this is the uniform price ``max((k+1)-th bid, reserve)``.

    With one seller (``single_seller`` domain) and unit-demand buyers this is the k-unit
    Vickrey auction with reserve, in which bidding one's value is dominant (Krishna, on
    multi-unit auctions).
    With several sellers the choice of auction in step 2 is strategic, so truthfulness is
    claimed for the single-seller domain only. Sellers are not truthful (a seller gains by
    raising its ask above its cost as a reserve); the price goes to the seller in full.

    Args:
      k: licences per seller, static, >= 1.

    Returns:
      Mechanism claiming feasible, individually rational, strongly budget balanced, and
      ``truthful_buyers`` on single-seller markets.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ParamarketError(f"k_vickrey option k must be an integer >= 1, got {k!r}")
    return _licence_auction("k_vickrey", k, pay_own_bid=False)


def second_price() -> Mechanism:
    """Each seller sells one exclusive licence in a Vickrey auction with reserve.

    ``k_vickrey`` with ``k = 1``: the highest eligible entered bid wins and pays
    ``max(second entered bid, reserve, ask)``; see ``k_vickrey`` for the design.

    Returns:
      Mechanism claiming feasible, individually rational, strongly budget balanced, and
      ``truthful_buyers`` on single-seller markets.
    """
    return _licence_auction("second_price", 1, pay_own_bid=False)


def first_price() -> Mechanism:
    """Each seller sells one exclusive licence in a first-price sealed-bid auction with reserve.

    Same rules as ``second_price`` (see ``k_vickrey``), but the winner pays its own bid.
    Not truthful: bidders shade their bids in equilibrium (Krishna, ch. 2).

    Returns:
      Mechanism claiming feasible, individually rational and strongly budget balanced.
    """
    return _licence_auction("first_price", 1, pay_own_bid=True)
