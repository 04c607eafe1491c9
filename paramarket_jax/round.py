"""One market round as a pure function, and a whole run as a ``lax.scan`` of it (DESIGN.md s2).

Three kinds of value are kept apart, as gymnax keeps ``EnvParams`` from the state:

- :class:`MarketSpec`: everything static (shapes, names, counts); hashable, the only thing
  that decides compilation.
- :class:`MarketParams`: every numeric knob as arrays; traced, so a sweep over them is a
  ``vmap``, never a recompile.
- :class:`MarketState`: what a round carries to the next (populations, cash, bandits).

``step(spec, params, data, state, key, r)`` is one round: train every twin, trade on
schedule (``lax.cond`` on the unbatched round index), settle, evaluate, earn. ``simulate``
scans it over rounds (purejaxrl's ``train(key)``). Populations are stacked on a leading
"twin" axis (``MarketSpec.twin_names``): index 0 is the market, then the siloed
counterfactual (same keys, same data, never trades; on unless turned off) and, when asked
for, a FedAvg baseline. This module imports no Mesa.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from paramarket_jax import broker
from paramarket_jax.economics import (
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
from paramarket_jax.mechanisms import Knobs, Market, cap_bids, make_mechanism, settle
from paramarket_jax.models import Model, make_model
from paramarket_jax.population import AgentData, Population, Trainer, agent_keys, make_trainer
from paramarket_jax.sharding import constrain_state

MARKET = 0
# a ``poisoned`` offer is the seller's model plus Gaussian noise whose standard deviation is
# this times each layer's own root-mean-square weight (per agent, fresh every trading round)
POISON_SCALE = 1.0
# folded into a trading round's key for the hostile offers' randomness (the round's other
# keys are split as before, so scenarios without hostile agents draw exactly as they did)
HOSTILE_STREAM = 0x686F7374


@dataclasses.dataclass(frozen=True)
class MarketSpec:
    """Everything static about a market: equal specs share one compilation.

    Attributes:
        n: number of agents N.
        input_shape, num_classes: the dataset's example shape and class count.
        model: model registry name; model_options: its options as sorted (key, value) pairs.
        optimizer: optimizer name; batch_size: minibatch size; local_steps: steps a round.
        siloed: run the siloed twin (the counterfactual every gain is measured against);
        fedavg: run a FedAvg twin; centralized: train one model on pooled data.
        mechanism: mechanism registry name; mechanism_options: its static options.
        roles: how one-sided mechanisms pick buyers: ``first_half`` (or the listed
            sellers) or ``random`` each round.
        revenue: ``independent`` or ``competitive``; quality: ``likelihood`` or ``accuracy``.
        align: how sellers are put in their buyers' basis before merging: ``pairwise``
            (weight matching per candidate pair), ``reference`` (every agent matched once
            to a reference agent, pairs by composition) or ``none``; restarts: weight
            matchings with different sweep orders per alignment, kept by ``choose``
            (``objective`` or ``validation``: the buyer's try-before-buy picks);
            layers: traded layer patterns (empty: the whole model); candidates: sellers
            per buyer (0: all others); pick: how they are chosen, ``random`` or ``top``
            (the K alive sellers with the lowest own validation loss); max_sweeps: most
            weight-matching sweeps; chunk: buyers per valuation chunk (0: all at once).
        alphas: number of merge weights tried; strategy_grid: size of the adaptive grid.
        hostile: what hostile sellers (``MarketParams.hostile``) offer the broker instead
            of their model (:func:`offers`): ``random``, ``stale`` or ``poisoned``; ""
            when no agent is hostile (nothing is replaced, nothing extra computed).
        noisy, noise: the agents whose training labels are noisy and the fraction of
            their rows that are (used by ``experiment.seed_data``, which builds the data;
            here so that cells with different label noise never share a batch).
        pad: dead agents appended to fill the devices (:mod:`paramarket_jax.sharding`): the
            real agents are the first ``n - pad``; the padded ones are never alive, and
            every random draw of the real agents is the same as without them.
        devices: devices the market runs on (1: no sharding); shard: how it is split over
            them, ``agents`` (the population) or ``runs`` (the batch path's run axis).
        solver: the weight matching's assignment solver
            (:func:`~paramarket_jax.broker.align.hungarian`): ``auto`` (scipy through a
            host callback on CPU, optax elsewhere) on one device; ``optax`` on several,
            where a host callback would pull the split work onto one device.
    """

    n: int
    input_shape: tuple[int, ...]
    num_classes: int
    model: str = "mlp"
    model_options: tuple[tuple[str, Any], ...] = ()
    optimizer: str = "sgd"
    batch_size: int = 32
    local_steps: int = 40
    siloed: bool = True
    fedavg: bool = False
    centralized: bool = False
    mechanism: str = "take_it"
    mechanism_options: tuple[tuple[str, Any], ...] = ()
    roles: str = "first_half"
    revenue: str = "independent"
    quality: str = "likelihood"
    align: str = "pairwise"
    restarts: int = 1
    choose: str = "objective"
    layers: tuple[str, ...] = ()
    candidates: int = 0
    pick: str = "random"
    max_sweeps: int = 100
    chunk: int = 0
    alphas: int = 10
    strategy_grid: int = 10
    hostile: str = ""
    noisy: tuple[int, ...] = ()
    noise: float = 0.0
    pad: int = 0
    devices: int = 1
    shard: str = "agents"
    solver: str = "auto"

    @property
    def twin_names(self) -> tuple[str, ...]:
        """What each index of the twin axis holds: market, then siloed and FedAvg if on."""
        return ("market",) + ("siloed",) * self.siloed + ("fedavg",) * self.fedavg

    @property
    def real(self) -> int:
        """The real agents (the first ``n - pad``; the others pad the devices)."""
        return self.n - self.pad

    @property
    def twins(self) -> int:
        """Populations stacked on the twin axis."""
        return len(self.twin_names)

    def make_model(self) -> Model:
        return make_model(
            self.model, self.input_shape, self.num_classes, **dict(self.model_options)
        )

    def make_trainer(self, model: Model | None = None) -> Trainer:
        return make_trainer(model or self.make_model(), self.optimizer, self.batch_size)


class MarketParams(NamedTuple):
    """Every numeric knob as arrays (traced): a sweep over them is a vmap.

    Attributes:
        learning_rate: (N,) per-agent learning rates.
        alphas: (A,) seller weights the broker tries.
        knobs: the mechanism's reserve, bargaining power, posted prices and roles.
        economy: revenue, competition, horizon, costs and fees.
        strategy: per-agent strategies and the adaptive bandits' settings.
        initial_cash: () every agent's cash before round 0.
        trade_start: () int32 first trading round; trade_every: () int32 its period.
        seller_only: (N,) bool agents that only sell (when any is set, buyers buy only
            from them).
        initial_alive: (N,) bool agents in the market at round 0 (the others are free
            slots that entrants take, see :func:`enter`).
        bankruptcy: () bool an agent whose cash falls below zero leaves the market.
        diverge_loss: () an agent whose training loss after a round's local training
            exceeds this times its initial loss has diverged (see :func:`diverging`).
        hostile: (N,) bool agents that offer the broker something other than their model
            when they sell (``MarketSpec.hostile`` says what); their own model, training
            and buying stay honest.
        min_gain: () the broker offers a pair only if its predicted relative validation
            gain (its lower confidence bound, with ``confidence``) is at least this; 0: off.
            The gain is in the quality buyers pay for (``MarketSpec.quality``): the
            relative loss gain (``likelihood``) or relative accuracy gain (``accuracy``).
        confidence: () the broker offers a pair only if that validation gain is positive
            at this one-sided confidence (``gain - z * se > 0``, z the normal quantile, se
            from the per-row differences over the buyer's validation rows,
            :func:`~paramarket_jax.broker.value.gain_se`); 0: off.
    """

    learning_rate: jax.Array
    alphas: jax.Array
    knobs: Knobs
    economy: Economy
    strategy: StrategyParams
    initial_cash: jax.Array
    trade_start: jax.Array
    trade_every: jax.Array
    seller_only: jax.Array
    initial_alive: jax.Array
    bankruptcy: jax.Array
    diverge_loss: jax.Array
    hostile: jax.Array
    min_gain: jax.Array
    confidence: jax.Array


class MarketData(NamedTuple):
    """One seed's data: shared arrays plus index views (see ``AgentData``).

    Attributes:
        agents: shared features and each agent's shard, validation and test rows.
        pool_rows: (R,) int32 every row some agent owns, once (the centralized baseline's
            data), padded; pool_size: () int32 how many are real.
    """

    agents: AgentData
    pool_rows: jax.Array
    pool_size: jax.Array


class MarketState(NamedTuple):
    """What a round carries to the next (the scan carry; what a checkpoint saves).

    Attributes:
        twins: populations stacked on a twin axis, leaves (T, N, ...).
        central: the centralized model (a population of one), or None.
        cash: (T, N) each twin's agents' cash (the siloed twin never trades).
        strategy: the market agents' adaptive-strategy bandits.
        trade_count: (N,) int32 purchases so far per agent.
        alive: (T, N) bool agents in each twin's market: a dead agent neither trains,
            trades, earns nor pays (fixed shapes: leaving and entering never recompile).
        endowment: (T, N) cash put into each slot so far (the initial cash, plus what
            each entrant brought): utility is ``cash - endowment``.
        diverged: (T, N) bool agents whose local training diverged (see
            :func:`diverging`): frozen at their last finite model, they never train or
            trade again, but stay in the market (evaluated, earning with that model).
        initial_loss: (T, N) the loss of each agent's freshly initialised model, on its
            first minibatch before its first update (NaN until the agent first trains; an
            entrant's is measured when it first trains).
        initial_params: the market agents' initial parameters, leaves (N, ...), what a
            ``stale`` hostile seller offers (an entrant's are its fresh ones); None unless
            ``MarketSpec.hostile`` is ``stale``.
    """

    twins: Population
    central: Population | None
    cash: jax.Array
    strategy: StrategyState
    trade_count: jax.Array
    alive: jax.Array
    endowment: jax.Array
    diverged: jax.Array
    initial_loss: jax.Array
    initial_params: Any = None


class Trades(NamedTuple):
    """One round's settled trades, one entry per buyer (N,); ``mask`` says who bought.

    Attributes:
        mask: bool, buyer i bought this round.
        seller: int32 seller of buyer i (-1 where no trade).
        alpha: seller weight of the merge.
        predicted_gain: relative validation-loss gain the broker predicted.
        realized_gain: relative test-loss gain measured after the merge.
        value: buyer's money value of the trade, estimated on validation.
        realized_value: the same value measured on the test split afterwards.
        reservation: seller's reservation for this sale.
        bid, ask: buyer's bid and seller's ask.
        price: price buyer i paid (0 where no trade).
        fee: broker fee the seller paid on this sale: the per-trade fee plus the fee share
            of the seller's receipts this round, split evenly over its sales (the fees of
            a seller's trades sum to what ``settle`` charged it).
        gain_se: standard error of ``predicted_gain`` over the buyer's validation rows
            (:func:`~paramarket_jax.broker.value.gain_se`).
        acc_gain, acc_gain_se: the merge's predicted relative validation-accuracy gain
            and its standard error (what the guard tests under ``accuracy`` quality).
        hostile: bool, the seller was hostile (offered something other than its model).
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
    gain_se: jax.Array
    acc_gain: jax.Array
    acc_gain_se: jax.Array
    hostile: jax.Array


class Flows(NamedTuple):
    """Money moved by one round, per agent (N,) of the market twin, plus the broker's take.

    Attributes:
        payment: paid as a buyer; receipt: received as a seller.
        fees: broker fees paid (valuation queries as a buyer, trade fees as a seller).
        broker: () the broker's take this round.
    """

    payment: jax.Array
    receipt: jax.Array
    fees: jax.Array
    broker: jax.Array


class RoundRecord(NamedTuple):
    """Everything one round records, fixed shapes (T twins, N agents).

    Attributes:
        traded: () bool, this was a trading round.
        val_loss, val_acc, test_loss, test_acc: (T, N) after the round.
        central_acc: (N,) the centralized model's accuracy on each agent's test rows (NaN
            without that baseline).
        revenue, cost: (T, N) this round's revenue and compute cost.
        cash: (T, N) cash after the round.
        flows: the market's money flows this round.
        trades: per-buyer trade columns with a mask.
        trade_count: (N,) int32 purchases so far.
        alive: (T, N) bool agents in the market after the round.
        endowment: (T, N) cash put into each slot so far (see ``MarketState``).
        diverged: (T, N) bool agents whose training has diverged, this round or before.
    """

    traded: jax.Array
    val_loss: jax.Array
    val_acc: jax.Array
    test_loss: jax.Array
    test_acc: jax.Array
    central_acc: jax.Array
    revenue: jax.Array
    cost: jax.Array
    cash: jax.Array
    flows: Flows
    trades: Trades
    trade_count: jax.Array
    alive: jax.Array
    endowment: jax.Array
    diverged: jax.Array


def fedavg(pop: Population, weights: jax.Array) -> Population:
    """Replace every agent's parameters by the weighted average (plain, no alignment)."""
    w = weights / weights.sum()

    def avg(leaf):
        return jnp.broadcast_to(jnp.tensordot(w, leaf, axes=1), leaf.shape)

    return pop._replace(params=jax.tree.map(avg, pop.params))


def gains_matrix(val: broker.Valuation, n: int):
    """Scatter per-pair scores into (N, N) buyer x seller matrices plus the candidate mask."""
    mask = jnp.zeros((n, n), bool).at[val.buyer, val.seller].set(True)
    gain = jnp.zeros((n, n), jnp.float32).at[val.buyer, val.seller].set(val.gain)
    alpha = jnp.zeros((n, n), jnp.float32).at[val.buyer, val.seller].set(val.best_alpha)
    return gain, alpha, mask & ~jnp.eye(n, dtype=bool)


def is_trading_round(params: MarketParams, r) -> jax.Array:
    """The paper's schedule: trade when ``r >= start`` and ``r % every == 0``."""
    return (r >= params.trade_start) & (r % params.trade_every == 0)


def init(spec: MarketSpec, params: MarketParams, key: jax.Array) -> MarketState:
    """Fresh populations (every twin starts from the same weights), cash and bandits."""
    trainer = spec.make_trainer()
    pop = trainer.init(key, spec.n, params.learning_rate)
    twins = jax.tree.map(lambda v: jnp.stack([v] * spec.twins), pop)
    central = None
    if spec.centralized:
        # the centralized model trains at agent 0's learning rate
        central = trainer.init(jax.random.fold_in(key, spec.real), 1, params.learning_rate[0])
    cash = jnp.full((spec.twins, spec.n), params.initial_cash, jnp.float32)
    return MarketState(
        twins=twins,
        central=central,
        cash=cash,
        strategy=init_state(spec.n, spec.strategy_grid),
        trade_count=jnp.zeros(spec.n, jnp.int32),
        alive=jnp.broadcast_to(params.initial_alive, (spec.twins, spec.n)),
        endowment=cash,
        diverged=jnp.zeros((spec.twins, spec.n), bool),
        initial_loss=jnp.full((spec.twins, spec.n), jnp.nan, jnp.float32),
        initial_params=pop.params if spec.hostile == "stale" else None,
    )


def enter(
    spec: MarketSpec, params: MarketParams, state: MarketState, key: jax.Array, slots
) -> MarketState:
    """Agents enter the free ``slots`` ((N,) bool, dead in the market twin) with fresh models.

    An entrant starts in every twin (its siloed twin is the same newcomer never trading):
    fresh weights and optimizer from ``key``, the initial cash, no purchases, a fresh
    bandit, not diverged (its initial loss is measured when it first trains). Everyone
    else is untouched. Called between rounds by the Mesa view. The slot's earlier utility
    stays in its accounts (the endowment grows by what the entrant brings beyond the
    leaver's cash), so welfare still counts what the leaver lost.
    """
    slots = jnp.asarray(slots, bool) & ~state.alive[MARKET]
    fresh = spec.make_trainer().init(key, spec.n, params.learning_rate)

    def pick(new, old):  # old (T, N, ...), new (N, ...)
        m = slots.reshape((1, spec.n) + (1,) * (old.ndim - 2))
        return jnp.where(m, new[None], old)

    twins = jax.tree.map(pick, fresh, state.twins)
    strategy = jax.tree.map(
        lambda new, old: jnp.where(slots.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
        init_state(spec.n, spec.strategy_grid),
        state.strategy,
    )
    return state._replace(
        twins=twins,
        cash=jnp.where(slots[None], params.initial_cash, state.cash),
        endowment=jnp.where(
            slots[None], state.endowment + params.initial_cash - state.cash, state.endowment
        ),
        strategy=strategy,
        trade_count=jnp.where(slots, 0, state.trade_count),
        alive=state.alive | slots[None],
        diverged=state.diverged & ~slots[None],
        initial_loss=jnp.where(slots[None], jnp.nan, state.initial_loss),
        initial_params=None
        if state.initial_params is None
        else jax.tree.map(
            lambda new, old: pick(new, old[None])[0], fresh.params, state.initial_params
        ),
    )


def diverging(params, losses: jax.Array, initial_loss: jax.Array, limit) -> jax.Array:
    """Which agents' local training of this round diverged.

    An agent diverged when any of its parameters or minibatch losses is not finite, or its
    training loss at the end of the round (its last minibatch's) exceeds ``limit`` times
    its initial loss (the finite explosion: a loss of 1e17 is a number, not a model).

    Args:
        params: trained parameters, leaves (..., N, ...) with ``losses``' leading axes.
        losses: (..., N, steps) the round's minibatch losses.
        initial_loss: (..., N) each agent's initial loss (NaN: not known, no ratio test).
        limit: () ``MarketParams.diverge_loss``.

    Returns:
        (..., N) bool.
    """
    lead = losses.shape[:-1]
    finite = jnp.isfinite(losses).all(-1)
    for leaf in jax.tree.leaves(params):
        finite = finite & jnp.isfinite(leaf.reshape(*lead, -1)).all(-1)
    return ~finite | (losses[..., -1] > limit * initial_loss)


def _train(spec, trainer, params, data: MarketData, state: MarketState, key):
    """Local training of every twin's agents that are in the market and not diverged.

    An agent whose training diverges this round (:func:`diverging`) keeps its parameters
    and optimizer state from before the round (its last finite model), is marked diverged
    and never trains again; FedAvg leaves it out of the average.

    Returns:
        The new state and (T, N) bool: the agents that trained this round (and pay its
        compute), diverging or not.
    """
    agents = data.agents
    twins, losses = jax.vmap(lambda p: trainer.train(p, key, agents, spec.local_steps))(
        state.twins
    )  # losses (T, N, steps)
    active = state.alive & ~state.diverged
    # the first minibatch loss of an agent's first round is its fresh model's loss
    initial_loss = jnp.where(
        active & jnp.isnan(state.initial_loss), losses[..., 0], state.initial_loss
    )
    diverged = active & diverging(twins.params, losses, initial_loss, params.diverge_loss)
    keep = active & ~diverged
    # (before averaging: a zero weight times a NaN is still NaN)
    twins = _where_alive(keep, twins, state.twins)
    if spec.fedavg:
        i = spec.twin_names.index("fedavg")
        weights = agents.train_size * keep[i]
        avg = fedavg(jax.tree.map(lambda v: v[i], twins), weights.astype(float))
        twins = jax.tree.map(lambda t, a: t.at[i].set(a), twins, avg)
        twins = _where_alive(keep, twins, state.twins)
    central = state.central
    if central is not None:
        pooled = agents._replace(
            train_rows=data.pool_rows,
            train_start=jnp.zeros(1, jnp.int32),
            train_size=data.pool_size[None],
        )
        central, _ = trainer.train(
            central, jax.random.fold_in(key, spec.real), pooled, spec.local_steps * spec.real
        )
    state = state._replace(
        twins=twins,
        central=central,
        diverged=state.diverged | diverged,
        initial_loss=initial_loss,
    )
    return state, active


def _where_alive(alive, new, old):
    """Per-agent pick over (T, N, ...) leaves: agents not in ``alive`` keep ``old``."""
    return jax.tree.map(
        lambda u, v: jnp.where(alive.reshape(alive.shape + (1,) * (u.ndim - 2)), u, v), new, old
    )


def _candidates(spec: MarketSpec, key, score, alive) -> jax.Array:
    """(N, K) sellers each buyer's broker values this round.

    Drawn among the real agents (``spec.n - spec.pad``), so that padding the population
    with dead agents changes neither K nor any real buyer's candidates; a padded buyer
    (dead, never trading) gets agent 0's row.
    """
    real = spec.real
    if spec.pick == "top" and 0 < spec.candidates < real - 1:
        # dead agents (padded ones included) score +inf: never picked before a real one
        return top_candidates(score, alive, spec.candidates)
    if spec.candidates == 0 or spec.candidates >= real - 1:
        cands = broker.all_candidates(real)
    else:
        cands = broker.sample_candidates(key, real, spec.candidates)
    return jnp.concatenate([cands, jnp.broadcast_to(cands[:1], (spec.pad, cands.shape[1]))])


def top_candidates(score: jax.Array, alive: jax.Array, k: int) -> jax.Array:
    """(N, k) int32: for each buyer the k other agents with the lowest ``score``, alive first.

    One shared ``top_k`` of k + 1 (a buyer drops itself if it is among them), so the cost
    is O(N log k), never an (N, N) matrix.
    """
    n = score.shape[0]
    score = jnp.where(alive & jnp.isfinite(score), score, jnp.inf)
    _, best = jax.lax.top_k(-score, k + 1)  # (k + 1,) best first
    is_self = best[None, :] == jnp.arange(n)[:, None]
    order = jnp.argsort(is_self, axis=1, stable=True)  # self (if present) moves last
    return jnp.take_along_axis(jnp.broadcast_to(best, (n, k + 1)), order, 1)[:, :k].astype(
        jnp.int32
    )


def offers(spec: MarketSpec, params: MarketParams, state: MarketState, pop_params, key):
    """What each agent offers the broker as a seller this round, leaves (N, ...).

    An honest agent offers its model. A hostile one (``params.hostile``) offers, by
    ``spec.hostile``: ``random``, fresh random weights (a new initialisation every trading
    round, from ``key``); ``stale``, its initial, untrained weights
    (``state.initial_params``); ``poisoned``, its model plus Gaussian noise of
    :data:`POISON_SCALE` times each layer's RMS weight (fresh every round). Its own model,
    training and purchases stay honest: only what the broker is given to sell changes.
    Without hostile agents (``spec.hostile == ""``) this is ``pop_params`` itself.
    """
    if not spec.hostile:
        return pop_params
    if spec.hostile == "random":
        fake = jax.vmap(spec.make_model().init)(agent_keys(key, spec.n))
    elif spec.hostile == "stale":
        fake = state.initial_params
    elif spec.hostile == "poisoned":
        leaves, treedef = jax.tree.flatten(pop_params)
        noisy = []
        for leaf, k in zip(leaves, jax.random.split(key, len(leaves)), strict=True):
            axes = tuple(range(1, leaf.ndim))
            rms = jnp.sqrt(jnp.mean(jnp.square(leaf), axis=axes, keepdims=True))
            noise = jax.random.normal(k, leaf.shape, leaf.dtype)
            noisy.append(leaf + POISON_SCALE * rms * noise)
        fake = jax.tree.unflatten(treedef, noisy)
    else:
        raise ValueError(f"unknown hostile kind {spec.hostile!r}")
    hostile = params.hostile
    return jax.tree.map(
        lambda f, v: jnp.where(hostile.reshape((-1,) + (1,) * (v.ndim - 1)), f, v),
        fake,
        pop_params,
    )


def value(spec: MarketSpec, params: MarketParams, data: MarketData, pop_params, alive, loss_v,
          k_cand, k_align, offered=None):  # fmt: skip
    """The broker's try-before-buy of a round: candidates, their scores and permutations.

    Args:
        pop_params: the market twin's parameters (N, ...); alive: (N,) bool agents that
            may trade (in the market and not diverged);
        loss_v: (N,) each agent's own validation loss (the ``top`` pick's score).
        offered: what each agent offers as a seller (:func:`offers`); None: its model.

    Returns:
        (candidates (N, K), Valuation, perms name -> (N, K, size)).
    """
    agents = data.agents
    cands = _candidates(spec, k_cand, loss_v, alive)
    val, perms = broker.value_with_perms(
        spec.make_model(),
        pop_params,
        agents.x_val,
        agents.y_val,
        agents.val_idx,
        cands,
        k_align,
        params.alphas,
        align=spec.align,
        layers=spec.layers or None,
        max_sweeps=jnp.asarray(spec.max_sweeps, jnp.int32),
        batch_size=spec.chunk or None,
        restarts=spec.restarts,
        choose=spec.choose,
        reference=jnp.argmax(alive).astype(jnp.int32),  # the first agent in the market
        offers=offered,
        solver=spec.solver,
    )
    return cands, val, perms


def _no_trade(spec: MarketSpec, state: MarketState):
    """The branch of rounds without trading: nothing moves."""
    n = spec.n
    zf, zi = jnp.zeros(n, jnp.float32), jnp.zeros(n, jnp.int32)
    trades = Trades(jnp.zeros(n, bool), zi - 1, *([zf] * 13), jnp.zeros(n, bool))
    return state, trades, Flows(zf, zf, zf, jnp.zeros((), jnp.float32))


def _trade(spec: MarketSpec, state: MarketState, key, trainer, model, data, params):
    """Value candidates, price, settle and merge: the market twin's trading round."""
    n, econ, strat = spec.n, params.economy, params.strategy
    agents = data.agents
    k_cand, k_align, k_strat, k_roles = jax.random.split(key, 4)
    pop = jax.tree.map(lambda v: v[MARKET], state.twins)
    alive = state.alive[MARKET]
    # only agents in the market trade, and a diverged agent neither buys nor sells
    trading = alive & ~state.diverged[MARKET]
    loss_v, acc_v = trainer.evaluate(pop.params, agents.x_val, agents.y_val, agents.val_idx)
    # hostile sellers offer something else than their model (None: nobody is hostile)
    offered = None
    if spec.hostile:
        offered = offers(spec, params, state, pop.params, jax.random.fold_in(key, HOSTILE_STREAM))
    cands, val, perms = value(
        spec, params, data, pop.params, trading, loss_v, k_cand, k_align, offered
    )
    layers = spec.layers or None
    gain, alpha, mask = gains_matrix(val, n)

    def pairs(v):  # (P,) per-pair scores -> (N, N) buyer x seller
        return jnp.zeros((n, n), jnp.float32).at[val.buyer, val.seller].set(v)

    gain_se, acc_gain, acc_gain_se = pairs(val.gain_se), pairs(val.acc_gain), pairs(val.acc_gain_se)
    sells = params.seller_only
    mask = jnp.where(sells.any(), mask & sells[None, :] & ~sells[:, None], mask)
    mask = mask & trading[:, None] & trading[None, :]
    # a merge whose validation loss is not finite is never offered (whatever the quality
    # measure makes of it: accuracy stays finite when the loss is NaN)
    finite = jnp.zeros((n, n), bool).at[val.buyer, val.seller].set(jnp.isfinite(val.loss_after))
    mask = mask & finite
    # money: values from the broker's validation estimate of each buyer's new quality (a
    # diverged agent still sells to customers with its frozen model: it competes)
    q_val = jnp.where(alive, quality(loss_v, acc_v, kind=spec.quality), 0.0)
    q_pair = quality(val.loss_after, val.acc_after, kind=spec.quality)
    q_new = jnp.broadcast_to(q_val[:, None], (n, n)).at[val.buyer, val.seller].set(q_pair)
    values, reservations = purchase_values(q_val, q_new, econ, spec.revenue)
    bids, asks, strategy = reports(k_strat, values, reservations, strat, state.strategy)
    # each buyer pays for every candidate the broker valued for it; sellers-only pay none
    query_fees = econ.query_fee * mask.sum(1).astype(jnp.float32)
    cash = state.cash[MARKET] - query_fees
    knobs = params.knobs
    if spec.roles == "random":
        knobs = knobs._replace(roles=jax.random.bernoulli(k_roles, 0.5, (n,)))
    # a non-finite estimate (NaN weights, diverged merge) means "not a candidate"
    asks = jnp.maximum(asks, knobs.reserve)  # the reserve is every seller's lowest price
    mask = mask & jnp.isfinite(bids) & jnp.isfinite(asks)
    # the buyers' guard (after the queries are paid: the valuation was made): offer a pair
    # only if its validation gain, in the quality buyers pay for, clears the bound:
    # gain - z * se >= min_gain and > 0
    z = jnp.where(params.confidence > 0, jax.scipy.special.ndtri(params.confidence), 0.0)
    accuracy = spec.quality == "accuracy"
    lower = acc_gain - z * acc_gain_se if accuracy else gain - z * gain_se
    guarded = (params.min_gain > 0) | (params.confidence > 0)
    mask = mask & (~guarded | ((lower > 0) & (lower >= params.min_gain)))
    bids, asks = jnp.where(mask, bids, 0.0), jnp.where(mask, asks, 0.0)
    mechanism = make_mechanism(spec.mechanism, **dict(spec.mechanism_options))
    outcome = mechanism.run(Market(bids=cap_bids(bids, cash), asks=asks, mask=mask), knobs)
    settled = settle(cash, outcome, econ.trade_fee, econ.fee_share)
    bought = outcome.alloc.any(axis=1)
    seller = jnp.where(bought, outcome.alloc.argmax(axis=1), -1)
    pick = jnp.clip(seller, 0)
    rows = jnp.arange(n)
    trade_alpha = jnp.where(bought, alpha[rows, pick], 0.0)
    # settle with the permutations found while valuing: no second weight matching
    slot = jnp.argmax(cands == pick[:, None], axis=1)
    chosen = jax.tree.map(lambda p: p[rows, slot], perms)
    merged = broker.merge_settled(
        model.spec,
        pop.params,
        pick,
        trade_alpha,
        bought,
        chosen,
        layers=layers,
        batch_size=spec.chunk or None,
        offers=offered,
    )
    before = trainer.evaluate(pop.params, agents.x_test, agents.y_test, agents.test_idx)
    after = trainer.evaluate(merged, agents.x_test, agents.y_test, agents.test_idx)
    realized = jnp.where(bought, (before[0] - after[0]) / jnp.maximum(before[0], 1e-12), 0.0)
    q_before = quality(*before, kind=spec.quality)
    q_after = quality(*after, kind=spec.quality)
    realized_values, _ = purchase_values(
        q_before, jnp.broadcast_to(q_after[:, None], (n, n)), econ, spec.revenue
    )
    new = trainer.reset_optimizer(pop._replace(params=merged), bought)
    twins = jax.tree.map(lambda t, v: t.at[MARKET].set(v), state.twins, new)
    # adaptive strategies learn from their own realised surplus (true values)
    buyer_surplus = jnp.where(bought, values[rows, pick], 0.0) - outcome.payment
    seller_surplus = outcome.receipt - jnp.where(outcome.alloc, reservations, 0.0).sum(0)
    scale = jnp.maximum(jnp.abs(jnp.where(mask, values, 0.0)).max(), 1e-6)
    strategy = learn(strategy, strat, buyer_surplus, seller_surplus, scale)
    sales = outcome.alloc.sum(0)
    fee_per_sale = settled.fees / jnp.maximum(sales, 1).astype(jnp.float32)
    pick_or_zero = lambda m: jnp.where(bought, m[rows, pick], 0.0)  # noqa: E731
    trades = Trades(
        mask=bought,
        seller=seller.astype(jnp.int32),
        alpha=trade_alpha,
        predicted_gain=pick_or_zero(gain),
        realized_gain=realized,
        value=pick_or_zero(values),
        realized_value=jnp.where(bought, realized_values[:, 0], 0.0),
        reservation=pick_or_zero(reservations),
        bid=pick_or_zero(bids),
        ask=pick_or_zero(asks),
        price=pick_or_zero(outcome.price),
        fee=jnp.where(bought, fee_per_sale[pick], 0.0),
        gain_se=pick_or_zero(gain_se),
        acc_gain=pick_or_zero(acc_gain),
        acc_gain_se=pick_or_zero(acc_gain_se),
        hostile=bought & params.hostile[pick],
    )
    flows = Flows(
        payment=outcome.payment,
        receipt=outcome.receipt,
        fees=settled.fees + query_fees,
        broker=settled.broker + query_fees.sum(),
    )
    state = state._replace(
        twins=twins,
        cash=state.cash.at[MARKET].set(settled.cash),
        strategy=strategy,
        trade_count=state.trade_count + bought.astype(jnp.int32),
    )
    return state, trades, flows


def step(
    spec: MarketSpec,
    params: MarketParams,
    data: MarketData,
    state: MarketState,
    key: jax.Array,
    r: jax.Array,
) -> tuple[MarketState, RoundRecord]:
    """One round: train all twins, trade on schedule, evaluate, earn, record.

    Args:
        spec: the static market (hashable).
        params: numeric knobs.
        data: this seed's data.
        state: the carry from the previous round.
        key: this round's key (``fold_in(round_key, r)`` in :func:`simulate`).
        r: () int32 round index; keep it unbatched under ``vmap`` so non-trading rounds
            skip the trade branch.

    Returns:
        The new state and the round's :class:`RoundRecord`.
    """
    model = spec.make_model()
    trainer = spec.make_trainer(model)
    agents = data.agents
    k_train, k_trade = jax.random.split(key)
    state, trained = _train(spec, trainer, params, data, state, k_train)
    traded = is_trading_round(params, r)
    state, trades, flows = jax.lax.cond(
        traded,
        lambda s, k: _trade(spec, s, k, trainer, model, data, params),
        lambda s, k: _no_trade(spec, s),
        state,
        k_trade,
    )
    ev = jax.vmap(trainer.evaluate, (0, None, None, None))
    val_loss, val_acc = ev(state.twins.params, agents.x_val, agents.y_val, agents.val_idx)
    test_loss, test_acc = ev(state.twins.params, agents.x_test, agents.y_test, agents.test_idx)
    if state.central is None:
        central_acc = jnp.full((spec.n,), jnp.nan, jnp.float32)
    else:
        p = jax.tree.map(
            lambda v: jnp.broadcast_to(v, (spec.n, *v.shape[1:])), state.central.params
        )
        _, central_acc = trainer.evaluate(p, agents.x_test, agents.y_test, agents.test_idx)
    # every twin earns revenue from its test quality (its customers) and pays compute
    econ = params.economy
    q_test = quality(test_loss, test_acc, kind=spec.quality)
    # (competitors are the agents in the market: a dead agent's quality is the floor 0)
    rev = jax.vmap(lambda q, a: revenue(jnp.where(a, q, 0.0), econ, spec.revenue))(
        q_test, state.alive
    )
    # a diverged agent earns with its frozen model; compute is paid by those who trained
    rev = jnp.where(state.alive, rev, 0.0)
    cost = jnp.where(trained, econ.step_cost * spec.local_steps, 0.0)
    cash = state.cash + rev - cost
    # an agent whose cash falls below zero leaves (if the scenario says so)
    alive = state.alive & ~(params.bankruptcy & (cash < 0))
    state = state._replace(cash=cash, alive=alive)
    record = RoundRecord(
        traded=traded,
        val_loss=val_loss,
        val_acc=val_acc,
        test_loss=test_loss,
        test_acc=test_acc,
        central_acc=central_acc,
        revenue=rev,
        cost=cost,
        cash=state.cash,
        flows=flows,
        trades=trades,
        trade_count=state.trade_count,
        alive=state.alive,
        endowment=state.endowment,
        diverged=state.diverged,
    )
    return state, record


def simulate(
    spec: MarketSpec, params: MarketParams, data: MarketData, key: jax.Array, rounds: int
) -> tuple[MarketState, RoundRecord]:
    """A whole run: :func:`init` then ``rounds`` rounds under ``lax.scan``.

    The key splits into an init key and a round key; round r uses ``fold_in(round_key, r)``
    (the Mesa view steps with the same keys, so both give the same numbers).

    Returns:
        The final state and the records, every leaf with a leading axis ``rounds``.
    """
    k_init, k_rounds = jax.random.split(key)
    state = constrain_state(spec, init(spec, params, k_init))

    def body(state, r):
        state, record = step(spec, params, data, state, jax.random.fold_in(k_rounds, r), r)
        return constrain_state(spec, state), record

    return jax.lax.scan(body, state, jnp.arange(rounds, dtype=jnp.int32))


def simulate_chunk(
    spec: MarketSpec,
    params: MarketParams,
    data: MarketData,
    state: MarketState,
    k_rounds: jax.Array,
    start: jax.Array,
    length: int,
) -> tuple[MarketState, RoundRecord]:
    """Rounds ``start .. start + length - 1`` of a run, from the state after round
    ``start - 1`` (or :func:`init`'s state for ``start = 0``): a piece of :func:`simulate`.

    Round r uses ``fold_in(k_rounds, r)`` as in :func:`simulate`, where ``k_rounds`` is
    the second half of ``jax.random.split(key)``, so running a run in chunks (the state
    carried from one to the next, records concatenated) gives :func:`simulate`'s numbers.
    ``start`` is traced (keep it unbatched under ``vmap``): one compilation per
    ``length``.

    Returns:
        The state after the chunk and its records, leaves with a leading axis ``length``.
    """

    def body(state, r):
        state, record = step(spec, params, data, state, jax.random.fold_in(k_rounds, r), r)
        return constrain_state(spec, state), record

    rounds = jnp.asarray(start, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    return jax.lax.scan(body, constrain_state(spec, state), rounds)


init_jit = jax.jit(init, static_argnums=0)
enter_jit = jax.jit(enter, static_argnums=0)
step_jit = jax.jit(step, static_argnums=0)
simulate_jit = jax.jit(simulate, static_argnums=(0, 4))
