"""The trading step of a round: candidates, hostile offers, valuation, pricing, settlement."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from paramarket_jax.broker import goods
from paramarket_jax.broker.methods import diagonal_fisher
from paramarket_jax.broker.value import (
    Mix,
    MixInputs,
    all_candidates,
    merge_settled,
    sample_candidates,
    value_with_perms,
)
from paramarket_jax.economics.revenue import (
    compensate,
    compensated_values,
    purchase_effects,
    purchase_values,
    quality,
    trade_effects,
)
from paramarket_jax.economics.strategies import StrategyState, learn, reports
from paramarket_jax.market.types import (
    MARKET,
    Flows,
    MarketData,
    MarketParams,
    MarketSpec,
    MarketState,
    Trades,
)
from paramarket_jax.mechanisms import Market, cap_bids, make_mechanism, settle
from paramarket_jax.models.spec import flatten
from paramarket_jax.population import agent_keys, sample_batch

# a ``poisoned`` offer is the seller's model plus Gaussian noise whose standard deviation is
# this times each layer's own root-mean-square weight (per agent, fresh every trading round)
POISON_SCALE = 1.0
# folded into a trading round's key for the hostile offers' randomness (the round's other
# keys are split as before, so scenarios without hostile agents draw exactly as they did)
HOSTILE_STREAM = 0x686F7374
# folded into a trading round's key for the merges' randomness (DARE's drops) and the rows
# each agent's Fisher is computed on (as the hostile stream: other scenarios draw as before)
MIX_STREAM = 0x6D697820
FISHER_STREAM = 0x66697368


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
        cands = all_candidates(real)
    else:
        cands = sample_candidates(key, real, spec.candidates)
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


def hostile_offers(spec: MarketSpec, key, state: MarketState, params: MarketParams, pop_params):
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


class TradeKeys(NamedTuple):
    """A trading round's keys, split once from its key (the split every version drew).

    Attributes:
        candidates: which sellers each buyer's broker values (``random`` pick).
        align: the weight matching's restarts.
        strategy: the adaptive strategies' exploration.
        roles: buyer and seller roles (``mechanism.roles = "random"``).
    """

    candidates: jax.Array
    align: jax.Array
    strategy: jax.Array
    roles: jax.Array

    @classmethod
    def of(cls, key: jax.Array) -> TradeKeys:
        return cls(*jax.random.split(key, 4))


class Offers(NamedTuple):
    """The broker's try-before-buy of a round as (N, N) buyer x seller matrices.

    Attributes:
        mask: bool, the pair may trade (a valued candidate, both trading, a finite merge,
            a seller the buyer may buy from).
        gain: predicted relative validation-loss gain; alpha: the merge's seller weight.
        gain_se, acc_gain, acc_gain_se: the gain's standard error, the relative accuracy
            gain and its standard error (see :class:`~paramarket_jax.broker.value.Valuation`).
        q_own: (N,) each buyer's quality now (0 for an agent out of the market);
        q_new: the buyer's quality after the merge (``q_own`` where not valued).
        candidates: (N, K) the sellers valued for each buyer; perms: name -> (N, K, size)
            the permutations found for them.
        second: the kept second knob of the merge method (0: none); shipped: parameters
            a trade ships (:func:`~paramarket_jax.broker.goods.shipped`).
        weights: (N, K, L) the layer-wise fit's weights per candidate, or None.
        buyers, sellers: the weights the broker merged
            (:func:`~paramarket_jax.broker.goods.views`; sellers None: the buyers');
        inputs: the merge's traced inputs (:class:`~paramarket_jax.broker.value.MixInputs`).
    """

    mask: jax.Array
    gain: jax.Array
    alpha: jax.Array
    gain_se: jax.Array
    acc_gain: jax.Array
    acc_gain_se: jax.Array
    q_own: jax.Array
    q_new: jax.Array
    candidates: jax.Array
    perms: dict
    second: jax.Array
    shipped: jax.Array
    weights: Any
    buyers: Any
    sellers: Any
    inputs: Any


class Quotes(NamedTuple):
    """What buyers and sellers report for every pair, (N, N), and what valuing cost.

    Attributes:
        mask: bool, the pair is offered to the mechanism (finite reports, guard passed).
        values, reservations: the buyer's value and the seller's reservation (true).
        bids, asks: the reports (0 where not offered); asks are at least the reserve.
        query_fees: (N,) what each buyer paid for its valuations.
        owed: what the buyer must pay the third parties if the pair trades
            (``economics.compensation`` times their estimated loss; 0 when off);
            factor, rivals: third party k is owed ``factor[i, j] * rivals[k]`` of it
            (:class:`~paramarket_jax.economics.revenue.Effects`, scaled by the share).
        world: (N,) the qualities the values were computed against (``q_own`` when
            myopic; after the tentative purchases when anticipating).
    """

    mask: jax.Array
    values: jax.Array
    reservations: jax.Array
    bids: jax.Array
    asks: jax.Array
    query_fees: jax.Array
    owed: jax.Array
    factor: jax.Array
    rivals: jax.Array
    world: jax.Array


class Deals(NamedTuple):
    """The mechanism's allocation, one entry per buyer (N,), and the settlement.

    Attributes:
        outcome: the mechanism's :class:`~paramarket_jax.mechanisms.base.Outcome`.
        settled: cash and fees after paying (:func:`~paramarket_jax.mechanisms.settle`).
        bought: bool, buyer i bought; seller: int32 its seller (-1: none); pick: the
            seller clipped to a valid index; alpha: the merge's seller weight (0: none).
        transfer: (N,) what each buyer paid for shipping (in ``settled``'s cash already).
        owed: (N,) what each buyer paid the third parties of its trade; compensation: (N,)
            each agent's compensation received less paid (in ``settled``'s cash already).
    """

    outcome: Any
    settled: Any
    bought: jax.Array
    seller: jax.Array
    pick: jax.Array
    alpha: jax.Array
    transfer: jax.Array
    owed: jax.Array
    compensation: jax.Array


def value(
    spec: MarketSpec,
    keys: TradeKeys,
    params: MarketParams,
    data: MarketData,
    pop_params,
    alive,
    loss_v,
    offered=None,
    inputs=None,
):
    """The broker's try-before-buy of a round: candidates, their scores and permutations.

    Args:
        keys: the round's :class:`TradeKeys` (candidates and alignment are drawn here).
        pop_params: the market twin's parameters (N, ...); alive: (N,) bool agents that
            may trade (in the market and not diverged);
        loss_v: (N,) each agent's own validation loss (the ``top`` pick's score).
        offered: what each agent offers as a seller (:func:`hostile_offers`); None: its model.
        inputs: the merge method's traced inputs (None: a linear merge).

    Returns:
        (candidates (N, K), Valuation, perms name -> (N, K, size)).
    """
    agents = data.agents
    cands = _candidates(spec, keys.candidates, loss_v, alive)
    val, perms = value_with_perms(
        spec.make_base_model(),
        pop_params,
        agents.x_val,
        agents.y_val,
        agents.val_idx,
        cands,
        keys.align,
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
        mix=mix_of(spec),
        inputs=inputs,
    )
    return cands, val, perms


def mix_of(spec: MarketSpec) -> Mix:
    """How the spec's broker merges (:class:`~paramarket_jax.broker.value.Mix`)."""
    return Mix(
        method=spec.merge,
        layers=spec.layers or None,
        fit=spec.fit,
        fit_steps=spec.fit_steps,
        second=spec.second,
    )


