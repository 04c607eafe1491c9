"""Generalized Nash bargaining between a buyer and a seller (Nash 1950; Roth 1979)."""

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


def nash_price(value, cost, beta):
    """Generalized Nash bargaining price ``argmax_p (v - p)**beta * (p - c)**(1 - beta)``.

    Args:
      value: buyer's value v, any shape.
      cost: seller's reservation c, broadcastable to ``value``.
      beta: buyer bargaining power in [0, 1], broadcastable to ``value``.

    Returns:
      ``c + (1 - beta) * (v - c)``, the maximiser when ``v > c``.
    """
    return cost + (1.0 - beta) * (value - cost)


def nash_bargaining() -> Mechanism:
    """Each buyer bargains with its best candidate seller and splits the surplus by ``beta``.

    Buyer i picks the candidate seller j with the largest reported surplus
    ``v - c = bids[i, j] - asks[i, j]`` and trades iff ``v > c`` at
    ``p = c + (1 - beta) * (v - c)``, the generalized Nash bargaining solution with buyer
    power ``beta = knobs.beta`` (clipped to [0, 1]): the buyer keeps ``beta`` of the surplus.
    Copies are non-rival, so a seller may strike many bargains. Not truthful: both sides gain
    by misreporting (a buyer by understating v, a seller by overstating c).

    Returns:
      Mechanism claiming feasible, individually rational and strongly budget balanced.
    """

    def run(market: Market, knobs: Knobs) -> Outcome:
        beta = jnp.clip(knobs.beta, 0.0, 1.0)
        surplus = market.bids - market.asks
        alloc = best_per_row(surplus, candidates(market)) & (surplus > 0)
        return outcome_from_prices(alloc, nash_price(market.bids, market.asks, beta))

    return Mechanism(
        name="nash_bargaining",
        run=run,
        claims=frozenset(
            {
                "feasible",
                "individually_rational",
                "weakly_budget_balanced",
                "strongly_budget_balanced",
            }
        ),
        exclusive=False,
        capacity=None,
        domain="any",
    )
