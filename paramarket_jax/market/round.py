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
from paramarket_jax.economics import (
    STRATEGIES,
    Economy,
    StrategyParams,
    StrategyState,
    init_state,
    learn,
    purchase_values,
    quality,
    reports,
    revenue,
)
from paramarket_jax.mechanisms import MECHANISMS, Knobs, Market, cap_bids, make_mechanism, settle
from paramarket_jax.models.base import Model
from paramarket_jax.population import AgentData, Population, Trainer
from paramarket_jax.scenario import per_agent

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
        value: float32 buyer's money value of the trade, estimated on validation.
        realized_value: float32 the same value measured on the test split afterwards.
        reservation: float32 seller's reservation for this sale.
        bid: float32 buyer's bid; ask: float32 seller's ask.
        price: float32 price buyer i paid for it (0 where no trade).
        fee: float32 broker fee the seller paid on this sale (per-trade fee plus the share
            of the price).
    """

    mask: jax.Array
    seller: jax.Array
    alpha: jax.Array
    predicted_gain: jax.Array
    realized_gain: jax.Array
    value: jax.Array
    realized_value: jax.Array
    reservation: jax.Array
    bid: jax.Array
    ask: jax.Array
    price: jax.Array
    fee: jax.Array


class Flows(NamedTuple):
    """Money moved by one round, per agent (N,) of the market twin, plus the broker's take.

    Attributes:
        payment: paid as a buyer; receipt: received as a seller.
        fees: broker fees paid (valuation queries as buyer, trade fees as seller).
        broker: () the broker's take this round.
    """

    payment: jax.Array
    receipt: jax.Array
    fees: jax.Array
    broker: jax.Array


class Ledger(NamedTuple):
    """Money state carried across rounds.

    Attributes:
        cash: (T, N) each twin's agents' cash (the siloed twin never trades).
        strategy: the market agents' adaptive-strategy bandits.
    """

    cash: jax.Array
    strategy: StrategyState


class Accounts(NamedTuple):
    """Per-round revenue and costs of every twin, (T, N)."""

    revenue: jax.Array
    cost: jax.Array


class Metrics(NamedTuple):
    """Per-twin, per-agent loss and accuracy, each (T, N), plus the centralized model's (N,)."""

    val_loss: jax.Array
    val_acc: jax.Array
    test_loss: jax.Array
    test_acc: jax.Array
    central_test_acc: jax.Array


class RoundKernels(NamedTuple):
    """Jitted kernels of one scenario (see :func:`make_round`), plus its numeric knobs."""

    train: Any
    trade: Any
    evaluate: Any
    init_ledger: Any
    economy: Economy
    strategy: StrategyParams
    knobs: Knobs


def economy_of(scenario) -> Economy:
    """The scenario's economic knobs as arrays."""
    e, n = scenario.economics, scenario.agents.n
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return Economy(
        value_per_quality=f32(per_agent(e.value_per_quality, n)),
        market_size=f32(e.market_size),
        gamma=f32(e.gamma),
        outside=f32(e.outside_option),
        horizon=f32(e.horizon),
        step_cost=f32(e.step_cost),
        query_fee=f32(e.query_fee),
        trade_fee=f32(e.trade_fee),
        fee_share=f32(e.fee_share),
    )


def strategy_of(scenario) -> StrategyParams:
    """The scenario's per-agent strategies as arrays."""
    s, n = scenario.strategies, scenario.agents.n
    return StrategyParams(
        kind=jnp.asarray([STRATEGIES.index(k) for k in per_agent(s.kind, n)], jnp.int32),
        shade=jnp.asarray(per_agent(s.shade, n), jnp.float32),
        markup=jnp.asarray(per_agent(s.markup, n), jnp.float32),
        grid=jnp.asarray(s.grid, jnp.float32),
        eta=jnp.asarray(s.eta, jnp.float32),
        explore=jnp.asarray(s.explore, jnp.float32),
    )