def mix_inputs(spec: MarketSpec, key, state: MarketState, params: MarketParams,
               data: MarketData, buyers) -> MixInputs | None:  # fmt: skip
    """The merge's traced inputs this round (None for a linear merge without a fit): the
    base, the second knob's grid, every agent's Fisher at its weights ``buyers`` (Fisher
    merging), the key of DARE's drops, the fit's learning rate."""
    if spec.merge == "linear" and spec.fit == "none":
        return None
    fisher = None
    if spec.merge == "fisher":
        fisher = fishers(spec, jax.random.fold_in(key, FISHER_STREAM), buyers, data)
    return MixInputs(
        base=state.base,
        second=params.second,
        fisher=fisher,
        key=jax.random.fold_in(key, MIX_STREAM),
        fit_lr=params.fit_lr,
    )


def fishers(spec: MarketSpec, key, params, data: MarketData):
    """Each agent's diagonal Fisher (flat leaves (N, ...)) at its weights ``params`` (the
    registered model's layout), on ``spec.fisher_rows`` rows of its own training shard
    (drawn with replacement from ``key``): what a seller hands the broker with its weights,
    never the buyer."""
    model, agents = spec.make_base_model(), data.agents

    def one(p, k, start, size):
        rows = sample_batch(k, agents.train_rows, start, size, spec.fisher_rows)
        losses = lambda q, x, y: model.losses(q, x, y)[0]  # noqa: E731
        return flatten(diagonal_fisher(losses, p, agents.x_train[rows], agents.y_train[rows]))

    return jax.vmap(one)(params, agent_keys(key, spec.n), agents.train_start, agents.train_size)


