"""Bidding and asking strategies, vmapped over agents; `adaptive` learns with EXP3.

EXP3: Auer, Cesa-Bianchi, Freund and Schapire, "The nonstochastic multiarmed bandit
problem" (SIAM J. Computing, 2002). An adaptive agent keeps one bandit over a grid of
shading factors (as a buyer) and one over a grid of markups (as a seller), and learns from
its own realised trade surplus only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from paramarket_jax.economics.kinds import STRATEGIES

TRUTHFUL, SHADE, MARKUP, ADAPTIVE = range(len(STRATEGIES))  # codes: indices into STRATEGIES


class StrategyParams(NamedTuple):
    """Per-agent strategy settings, all (N,) arrays except the shared grid.

    Attributes:
        kind: (N,) int32 index into :data:`STRATEGIES`.
        shade: (N,) fraction of its value a ``shade`` buyer withholds (bid = (1-s) v).
        markup: (N,) share of the predicted surplus a ``markup`` seller asks on top of its
            reservation (ask = c + m * max(v - c, 0), v being the broker's estimate).
        grid: (G,) factors an ``adaptive`` agent chooses among for both roles.
        eta: () EXP3 learning rate; explore: () EXP3 exploration rate.
    """

    kind: jax.Array
    shade: jax.Array
    markup: jax.Array
    grid: jax.Array
    eta: jax.Array
    explore: jax.Array


class StrategyState(NamedTuple):
    """Adaptive agents' bandit log-weights, (N, G) per role, and last choices (N,)."""

    buy_logw: jax.Array
    sell_logw: jax.Array
    buy_choice: jax.Array
    sell_choice: jax.Array


def init_state(n: int, grid_size: int) -> StrategyState:
    zeros = jnp.zeros((n, grid_size), jnp.float32)
    first = jnp.zeros((n,), jnp.int32)
    return StrategyState(zeros, zeros, first, first)


def _probs(logw: jax.Array, explore: jax.Array) -> jax.Array:
    p = jax.nn.softmax(logw, axis=-1)
    return (1 - explore) * p + explore / logw.shape[-1]


def reports(
    key: jax.Array,
    values: jax.Array,
    reservations: jax.Array,
    params: StrategyParams,
    state: StrategyState,
):
    """Bids and asks from true values; adaptive agents draw their factors this round.

    Args:
        key: randomness for adaptive agents' draws.
        values: (N, N) buyer i's value of seller j's weights.
        reservations: (N, N) seller j's reservation for selling to buyer i.
        params: strategy settings.
        state: adaptive agents' bandits.

    Returns:
        bids (N, N), asks (N, N), and the state with this round's choices.
    """
    n = values.shape[0]
    k_buy, k_sell = jax.random.split(key)
    draw = jax.vmap(lambda k, lw: jax.random.choice(k, lw.shape[0], p=_probs(lw, params.explore)))
    buy_choice = draw(jax.random.split(k_buy, n), state.buy_logw).astype(jnp.int32)
    sell_choice = draw(jax.random.split(k_sell, n), state.sell_logw).astype(jnp.int32)
    shade = jnp.select(
        [params.kind == SHADE, params.kind == ADAPTIVE],
        [params.shade, params.grid[buy_choice]],
        0.0,
    )
    markup = jnp.select(
        [params.kind == MARKUP, params.kind == ADAPTIVE],
        [params.markup, params.grid[sell_choice]],
        0.0,
    )
    bids = (1.0 - shade)[:, None] * values
    asks = reservations + markup[None, :] * jnp.maximum(values - reservations, 0.0)
    return bids, asks, state._replace(buy_choice=buy_choice, sell_choice=sell_choice)


def learn(
    state: StrategyState,
    params: StrategyParams,
    buyer_surplus: jax.Array,
    seller_surplus: jax.Array,
    scale: jax.Array,
) -> StrategyState:
    """EXP3 update of every adaptive agent's bandits from its own realised surplus.

    Args:
        state: bandits with this round's choices.
        params: strategy settings (only ``adaptive`` agents change).
        buyer_surplus: (N,) value of what each agent bought minus what it paid.
        seller_surplus: (N,) what each agent received minus its reservation for what it sold.
        scale: () a positive money scale mapping surplus to rewards in [0, 1].

    Returns:
        The updated state.
    """

    def update(logw, choice, surplus):
        p = _probs(logw, params.explore)
        reward = jnp.clip(0.5 + 0.5 * surplus / scale, 0.0, 1.0)
        chosen = jax.nn.one_hot(choice, logw.shape[-1])
        p_chosen = jnp.take_along_axis(p, choice[:, None], 1)[:, 0]
        est = chosen * (reward / p_chosen)[:, None]
        new = logw + params.eta * est
        new = new - new.max(axis=-1, keepdims=True)
        return jnp.where((params.kind == ADAPTIVE)[:, None], new, logw)

    return state._replace(
        buy_logw=update(state.buy_logw, state.buy_choice, buyer_surplus),
        sell_logw=update(state.sell_logw, state.sell_choice, seller_surplus),
    )
