"""One market round as a pure function, and a whole run as a ``lax.scan`` of it (DESIGN.md s2).

``step(spec, key, state, params, data, r)`` is one round: train every twin, trade on
schedule (``lax.cond`` on the unbatched round index), settle, evaluate, earn (bankrupt
agents leave), admit entrants into free slots while the market looks profitable.
``simulate`` scans it over rounds (purejaxrl's ``train(key)``). This module imports no Mesa.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from paramarket_jax.economics.revenue import quality, revenue
from paramarket_jax.economics.strategies import init_state
from paramarket_jax.market.sharding import constrain_state
from paramarket_jax.market.trade import no_trade, trade
from paramarket_jax.market.types import (
    MARKET,
    MarketData,
    MarketParams,
    MarketSpec,
    MarketState,
    RoundRecord,
)
from paramarket_jax.models.lora import with_frozen
from paramarket_jax.population import Population

# folded into the init key for the shared base (the agents' keys are as without one)
PRETRAIN_STREAM = 0x62617365
# folded into the round key for entry (the entrants' order and fresh models), so the
# round's other draws, and every number of a market without entry, are as without it
ENTRY_STREAM = 0x656E7472


def fedavg(pop: Population, weights: jax.Array) -> Population:
    """Replace every agent's parameters by the weighted average (plain, no alignment)."""
    w = weights / weights.sum()

    def avg(leaf):
        return jnp.broadcast_to(jnp.tensordot(w, leaf, axes=1), leaf.shape)

    return pop._replace(params=jax.tree.map(avg, pop.params))


def is_trading_round(params: MarketParams, r) -> jax.Array:
    """The paper's schedule: trade when ``r >= start`` and ``r % every == 0``."""
    return (r >= params.trade_start) & (r % params.trade_every == 0)


def pretrain(spec: MarketSpec, key: jax.Array, params: MarketParams, data: MarketData):
    """The shared base: one model of ``spec.make_base_model()`` trained for
    ``spec.pretrain`` steps on the public rows (minibatches of ``spec.pretrain_batch``, at
    ``params.pretrain_lr``). Returns one model's parameters (no agent axis)."""
    trainer = spec.make_base_trainer()
    k_init, k_train = jax.random.split(key)
    pop = trainer.init(k_init, 1, params.pretrain_lr)
    rows = data.public_rows
    public = data.agents._replace(
        train_rows=rows,
        train_start=jnp.zeros(1, jnp.int32),
        train_size=jnp.full(1, rows.shape[0], jnp.int32),
    )
    pop, _ = trainer.train(pop, k_train, public, spec.pretrain)
    return jax.tree.map(lambda v: v[0], pop.params)


def fresh(spec: MarketSpec, key: jax.Array, n: int, learning_rate, base) -> Population:
    """``n`` fresh agents: their own random initialisations from ``key`` or, with a shared
    ``base``, the base (with fresh LoRA adapters from ``key`` under ``goods = adapter``),
    fresh optimizer states either way."""
    trainer = spec.make_trainer()
    pop = trainer.init(key, n, learning_rate)
    if base is None:
        return pop
    stacked = jax.tree.map(lambda v: jnp.broadcast_to(v, (n, *v.shape)), base)
    if spec.goods == "adapter":
        stacked = jax.vmap(with_frozen)(pop.params, stacked)
    return trainer.reset_optimizer(pop._replace(params=stacked), jnp.ones(n, bool))


def init(
    spec: MarketSpec, key: jax.Array, params: MarketParams, data: MarketData | None = None
) -> MarketState:
    """Fresh populations (every twin starts from the same weights), cash and bandits; with
    ``spec.pretrain`` steps, the shared base is trained first on ``data``'s public rows
    (:func:`pretrain`, from a key of its own) and every agent starts from it."""
    base = None
    if spec.pretrain:
        if data is None or data.public_rows is None:
            raise ValueError("a market with a shared base needs its data (public rows) in init")
        base = pretrain(spec, jax.random.fold_in(key, PRETRAIN_STREAM), params, data)
    pop = fresh(spec, key, spec.n, params.learning_rate, base)
    twins = jax.tree.map(lambda v: jnp.stack([v] * spec.twins), pop)
    central = None
    if spec.centralized:
        # the centralized model trains at agent 0's learning rate
        central = fresh(spec, jax.random.fold_in(key, spec.real), 1, params.learning_rate[0], base)
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
        base=base,
    )