def merged_sides(spec: MarketSpec, key, state: MarketState, params: MarketParams, pop_params):
    """The buyers' and the sellers' weights as the broker merges them
    (:func:`~paramarket_jax.broker.goods.views`; sellers None: the buyers'). Hostile sellers
    offer something else than their model (drawn from a stream folded into ``key``)."""
    offered = None
    if spec.hostile:
        k_hostile = jax.random.fold_in(key, HOSTILE_STREAM)
        offered = hostile_offers(spec, k_hostile, state, params, pop_params)
    return goods.views(spec, pop_params, offered, state.base)


def value_offers(
    spec: MarketSpec, key: jax.Array, state: MarketState, params: MarketParams, data: MarketData
) -> Offers:
    """Every candidate pair of the market twin valued on the buyer's validation rows.

    ``key`` is the trading round's key: the hostile offers draw from a stream folded into
    it, the candidates and alignment from :class:`TradeKeys`.
    """
    n, agents = spec.n, data.agents
    pop = jax.tree.map(lambda v: v[MARKET], state.twins)
    alive = state.alive[MARKET]
    # only agents in the market trade, and a diverged agent neither buys nor sells
    trading = alive & ~state.diverged[MARKET]
    loss_v, acc_v = spec.make_trainer().evaluate(
        pop.params, agents.x_val, agents.y_val, agents.val_idx
    )
    buyers, sellers = merged_sides(spec, key, state, params, pop.params)
    inputs = mix_inputs(spec, key, state, params, data, buyers)
    cands, val, perms = value(
        spec, TradeKeys.of(key), params, data, buyers, trading, loss_v, sellers, inputs
    )

    def pairs(v, fill=0.0, dtype=jnp.float32):  # (P,) per-pair scores -> (N, N) buyer x seller
        return jnp.full((n, n), fill, dtype).at[val.buyer, val.seller].set(v)

    mask = pairs(True, False, bool) & ~jnp.eye(n, dtype=bool)
    sells = params.seller_only
    mask = jnp.where(sells.any(), mask & sells[None, :] & ~sells[:, None], mask)
    mask = mask & trading[:, None] & trading[None, :]
    # a merge whose validation loss is not finite is never offered (whatever the quality
    # measure makes of it: accuracy stays finite when the loss is NaN)
    mask = mask & pairs(jnp.isfinite(val.loss_after), False, bool)
    # money: values from the broker's validation estimate of each buyer's new quality (a
    # diverged agent still sells to customers with its frozen model: it competes)
    q_own = jnp.where(alive, quality(loss_v, acc_v, kind=spec.quality), 0.0)
    q_pair = quality(val.loss_after, val.acc_after, kind=spec.quality)
    if spec.quality == "accuracy":  # an unchanged accuracy is the buyer's own, exactly (not
        # the rounding between two evaluations, on which a worthless trade could clear)
        q_pair = jnp.where(val.acc_gain == 0, q_own[val.buyer], q_pair)
    q_new = jnp.broadcast_to(q_own[:, None], (n, n)).at[val.buyer, val.seller].set(q_pair)
    second = pairs(val.second) if val.second is not None else jnp.zeros((n, n))
    weights = None if val.weights is None else val.weights.reshape(n, cands.shape[1], -1)
    return Offers(
        mask=mask,
        gain=pairs(val.gain),
        alpha=pairs(val.best_alpha),
        gain_se=pairs(val.gain_se),
        acc_gain=pairs(val.acc_gain),
        acc_gain_se=pairs(val.acc_gain_se),
        q_own=q_own,
        q_new=q_new,
        candidates=cands,
        perms=perms,
        second=second,
        shipped=goods.shipped(spec, second),
        weights=weights,
        buyers=buyers,
        sellers=sellers,
        inputs=inputs,
    )


