"""The round's kernels: train every twin, value and settle trades, evaluate (DESIGN.md s1).

A run keeps its populations stacked on a leading "twin" axis: index 0 is the market,
index 1 the siloed counterfactual (same keys, same data, never trades) and, when the
scenario asks for it, index 2 a FedAvg baseline. One jitted call trains all twins, one
values and settles the market's trades, one evaluates everything, whatever N is.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from paramarket_jax import broker
from paramarket_jax.mechanisms import MECHANISMS, Market, default_knobs, make_mechanism
from paramarket_jax.models.base import Model
from paramarket_jax.population import AgentData, Population, Trainer

MARKET, SILOED, FEDAVG = 0, 1, 2
MECHANISM_NAMES = MECHANISMS


class Trades(NamedTuple):
    """One round's settled trades, one entry per buyer (N,); ``mask`` says who bought.

    Attributes:
        mask: bool, buyer i bought this round.
        seller: int32 seller of buyer i (-1 where no trade).
        alpha: float32 seller weight of the merge.
        predicted_gain: float32 relative validation-loss gain the broker predicted.
        realized_gain: float32 relative test-loss gain measured after the merge.
        price: float32 price buyer i paid.
        payment: (N,) what each agent paid as buyer; receipt: (N,) received as seller.
    """

    mask: jax.Array
    seller: jax.Array
    alpha: jax.Array
    predicted_gain: jax.Array
    realized_gain: jax.Array
    price: jax.Array
    payment: jax.Array
    receipt: jax.Array


class Metrics(NamedTuple):
    """Per-twin, per-agent loss and accuracy, each (T, N), plus the centralized model's (N,)."""

    val_loss: jax.Array
    val_acc: jax.Array
    test_loss: jax.Array
    test_acc: jax.Array
    central_test_acc: jax.Array


class RoundKernels(NamedTuple):
    """Jitted kernels of one scenario (see :func:`make_round`)."""

    train: Any
    trade: Any
    evaluate: Any


def fedavg(pop: Population, weights: jax.Array) -> Population:
    """Replace every agent's parameters by the weighted average (plain, no alignment)."""
    w = weights / weights.sum()

    def avg(leaf):
        mean = jnp.tensordot(w, leaf, axes=1)
        return jnp.broadcast_to(mean, leaf.shape)

    return pop._replace(params=jax.tree.map(avg, pop.params))


def gains_matrix(val: broker.Valuation, n: int):
    """Scatter per-pair scores into (N, N) buyer x seller matrices plus the candidate mask."""
    mask = jnp.zeros((n, n), bool).at[val.buyer, val.seller].set(True)
    gain = jnp.zeros((n, n), jnp.float32).at[val.buyer, val.seller].set(val.gain)
    alpha = jnp.zeros((n, n), jnp.float32).at[val.buyer, val.seller].set(val.best_alpha)
    return gain, alpha, mask & ~jnp.eye(n, dtype=bool)


def make_round(scenario, model: Model, trainer: Trainer) -> RoundKernels:
    """Build the jitted round kernels for one scenario (static shapes and names only).

    Args:
        scenario: a validated :class:`~paramarket_jax.scenario.Scenario`.
        model: the agents' model.
        trainer: its population trainer.
    """
    n = scenario.agents.n
    steps = scenario.train.local_steps
    bro = scenario.broker
    layers = tuple(bro.layers) or None
    alphas = jnp.asarray(bro.alphas, jnp.float32)
    mechanism = make_mechanism(scenario.mechanism.name, **dict(scenario.mechanism.options))
    use_fedavg = scenario.baselines.fedavg

    def train(twins: Population, central: Population, key, data: AgentData, pooled: AgentData):
        twins, _ = jax.vmap(lambda p: trainer.train(p, key, data, steps))(twins)
        if use_fedavg:
            avg = fedavg(jax.tree.map(lambda v: v[FEDAVG], twins), data.train_size.astype(float))
            twins = jax.tree.map(lambda t, a: t.at[FEDAVG].set(a), twins, avg)
        if central is not None:
            central, _ = trainer.train(central, jax.random.fold_in(key, n), pooled, steps * n)
        return twins, central

    def candidates(key):
        if bro.candidates == 0 or bro.candidates >= n - 1:
            return broker.all_candidates(n)
        return broker.sample_candidates(key, n, bro.candidates)

    def trade(twins: Population, key, data: AgentData):
        k_cand, k_align = jax.random.split(key)
        pop = jax.tree.map(lambda v: v[MARKET], twins)
        val = broker.value_candidates(
            model,
            pop.params,
            data.x_val,
            data.y_val,
            data.val_idx,
            candidates(k_cand),
            k_align,
            alphas=alphas,
            align=bro.align,
            layers=layers,
            max_sweeps=bro.max_sweeps,
        )
        gain, alpha, mask = gains_matrix(val, n)
        outcome = mechanism.run(
            Market(bids=gain, asks=jnp.zeros_like(gain), mask=mask), default_knobs(n)
        )
        bought = outcome.alloc.any(axis=1)
        seller = jnp.where(bought, outcome.alloc.argmax(axis=1), -1)
        pick = jnp.clip(seller, 0)
        rows = jnp.arange(n)
        trade_alpha = jnp.where(bought, alpha[rows, pick], 0.0)
        merged = broker.merge_trades(
            model.spec,
            pop.params,
            pick,
            trade_alpha,
            bought,
            k_align,
            align=bro.align,
            layers=layers,
            max_sweeps=bro.max_sweeps,
        )
        before, _ = trainer.evaluate(pop.params, data.x_test, data.y_test, data.test_idx)
        after, _ = trainer.evaluate(merged, data.x_test, data.y_test, data.test_idx)
        realized = jnp.where(bought, (before - after) / jnp.maximum(before, 1e-12), 0.0)
        new = trainer.reset_optimizer(pop._replace(params=merged), bought)
        twins = jax.tree.map(lambda t, v: t.at[MARKET].set(v), twins, new)
        trades = Trades(
            mask=bought,
            seller=seller.astype(jnp.int32),
            alpha=trade_alpha,
            predicted_gain=jnp.where(bought, gain[rows, pick], 0.0),
            realized_gain=realized,
            price=jnp.where(bought, outcome.price[rows, pick], 0.0),
            payment=outcome.payment,
            receipt=outcome.receipt,
        )
        return twins, trades

    def evaluate(twins: Population, central: Population | None, data: AgentData):
        ev = jax.vmap(trainer.evaluate, (0, None, None, None))
        val_loss, val_acc = ev(twins.params, data.x_val, data.y_val, data.val_idx)
        test_loss, test_acc = ev(twins.params, data.x_test, data.y_test, data.test_idx)
        if central is None:
            central_acc = jnp.full((n,), jnp.nan)
        else:
            p = jax.tree.map(lambda v: jnp.broadcast_to(v, (n, *v.shape[1:])), central.params)
            _, central_acc = trainer.evaluate(p, data.x_test, data.y_test, data.test_idx)
        return Metrics(val_loss, val_acc, test_loss, test_acc, central_acc)

    return RoundKernels(jax.jit(train), jax.jit(trade), jax.jit(evaluate))