def enter(
    spec: MarketSpec, key: jax.Array, state: MarketState, params: MarketParams, slots
) -> MarketState:
    """Agents enter the free ``slots`` ((N,) bool, dead in the market twin) with fresh models.

    An entrant starts in every twin (its siloed twin is the same newcomer never trading):
    fresh weights (the shared base, if there is one) and optimizer from ``key``, the
    initial cash, no purchases, a fresh bandit, not diverged (its initial loss is
    measured when it first trains). Everyone else is untouched. :func:`admit` calls it at
    the end of a round, for the slots :func:`entrants` picks. The slot's earlier utility
    stays in its accounts (the endowment grows by what the entrant brings beyond the
    leaver's cash), so welfare still counts what the leaver lost.
    """
    slots = jnp.asarray(slots, bool) & ~state.alive[MARKET]
    new = fresh(spec, key, spec.n, params.learning_rate, state.base)

    def pick(new, old):  # old (T, N, ...), new (N, ...)
        m = slots.reshape((1, spec.n) + (1,) * (old.ndim - 2))
        return jnp.where(m, new[None], old)

    twins = jax.tree.map(pick, new, state.twins)
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
        else jax.tree.map(lambda u, v: pick(u, v[None])[0], new.params, state.initial_params),
    )


def entrants(
    spec: MarketSpec, key: jax.Array, state: MarketState, params: MarketParams, was_in, profit
) -> jax.Array:
    """The free slots that take entrants after a round (``agents.entry``).

    The market looks profitable when the mean profit of the agents that were in it this
    round beats ``params.entry_profit``; then up to ``params.entry_max`` free slots (dead
    in the market twin after the round's exits; never a padded slot) enter, the first
    ones of a random order of the slots drawn from ``key`` (slot i's draw from
    ``fold_in(key, i)``, so the padding never changes it).

    Args:
        was_in: (N,) bool the agents in the market (market twin) when the round began.
        profit: (N,) this round's profit of each market agent: revenue - cost + receipt
            - payment - fees + compensation.

    Returns:
        (N,) bool, all False unless ``params.entry`` is on.
    """
    count = was_in.sum()
    mean = jnp.where(was_in, profit, 0.0).sum() / jnp.maximum(count, 1)
    profitable = params.entry & (count > 0) & (mean > params.entry_profit)
    slot = jnp.arange(spec.n)
    free = ~state.alive[MARKET] & (slot < spec.real)
    draw = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(slot)
    rank = jnp.argsort(jnp.argsort(jnp.where(free, draw, jnp.inf)))
    return profitable & free & (rank < params.entry_max)


def admit(
    spec: MarketSpec, key: jax.Array, state: MarketState, params: MarketParams, was_in, profit
) -> tuple[MarketState, jax.Array]:
    """Entry at the end of a round (a market whose spec has the stage, ``spec.entry``):
    :func:`entrants` picks the slots (from one half of ``key``), :func:`enter` gives them
    fresh models (from the other). Skipped by a ``lax.cond`` when ``params.entry`` is off
    (a real branch under ``vmap`` while the runs share the knob) and when no slot enters.

    Returns:
        The state after entry and (N,) bool the slots that entered.
    """
    k_order, k_fresh = jax.random.split(key)

    def entering(state):
        slots = entrants(spec, k_order, state, params, was_in, profit)
        state = jax.lax.cond(
            slots.any(), lambda s: enter(spec, k_fresh, s, params, slots), lambda s: s, state
        )
        return state, slots

    def closed(state):
        return state, jnp.zeros(spec.n, bool)

    return jax.lax.cond(params.entry, entering, closed, state)


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


def train(
    spec: MarketSpec, key: jax.Array, state: MarketState, params: MarketParams, data: MarketData
) -> tuple[MarketState, jax.Array]:
    """Local training of every twin's agents that are in the market and not diverged.

    An agent whose training diverges this round (:func:`diverging`) keeps its parameters
    and optimizer state from before the round (its last finite model), is marked diverged
    and never trains again; FedAvg leaves it out of the average.

    Returns:
        The new state and (T, N) bool: the agents that trained this round (and pay its
        compute), diverging or not.
    """
    agents, trainer = data.agents, spec.make_trainer()
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


def evaluate(spec: MarketSpec, state: MarketState, data: MarketData):
    """Every twin's validation and test loss and accuracy, (T, N) each, and the centralized
    model's test accuracy on each agent's test rows, (N,) (NaN without that baseline)."""
    agents, trainer = data.agents, spec.make_trainer()
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
    return val_loss, val_acc, test_loss, test_acc, central_acc