def knobs_of(scenario) -> Knobs:
    """The mechanism's numeric knobs as arrays."""
    m, n = scenario.mechanism, scenario.agents.n
    return Knobs(
        reserve=jnp.asarray(m.reserve, jnp.float32),
        beta=jnp.asarray(m.beta, jnp.float32),
        posted=jnp.full((n,), m.posted, jnp.float32),
        roles=(~seller_only(scenario) if scenario.broker.sellers else jnp.arange(n) < (n + 1) // 2),
    )


def seller_only(scenario) -> jax.Array:
    """(N,) bool: agents listed in ``broker.sellers`` (they sell and never buy)."""
    return (
        jnp.zeros(scenario.agents.n, bool).at[jnp.asarray(scenario.broker.sellers, int)].set(True)
    )


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
    quality_kind = scenario.economics.quality
    revenue_kind = scenario.economics.revenue

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

    def trade(
        twins: Population,
        ledger: Ledger,
        key,
        data: AgentData,
        econ: Economy,
        strat: StrategyParams,
        knobs: Knobs,
    ):
        k_cand, k_align, k_strat, k_roles = jax.random.split(key, 4)
        pop = jax.tree.map(lambda v: v[MARKET], twins)
        cands = candidates(k_cand)
        val = broker.value_candidates(
            model,
            pop.params,
            data.x_val,
            data.y_val,
            data.val_idx,
            cands,
            k_align,
            alphas=alphas,
            align=bro.align,
            layers=layers,
            max_sweeps=bro.max_sweeps,
            batch_size=bro.batch_size or None,
        )
        gain, alpha, mask = gains_matrix(val, n)
        if bro.sellers:
            sells = seller_only(scenario)
            mask = mask & sells[None, :] & ~sells[:, None]
        # money: values from the broker's validation estimate of each buyer's new quality
        loss_v, acc_v = trainer.evaluate(pop.params, data.x_val, data.y_val, data.val_idx)
        q_val = quality(loss_v, acc_v, kind=quality_kind)
        q_pair = quality(val.loss_after, val.acc_after, kind=quality_kind)
        q_new = jnp.broadcast_to(q_val[:, None], (n, n)).at[val.buyer, val.seller].set(q_pair)
        values, reservations = purchase_values(q_val, q_new, econ, revenue_kind)
        bids, asks, strategy = reports(k_strat, values, reservations, strat, ledger.strategy)
        query_fees = econ.query_fee * cands.shape[1]
        cash = ledger.cash[MARKET] - query_fees
        if scenario.mechanism.roles == "random":
            knobs = knobs._replace(roles=jax.random.bernoulli(k_roles, 0.5, (n,)))
        # the reserve is the lowest price any seller accepts, in every mechanism
        asks = jnp.maximum(asks, knobs.reserve)
        outcome = mechanism.run(Market(bids=cap_bids(bids, cash), asks=asks, mask=mask), knobs)
        settled = settle(cash, outcome, econ.trade_fee, econ.fee_share)
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
            batch_size=bro.batch_size or None,
        )
        before = trainer.evaluate(pop.params, data.x_test, data.y_test, data.test_idx)
        after = trainer.evaluate(merged, data.x_test, data.y_test, data.test_idx)
        realized = jnp.where(bought, (before[0] - after[0]) / jnp.maximum(before[0], 1e-12), 0.0)
        q_before = quality(*before, kind=quality_kind)
        q_after = quality(*after, kind=quality_kind)
        realized_values, _ = purchase_values(
            q_before, jnp.broadcast_to(q_after[:, None], (n, n)), econ, revenue_kind
        )
        new = trainer.reset_optimizer(pop._replace(params=merged), bought)
        twins = jax.tree.map(lambda t, v: t.at[MARKET].set(v), twins, new)
        # adaptive strategies learn from their own realised surplus (true values)
        buyer_surplus = jnp.where(bought, values[rows, pick], 0.0) - outcome.payment
        seller_surplus = outcome.receipt - jnp.where(outcome.alloc, reservations, 0.0).sum(0)
        scale = jnp.maximum(jnp.abs(values).max(), 1e-6)
        strategy = learn(strategy, strat, buyer_surplus, seller_surplus, scale)
        ledger = Ledger(ledger.cash.at[MARKET].set(settled.cash), strategy)
        flows = Flows(
            payment=outcome.payment,
            receipt=outcome.receipt,
            fees=settled.fees + query_fees,
            broker=settled.broker + n * query_fees,
        )
        trades = Trades(
            mask=bought,
            seller=seller.astype(jnp.int32),
            alpha=trade_alpha,
            predicted_gain=jnp.where(bought, gain[rows, pick], 0.0),
            realized_gain=realized,
            value=jnp.where(bought, values[rows, pick], 0.0),
            realized_value=jnp.where(bought, realized_values[:, 0], 0.0),
            reservation=jnp.where(bought, reservations[rows, pick], 0.0),
            bid=jnp.where(bought, bids[rows, pick], 0.0),
            ask=jnp.where(bought, asks[rows, pick], 0.0),
            price=jnp.where(bought, outcome.price[rows, pick], 0.0),
            fee=jnp.where(bought, econ.trade_fee + econ.fee_share * outcome.price[rows, pick], 0),
        )
        return twins, ledger, trades, flows

    def evaluate(
        twins: Population,
        central: Population | None,
        ledger: Ledger,
        data: AgentData,
        econ: Economy,
    ):
        ev = jax.vmap(trainer.evaluate, (0, None, None, None))
        val_loss, val_acc = ev(twins.params, data.x_val, data.y_val, data.val_idx)
        test_loss, test_acc = ev(twins.params, data.x_test, data.y_test, data.test_idx)
        if central is None:
            central_acc = jnp.full((n,), jnp.nan)
        else:
            p = jax.tree.map(lambda v: jnp.broadcast_to(v, (n, *v.shape[1:])), central.params)
            _, central_acc = trainer.evaluate(p, data.x_test, data.y_test, data.test_idx)
        # every twin earns revenue from its test quality (its customers) and pays compute
        q_test = quality(test_loss, test_acc, kind=quality_kind)
        rev = jax.vmap(lambda q: revenue(q, econ, revenue_kind))(q_test)
        cost = jnp.full_like(rev, econ.step_cost * steps)
        ledger = ledger._replace(cash=ledger.cash + rev - cost)
        metrics = Metrics(val_loss, val_acc, test_loss, test_acc, central_acc)
        return metrics, ledger, Accounts(rev, cost)

    def init_ledger(twins_n: int, initial_cash: float) -> Ledger:
        cash = jnp.full((twins_n, n), initial_cash, jnp.float32)
        return Ledger(cash, init_state(n, len(scenario.strategies.grid)))

    return RoundKernels(
        jax.jit(train),
        jax.jit(trade),
        jax.jit(evaluate),
        init_ledger,
        economy_of(scenario),
        strategy_of(scenario),
        knobs_of(scenario),
    )
