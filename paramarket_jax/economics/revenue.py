"""Revenue from model quality, and what a purchase is worth to buyer and seller (DESIGN.md s4).

Competitive markets use Tullock (logit) contest shares with an outside option,
R_i = M q_i^g / (q_0^g + sum_k q_k^g) (Tullock 1980; Skaperdas 1996, "Contest success
functions"; the outside option q_0 is the logit-demand "no purchase" choice, Berry 1994):
one agent's improvement lowers the others' revenue, and with q_0 > 0 better models also
grow the market, so competitors can both gain.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Economy(NamedTuple):
    """Numeric economic knobs (arrays, so a sweep is a vmap); the revenue kind is static.

    Attributes:
        value_per_quality: (N,) m_i, revenue per round per unit quality (independent).
        market_size: () M, revenue per round shared by all agents (competitive).
        gamma: () competition intensity of the contest shares.
        outside: () quality q_0 of customers' outside option (0: a fixed-size market).
        horizon: () rounds of revenue over which a purchase is valued.
        step_cost: () compute cost per local training step.
        query_fee: () broker fee per candidate valued, paid by the buyer.
        trade_fee: () broker fee per sale, paid by the seller.
        fee_share: () broker's share of each price, paid by the seller.
    """

    value_per_quality: jax.Array
    market_size: jax.Array
    gamma: jax.Array
    outside: jax.Array
    horizon: jax.Array
    step_cost: jax.Array
    query_fee: jax.Array
    trade_fee: jax.Array
    fee_share: jax.Array


def quality(loss: jax.Array, accuracy: jax.Array, kind: str) -> jax.Array:
    """Model quality in [0, 1] (``kind``, one of :data:`~paramarket_jax.economics.kinds.QUALITIES`):
    ``accuracy``, or ``likelihood`` = exp(-cross-entropy), the
    geometric-mean probability the model gives the true label (smooth, and it rises
    exactly when the loss falls, so it agrees with the broker's loss-based scoring)."""
    return accuracy if kind == "accuracy" else jnp.exp(-loss)


def revenue(q: jax.Array, econ: Economy, kind: str) -> jax.Array:
    """Revenue per round of each agent from its quality.

    Args:
        q: (N,) qualities in [0, 1].
        econ: economic knobs.
        kind: ``independent`` (R_i = m_i q_i) or ``competitive`` (Tullock shares of M,
            with the outside option taking its own share).

    Returns:
        (N,) revenue per round.
    """
    if kind == "independent":
        return econ.value_per_quality * q
    weight = _weight(q, econ.gamma)
    return econ.market_size * weight / _total(weight.sum() + _outside_weight(econ))


def _weight(q: jax.Array, gamma: jax.Array) -> jax.Array:
    """Contest weights ``q ** gamma``; a quality of 0 (an agent out of the market, padding)
    has no weight at all, so it changes nobody's revenue."""
    return jnp.where(q > 0, jnp.power(jnp.maximum(q, 1e-6), gamma), 0.0)


def _total(total: jax.Array) -> jax.Array:
    return jnp.maximum(total, 1e-30)  # every quality 0 and no outside option: no revenue


def _outside_weight(econ: Economy) -> jax.Array:
    return jnp.where(econ.outside > 0, jnp.power(jnp.maximum(econ.outside, 1e-6), econ.gamma), 0.0)


def purchase_values(q: jax.Array, q_new: jax.Array, econ: Economy, kind: str):
    """Money value of each candidate purchase to its buyer, and its seller's reservation.

    Buyer i's value of seller j's weights is the revenue gain over ``horizon`` rounds if
    its quality went from ``q[i]`` to ``q_new[i, j]`` with everyone else's unchanged.
    Seller j's reservation for selling to i is zero in independent markets (copies are
    non-rival) and, in competitive ones, the revenue j expects to lose to i's improvement.

    Args:
        q: (N,) current qualities (as the broker estimates them, on validation).
        q_new: (N, N) buyer i's estimated quality after merging seller j's weights.
        econ: economic knobs.
        kind: revenue model name.

    Returns:
        values (N, N) and reservations (N, N), both in money over the horizon.
    """
    base = revenue(q, econ, kind)
    if kind == "independent":
        values = econ.horizon * econ.value_per_quality[:, None] * (q_new - q[:, None])
        return values, jnp.zeros_like(values)
    # Competitive, in closed form (O(N^2)): buyer i's weight w_i becomes w'_ij, the total
    # S becomes S - w_i + w'_ij, and every revenue is M * weight / total.
    w = _weight(q, econ.gamma)
    w_new = _weight(q_new, econ.gamma)
    total = _total(w.sum() + _outside_weight(econ) - w[:, None] + w_new)
    values = econ.horizon * (econ.market_size * w_new / total - base[:, None])
    seller_after = econ.market_size * w[None, :] / total
    reservations = econ.horizon * jnp.maximum(base[None, :] - seller_after, 0.0)
    return values, reservations