def quote(
    spec: MarketSpec,
    key: jax.Array,
    state: MarketState,
    params: MarketParams,
    offers: Offers,
    world=None,
) -> tuple[Quotes, StrategyState]:
    """Values and reservations of every offered pair, the strategies' reports, the query
    fees, and the buyers' guard; returns the quotes and the strategies' new state.

    ``key``: the strategies' key (:attr:`TradeKeys.strategy`). ``world``: (N,) the
    qualities the other agents will have (None: today's, ``offers.q_own``).

    With ``params.compensation`` = s > 0 a buyer owes the third parties s times the loss
    its purchase causes them (estimated as its value is), so it values the purchase net
    of that: ``(1 - s) * value + s * (reservation + social)`` (= value - s * harm).
    """
    econ = params.economy
    effects = purchase_effects(offers.q_own, offers.q_new, econ, spec.revenue, world)
    share = params.compensation
    values, owed = compensated_values(effects, share)
    reservations = effects.reservations
    # a buyer pays for shipping what it buys: its value of a trade is net of that cost
    values = values - params.transfer_cost * offers.shipped
    bids, asks, strategy = reports(key, values, reservations, params.strategy, state.strategy)
    mask = offers.mask
    # each buyer pays for every candidate the broker valued for it; sellers-only pay none
    query_fees = econ.query_fee * mask.sum(1).astype(jnp.float32)
    # a non-finite estimate (NaN weights, diverged merge) means "not a candidate"
    asks = jnp.maximum(asks, params.knobs.reserve)  # the reserve is every seller's lowest
    mask = mask & jnp.isfinite(bids) & jnp.isfinite(asks)
    # the buyers' guard (after the queries are paid: the valuation was made): offer a pair
    # only if its validation gain, in the quality buyers pay for, clears the bound:
    # gain - z * se >= min_gain and > 0
    z = jnp.where(params.confidence > 0, jax.scipy.special.ndtri(params.confidence), 0.0)
    if spec.quality == "accuracy":
        lower = offers.acc_gain - z * offers.acc_gain_se
    else:
        lower = offers.gain - z * offers.gain_se
    guarded = (params.min_gain > 0) | (params.confidence > 0)
    mask = mask & (~guarded | ((lower > 0) & (lower >= params.min_gain)))
    bids, asks = jnp.where(mask, bids, 0.0), jnp.where(mask, asks, 0.0)
    factor = jnp.where(share > 0, share * effects.factor, 0.0)
    world = offers.q_own if world is None else world
    quotes = Quotes(mask, values, reservations, bids, asks, query_fees, owed, factor,
                    effects.rivals, world)  # fmt: skip
    return quotes, strategy


def clear(
    spec: MarketSpec,
    key: jax.Array,
    state: MarketState,
    params: MarketParams,
    offers: Offers,
    quotes: Quotes,
) -> Deals:
    """Run the mechanism on the quotes (bids capped by cash after the query fees) and settle
    the payments. ``key``: the roles' key (:attr:`TradeKeys.roles`)."""
    n, econ = spec.n, params.economy
    cash = state.cash[MARKET] - quotes.query_fees
    knobs = params.knobs
    if spec.roles == "random":
        knobs = knobs._replace(roles=jax.random.bernoulli(key, 0.5, (n,)))
    mechanism = make_mechanism(spec.mechanism, **dict(spec.mechanism_options))
    # a buyer that owes compensation bids at most what its cash leaves after paying it
    owed = quotes.owed
    bids = jnp.minimum(cap_bids(quotes.bids, cash), jnp.maximum(cash[:, None] - owed, 0.0))
    mask = quotes.mask & ((owed <= 0) | (cash[:, None] >= owed))
    market = Market(bids=bids, asks=quotes.asks, mask=mask)
    outcome = mechanism.run(market, knobs)
    settled = settle(cash, outcome, econ.trade_fee, econ.fee_share)
    bought = outcome.alloc.any(axis=1)
    seller = jnp.where(bought, outcome.alloc.argmax(axis=1), -1)
    pick = jnp.clip(seller, 0)
    rows = jnp.arange(n)
    alpha = jnp.where(bought, offers.alpha[rows, pick], 0.0)
    transfer = jnp.where(bought, params.transfer_cost * offers.shipped[rows, pick], 0.0)
    paid, compensation = compensate(quotes.factor, quotes.rivals, bought, pick)
    settled = settled._replace(cash=settled.cash - transfer + compensation)
    seller = seller.astype(jnp.int32)
    return Deals(outcome, settled, bought, seller, pick, alpha, transfer, paid, compensation)


