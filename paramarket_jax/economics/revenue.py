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


def purchase_values(q: jax.Array, q_new: jax.Array, econ: Economy, kind: str, world=None):
    """Money value of each candidate purchase to its buyer, and its seller's reservation.

    Buyer i's value of seller j's weights is the revenue gain over ``horizon`` rounds if
    its quality went from ``q[i]`` to ``q_new[i, j]`` with everyone else's unchanged (at
    ``q``, or at ``world``: the qualities the others will have, for instance after the
    purchases the round's other buyers make). Seller j's reservation for selling to i is
    zero in independent markets (copies are non-rival) and, in competitive ones, the
    revenue j expects to lose to i's improvement.

    Args:
        q: (N,) current qualities (as the broker estimates them, on validation).
        q_new: (N, N) buyer i's estimated quality after merging seller j's weights.
        econ: economic knobs.
        kind: revenue model name.
        world: (N,) the other agents' qualities each purchase is valued against (None:
            ``q``, rivals stand still); buyer i's own quality is always ``q[i]``.

    Returns:
        values (N, N) and reservations (N, N), both in money over the horizon.
    """
    effects = purchase_effects(q, q_new, econ, kind, world)
    return effects.values, effects.reservations


class Effects(NamedTuple):
    """What each candidate purchase (buyer i, seller j) does to everyone's revenue over the
    horizon, (N, N) each (:func:`purchase_effects`).

    Attributes:
        values: the buyer's revenue gain; reservations: the seller's revenue loss (>= 0).
        social: the change of all agents' total revenue (customers won from the outside
            option, or revenue that grows with quality; 0 in a fixed-size market).
        harm: the revenue the third parties (every agent but buyer and seller) lose
            (>= 0); third party k loses ``factor[i, j] * rivals[k]`` of it.
        factor: per unit of contest weight, what a rival loses to the purchase;
        rivals: (N,) the agents' contest weights in the world the purchase is valued in.
    """

    values: jax.Array
    reservations: jax.Array
    social: jax.Array
    harm: jax.Array
    factor: jax.Array
    rivals: jax.Array


def purchase_effects(q: jax.Array, q_new: jax.Array, econ: Economy, kind: str, world=None):
    """The buyer's value, the seller's reservation, the purchase's effect on total revenue
    and on third parties, for every candidate purchase (arguments as
    :func:`purchase_values`; returns :class:`Effects`).

    In a competitive market buyer i's value, less the seller's loss, less the third
    parties' loss, is the change of total revenue (where the buyer improves):
    ``values - reservations - harm = social``.
    """
    if kind == "independent":
        values = econ.horizon * econ.value_per_quality[:, None] * (q_new - q[:, None])
        zero = jnp.zeros_like(values)
        return Effects(values, zero, values, zero, zero, jnp.zeros_like(q))
    # Competitive, in closed form (O(N^2)): buyer i's weight w_i becomes w'_ij, the total
    # S becomes S - w_i + w'_ij, and every revenue is M * weight / total.
    w = _weight(q, econ.gamma)
    w_new = _weight(q_new, econ.gamma)
    outside = _outside_weight(econ)
    if world is None:
        rivals, before = w, w.sum() + outside  # every buyer's world is today's
    else:  # buyer i's world: the others at ``world``, itself at q[i]
        rivals = _weight(world, econ.gamma)
        before = (rivals.sum() + outside - rivals + w)[:, None]
    total = _total(before - w[:, None] + w_new)
    before = _total(before)
    m, h = econ.market_size, econ.horizon
    # a merge that leaves the buyer's quality as it is changes nobody's revenue: exactly 0
    # (the same quotient computed in two fusions can round apart, and a zero-gain trade
    # would clear on that rounding)
    moves = q_new != q[:, None]
    values = jnp.where(moves, h * (m * w_new / total - m * w[:, None] / before), 0.0)
    seller_after = m * rivals[None, :] / total
    reservations = h * jnp.maximum(m * rivals[None, :] / before - seller_after, 0.0)
    reservations = jnp.where(moves, reservations, 0.0)
    factor = jnp.where(moves, h * m * (1.0 / before - 1.0 / total), 0.0)
    # total revenue is M (1 - w_0 / S): it grows only when there is an outside option
    social = factor * outside
    third = rivals.sum() - rivals[:, None] - rivals[None, :]
    harm = jnp.maximum(factor, 0.0) * jnp.maximum(third, 0.0)
    return Effects(values, reservations, social, harm, jnp.maximum(factor, 0.0), rivals)


def compensated_values(effects: Effects, share) -> tuple[jax.Array, jax.Array]:
    """What a buyer that owes the third parties ``share`` of their loss values each purchase
    at, and what it owes them, (N, N) each (``economics.compensation``).

    The value is ``value - share * harm``, written as ``(1 - share) * value + share *
    (reservation + social)`` so that full compensation in a fixed-size market (social =
    0) gives exactly the seller's reservation: trades whose whole surplus is the rivals'
    loss are then worth nothing, instead of clearing on rounding. Pairs that hurt no third
    party (and every pair at ``share = 0``) keep their value, bit for bit.
    """
    owes = (share > 0) & (effects.harm > 0)
    net = (1.0 - share) * effects.values + share * (effects.reservations + effects.social)
    values = jnp.where(owes, net, effects.values)
    return values, jnp.where(owes, share * effects.harm, 0.0)


def compensate(factor, rivals, bought, pick) -> tuple[jax.Array, jax.Array]:
    """Settle the compensation of a round's trades: each buyer i that bought from
    ``pick[i]`` pays every third party k of its trade (every agent but itself and its
    seller) ``factor[i, pick[i]] * rivals[k]`` (:class:`Effects`' loss of k, scaled by the
    share). Returns (N,) what each buyer paid and (N,) what each agent received less what
    it paid; the second sums to zero (money only moves between agents)."""
    n = bought.shape[0]
    agents = jnp.arange(n)
    others = (agents[None, :] != agents[:, None]) & (agents[None, :] != pick[:, None])
    third = bought[:, None] & others
    owed = jnp.where(third, factor[agents, pick][:, None] * rivals[None, :], 0.0)
    paid = owed.sum(1)
    return paid, owed.sum(0) - paid


def trade_effects(q_before: jax.Array, q_after: jax.Array, econ: Economy, kind: str):
    """Each buyer's trade against the round's other trades: the change of all agents' total
    revenue, and of the buyer's own, over the horizon, if buyer i's quality went back from
    ``q_after[i]`` to ``q_before[i]`` while every other agent stays at ``q_after``.

    Args:
        q_before, q_after: (N,) every agent's quality before and after the round's trades
            (equal for agents that did not buy; 0 for agents out of the market).

    Returns:
        (social (N,), private (N,)); ``social - private`` is what the trade did to the
        other agents' revenue (its externality).
    """
    if kind == "independent":
        private = econ.horizon * econ.value_per_quality * (q_after - q_before)
        return private, private
    w_a, w_b = _weight(q_after, econ.gamma), _weight(q_before, econ.gamma)
    outside = _outside_weight(econ)
    with_all = _total(w_a.sum() + outside)
    undone = _total(w_a.sum() + outside - w_a + w_b)
    m, h = econ.market_size, econ.horizon
    social = h * m * outside * (1.0 / undone - 1.0 / with_all)
    private = h * m * (w_a / with_all - w_b / undone)
    return social, private
