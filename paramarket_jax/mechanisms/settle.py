"""Cash settlement of a mechanism's outcome with broker fees (double-entry accounting)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from paramarket_jax.mechanisms.base import Outcome


class Settlement(NamedTuple):
    """Cash after one round of trades.

    Attributes:
      cash: (N,) float32, each agent's cash after paying and receiving.
      fees: (N,) float32, broker fee charged to each agent as a seller.
      broker: () float32, the broker's take: ``fees.sum() + payment.sum() - receipt.sum()``
        (negative when a mechanism such as ``vcg_assignment`` runs a deficit).
    """

    cash: jax.Array
    fees: jax.Array
    broker: jax.Array


def cap_bids(bids: jax.Array, cash: jax.Array) -> jax.Array:
    """Cap each buyer's bids at its cash, so that no mechanism makes it pay more than it has.

    Budgets are enforced here, upstream of the mechanism: every individually rational
    mechanism charges a buyer at most its bid for what it buys, and a buyer buys from at
    most one seller, so with capped bids ``payment <= max(cash, 0)``.

    Args:
      bids: (N, N) float32, ``bids[i, j]`` is buyer i's bid for seller j.
      cash: (N,) float32, each agent's cash.

    Returns:
      (N, N) float32, ``min(bids[i, j], max(cash[i], 0))``.
    """
    return jnp.minimum(bids, jnp.maximum(cash, 0.0)[:, None])


def settle(
    cash: jax.Array,
    outcome: Outcome,
    fee_per_trade: float | jax.Array = 0.0,
    fee_share: float | jax.Array = 0.0,
) -> Settlement:
    """Move cash: buyers pay ``payment``, sellers receive ``receipt`` less the broker's fee.

    The fee is charged to the seller: ``fee_share`` of what it receives plus
    ``fee_per_trade`` for each copy it sells. A fee may exceed a receipt (the seller then
    pays in); nothing is checked here, budgets are enforced upstream (see ``cap_bids``).
    Money is conserved: ``cash.sum() == new.cash.sum() + new.broker`` up to rounding.

    Args:
      cash: (N,) float32, cash before the round.
      outcome: the mechanism's Outcome for the round.
      fee_per_trade: () broker fee per sale, charged to the seller.
      fee_share: () share of each seller's receipt kept by the broker.

    Returns:
      Settlement with the new cash (N,), the fees (N,) and the broker's take ().
    """
    sales = outcome.alloc.sum(0).astype(jnp.float32)
    fees = fee_share * outcome.receipt + fee_per_trade * sales
    new_cash = cash - outcome.payment + outcome.receipt - fees
    broker = fees.sum() + outcome.payment.sum() - outcome.receipt.sum()
    return Settlement(
        cash=new_cash.astype(jnp.float32),
        fees=fees.astype(jnp.float32),
        broker=broker.astype(jnp.float32),
    )
