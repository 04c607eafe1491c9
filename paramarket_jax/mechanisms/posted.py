"""Take-it (Huang et al. 2023 released code) and posted prices (taxation principle, AGT ch. 9)."""

import jax.numpy as jnp

from paramarket_jax.mechanisms.base import (
    Knobs,
    Market,
    Mechanism,
    Outcome,
    best_per_row,
    candidates,
    outcome_from_prices,
)


def take_it() -> Mechanism:
    """The paper's rule: each buyer takes its highest-bid candidate iff that bid is > 0, free.

    Copies are non-rival, so a seller may be taken by any number of buyers. Nothing is paid,
    so the mechanism is trivially budget balanced; it is not individually rational for
    sellers whose ask is positive (competitive markets), who give copies away at price 0.

    Returns:
      Mechanism claiming feasible and (strong, hence weak) budget balance.
    """

    def run(market: Market, knobs: Knobs) -> Outcome:
        del knobs
        ok = candidates(market)
        alloc = best_per_row(market.bids, ok) & (market.bids > 0)
        return outcome_from_prices(alloc, jnp.zeros_like(market.bids))

    return Mechanism(
        name="take_it",
        run=run,
        claims=frozenset({"feasible", "weakly_budget_balanced", "strongly_budget_balanced"}),
        exclusive=False,
        capacity=None,
        domain="any",
    )


def posted_price() -> Mechanism:
    """Each seller j posts ``knobs.posted[j]``; each buyer takes the best surplus at those prices.

    Seller j sells to buyer i only if ``posted[j] >= asks[i, j]``; buyer i buys from the
    available candidate seller that maximises ``bids[i, j] - posted[j]`` iff that surplus is
    positive, and pays ``posted[j]`` to the seller. Copies are non-rival (no capacity).

    Prices are knobs, not reports, so reporting truly is dominant on both sides: a buyer's
    bid only picks its best offer at fixed prices, and a seller's ask only decides to which
    buyers it sells at a fixed price (it gains exactly on pairs with ``posted >= cost``).

    Returns:
      Mechanism claiming feasible, individually rational, strongly budget balanced and
      truthful on every market.
    """

    def run(market: Market, knobs: Knobs) -> Outcome:
        posted = jnp.broadcast_to(knobs.posted, market.bids.shape[-1:])[None, :]
        ok = candidates(market) & (posted >= market.asks)
        surplus = market.bids - posted
        alloc = best_per_row(surplus, ok) & (surplus > 0)
        return outcome_from_prices(alloc, jnp.broadcast_to(posted, market.bids.shape))

    return Mechanism(
        name="posted_price",
        run=run,
        claims=frozenset(
            {
                "feasible",
                "individually_rational",
                "weakly_budget_balanced",
                "strongly_budget_balanced",
                "truthful",
            }
        ),
        exclusive=False,
        capacity=None,
        domain="any",
    )