def apply_trades(
    spec: MarketSpec, state: MarketState, data: MarketData, offers: Offers, deals: Deals
):
    """Merge every buyer with its seller (with the permutations found while valuing: no
    second weight matching), reset the buyers' optimizers, and measure each purchase on
    the buyer's test rows.

    Returns:
        (the market twin's new population, (N,) realised relative test-loss gain, the
        quality before and after on test).
    """
    n, agents = spec.n, data.agents
    trainer = spec.make_trainer()
    pop = jax.tree.map(lambda v: v[MARKET], state.twins)
    rows = jnp.arange(n)
    slot = jnp.argmax(offers.candidates == deals.pick[:, None], axis=1)
    chosen = jax.tree.map(lambda p: p[rows, slot], offers.perms)
    merged = merge_settled(
        spec.make_base_model().spec,
        offers.buyers,
        deals.pick,
        deals.alpha,
        deals.bought,
        chosen,
        layers=spec.layers or None,
        batch_size=spec.chunk or None,
        offers=offers.sellers,
        mix=mix_of(spec),
        inputs=offers.inputs,
        second=offers.second[rows, deals.pick] if spec.second else None,
        weights=None if offers.weights is None else offers.weights[rows, slot],
    )
    merged = goods.settle(spec, pop.params, merged)
    before = trainer.evaluate(pop.params, agents.x_test, agents.y_test, agents.test_idx)
    after = trainer.evaluate(merged, agents.x_test, agents.y_test, agents.test_idx)
    bought = deals.bought
    realized = jnp.where(bought, (before[0] - after[0]) / jnp.maximum(before[0], 1e-12), 0.0)
    q_before = quality(*before, kind=spec.quality)
    q_after = quality(*after, kind=spec.quality)
    new = trainer.reset_optimizer(pop._replace(params=merged), bought)
    return new, realized, q_before, q_after


def _effects(spec: MarketSpec, state: MarketState, econ, q_before, q_after):
    """Each trade's social and private value against the round's other trades, on test:
    what it did to every live agent's revenue, and to its buyer's."""
    alive = state.alive[MARKET]
    return trade_effects(
        jnp.where(alive, q_before, 0.0), jnp.where(alive, q_after, 0.0), econ, spec.revenue
    )


def book(
    spec: MarketSpec,
    state: MarketState,
    params: MarketParams,
    offers: Offers,
    quotes: Quotes,
    deals: Deals,
    realized,
    q_before,
    q_after,
) -> tuple[Trades, Flows]:
    """The round's trade columns (one entry per buyer) and money flows."""
    n, econ = spec.n, params.economy
    outcome, settled, bought, pick = deals.outcome, deals.settled, deals.bought, deals.pick
    rows = jnp.arange(n)
    realized_values, _ = purchase_values(
        q_before, jnp.broadcast_to(q_after[:, None], (n, n)), econ, spec.revenue
    )
    sales = outcome.alloc.sum(0)
    fee_per_sale = settled.fees / jnp.maximum(sales, 1).astype(jnp.float32)
    social, private = _effects(spec, state, econ, q_before, q_after)

    def picked(m):  # (N, N) -> the buyer's row at its seller, 0 where it did not buy
        return jnp.where(bought, m[rows, pick], 0.0)

    trades = Trades(
        mask=bought,
        seller=deals.seller,
        alpha=deals.alpha,
        predicted_gain=picked(offers.gain),
        realized_gain=realized,
        value=picked(quotes.values),
        realized_value=jnp.where(bought, realized_values[:, 0] - deals.transfer, 0.0),
        reservation=picked(quotes.reservations),
        bid=picked(quotes.bids),
        ask=picked(quotes.asks),
        price=picked(outcome.price),
        fee=jnp.where(bought, fee_per_sale[pick], 0.0),
        gain_se=picked(offers.gain_se),
        acc_gain=picked(offers.acc_gain),
        acc_gain_se=picked(offers.acc_gain_se),
        hostile=bought & params.hostile[pick],
        second=picked(offers.second),
        shipped=picked(offers.shipped),
        transfer=deals.transfer,
        compensation=deals.owed,
        social_value=jnp.where(bought, social, 0.0),
        external_value=jnp.where(bought, social - private, 0.0),
    )
    # shipping is paid to the broker, which ships the weights
    flows = Flows(
        payment=outcome.payment,
        receipt=outcome.receipt,
        fees=settled.fees + quotes.query_fees + deals.transfer,
        broker=settled.broker + quotes.query_fees.sum() + deals.transfer.sum(),
        compensation=deals.compensation,
    )
    return trades, flows