def earn(spec: MarketSpec, state: MarketState, params: MarketParams, test_loss, test_acc,
         trained) -> tuple[MarketState, jax.Array, jax.Array]:  # fmt: skip
    """Every twin's revenue from its test quality (its customers) less compute, and the
    bankruptcy exits: the new state, revenue and cost, (T, N) each.

    ``trained``: (T, N) bool the agents that trained this round (they pay its compute).
    """
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
    return state._replace(cash=cash, alive=alive), rev, cost


def step(
    spec: MarketSpec,
    key: jax.Array,
    state: MarketState,
    params: MarketParams,
    data: MarketData,
    r: jax.Array,
) -> tuple[MarketState, RoundRecord]:
    """One round: train all twins, trade on schedule, evaluate, earn (bankrupt agents
    leave), record, admit entrants (with ``spec.entry``: :func:`admit`, from
    ``fold_in(key, ENTRY_STREAM)``, so the round's other draws are as without entry).

    Args:
        spec: the static market (hashable).
        key: this round's key (``fold_in(round_key, r)`` in :func:`simulate`).
        state: the carry from the previous round.
        params: numeric knobs.
        data: this seed's data.
        r: () int32 round index; keep it unbatched under ``vmap`` so non-trading rounds
            skip the trade branch.

    Returns:
        The state after the round's entries and the round's :class:`RoundRecord`.
    """
    k_train, k_trade = jax.random.split(key)
    was_in = state.alive[MARKET]
    state, trained = train(spec, k_train, state, params, data)
    traded = is_trading_round(params, r)
    state, trades, flows = jax.lax.cond(
        traded,
        lambda s, k: trade(spec, k, s, params, data),
        lambda s, k: no_trade(spec, k, s, params, data),
        state,
        k_trade,
    )
    scores = evaluate(spec, state, data)
    _, _, test_loss, test_acc, _ = scores
    state, rev, cost = earn(spec, state, params, test_loss, test_acc, trained)
    after, entered = state, jnp.zeros(spec.n, bool)
    if spec.entry:  # static: a market without entry compiles no entrants
        k_entry = jax.random.fold_in(key, ENTRY_STREAM)
        after, entered = admit(spec, k_entry, state, params, was_in, profit(rev, cost, flows))
    return after, record_of(state, traded, scores, rev, cost, flows, trades, entered)


def profit(revenue, cost, flows):
    """(N,) each market agent's profit in a round: revenue - cost + receipt - payment - fees
    + compensation (what the entry rule averages). Plain arithmetic, so it takes the
    round's arrays or a host record's (``RoundRecord.revenue``, ``cost``, ``flows``).

    Args:
        revenue, cost: (T, N) per twin; flows: the market's money flows.
    """
    f = flows
    return revenue[MARKET] - cost[MARKET] + f.receipt - f.payment - f.fees + f.compensation


def record_of(state: MarketState, traded, scores, rev, cost, flows, trades, entered):
    """The round's :class:`RoundRecord`: its scores (:func:`evaluate`'s five arrays), money
    and trades, the accounts of ``state`` (after the round's exits, before its entries)
    and the slots that ``entered`` after it."""
    val_loss, val_acc, test_loss, test_acc, central_acc = scores
    return RoundRecord(
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
        entered=entered,
    )


def simulate(
    spec: MarketSpec, key: jax.Array, params: MarketParams, data: MarketData, rounds: int
) -> tuple[MarketState, RoundRecord]:
    """A whole run: :func:`init` then ``rounds`` rounds under ``lax.scan``
    (:func:`simulate_chunk` from round 0: one scan body for whole and chunked runs).

    The key splits into an init key and a round key; round r uses ``fold_in(round_key, r)``
    (the Mesa view steps with the same keys, so both give the same numbers).

    Returns:
        The final state and the records, every leaf with a leading axis ``rounds``.
    """
    k_init, k_rounds = jax.random.split(key)
    state = init(spec, k_init, params, data)
    return simulate_chunk(spec, k_rounds, state, params, data, jnp.int32(0), rounds)


def simulate_chunk(
    spec: MarketSpec,
    k_rounds: jax.Array,
    state: MarketState,
    params: MarketParams,
    data: MarketData,
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
        state, record = step(spec, jax.random.fold_in(k_rounds, r), state, params, data, r)
        return constrain_state(spec, state), record

    rounds = jnp.asarray(start, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    return jax.lax.scan(body, constrain_state(spec, state), rounds)


init_jit = jax.jit(init, static_argnums=0)
step_jit = jax.jit(step, static_argnums=0)