def anticipate(spec: MarketSpec, keys: TradeKeys, state: MarketState, params: MarketParams,
               offers: Offers, quotes: Quotes, strategy, deals: Deals):  # fmt: skip
    """Valuation that anticipates the rivals (``broker.valuation = anticipating``).

    Each pass values every pair again against the world the last allocation makes (every
    other buyer at the quality the broker predicted for its tentative purchase, on the
    same validation scores: no merge, no evaluation) and clears the market on those
    values. It stops at a fixed point (an allocation that reproduces itself) or after
    ``spec.passes`` passes; what settles is the last pass's quotes and deals (priced on
    the anticipating values). Each pass costs one quote and one mechanism run.

    Returns:
        (quotes, the strategies' new state, deals) of the pass that settles.
    """
    rows = jnp.arange(spec.n)
    done = jnp.zeros((), bool)
    for _ in range(spec.passes):
        world = jnp.where(deals.bought, offers.q_new[rows, deals.pick], offers.q_own)
        q, new_strategy = quote(spec, keys.strategy, state, params, offers, world)
        d = clear(spec, keys.roles, state, params, offers, q)
        same = jnp.all(d.seller == deals.seller)
        quotes, strategy, deals = jax.tree.map(
            functools.partial(jnp.where, done), (quotes, strategy, deals), (q, new_strategy, d)
        )
        done = done | same
    return quotes, strategy, deals


def learn_prices(
    state: StrategyState, params: MarketParams, quotes: Quotes, deals: Deals
) -> StrategyState:
    """Adaptive strategies learn from their own realised surplus (true values)."""
    outcome, bought, pick = deals.outcome, deals.bought, deals.pick
    rows = jnp.arange(bought.shape[0])
    buyer_surplus = jnp.where(bought, quotes.values[rows, pick], 0.0) - outcome.payment
    seller_surplus = outcome.receipt - jnp.where(outcome.alloc, quotes.reservations, 0.0).sum(0)
    scale = jnp.maximum(jnp.abs(jnp.where(quotes.mask, quotes.values, 0.0)).max(), 1e-6)
    return learn(state, params.strategy, buyer_surplus, seller_surplus, scale)


def no_trade(
    spec: MarketSpec, key: jax.Array, state: MarketState, params: MarketParams, data: MarketData
) -> tuple[MarketState, Trades, Flows]:
    """The branch of rounds without trading: nothing moves."""
    return state, Trades.empty(spec.n), Flows.empty(spec.n)


def trade(
    spec: MarketSpec, key: jax.Array, state: MarketState, params: MarketParams, data: MarketData
) -> tuple[MarketState, Trades, Flows]:
    """The market twin's trading round: value the offers, quote, clear, merge, book."""
    keys = TradeKeys.of(key)
    offers = value_offers(spec, key, state, params, data)
    quotes, strategy = quote(spec, keys.strategy, state, params, offers)
    deals = clear(spec, keys.roles, state, params, offers, quotes)
    if spec.valuation == "anticipating":
        quotes, strategy, deals = anticipate(
            spec, keys, state, params, offers, quotes, strategy, deals
        )
    new, realized, q_before, q_after = apply_trades(spec, state, data, offers, deals)
    trades, flows = book(spec, state, params, offers, quotes, deals, realized, q_before, q_after)
    state = state._replace(
        twins=jax.tree.map(lambda t, v: t.at[MARKET].set(v), state.twins, new),
        cash=state.cash.at[MARKET].set(deals.settled.cash),
        strategy=learn_prices(strategy, params, quotes, deals),
        trade_count=state.trade_count + deals.bought.astype(jnp.int32),
    )
    return state, trades, flows
