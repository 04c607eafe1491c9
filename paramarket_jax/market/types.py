"""The pure market's types (DESIGN.md s2), and which of their leaves are per agent or per seed.

Three kinds of value are kept apart, as gymnax keeps ``EnvParams`` from the state:

- :class:`MarketSpec`: everything static (shapes, names, counts); hashable, the only thing
  that decides compilation.
- :class:`MarketParams`: every numeric knob as arrays; traced, so a sweep over them is a
  ``vmap``, never a recompile.
- :class:`MarketState`: what a round carries to the next (populations, cash, bandits).

Populations are stacked on a leading "twin" axis (``MarketSpec.twin_names``): index 0
(:data:`MARKET`) is the market, then the siloed counterfactual (same keys, same data, never
trades; on unless turned off) and, when asked for, a FedAvg baseline.

:data:`PARAM_AXES`, :data:`DATA_AXES` and :data:`STATE_AXES` declare, once, what each leaf's
leading axes are (:data:`AGENT`, :data:`SEED`, ...): padding the population for devices
(:mod:`paramarket_jax.market.sharding`), batching seeds (:mod:`paramarket_jax.engines.batch`)
and building the knobs (:mod:`paramarket_jax.experiment`) read them from here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from paramarket_jax.economics.revenue import Economy
from paramarket_jax.economics.strategies import StrategyParams, StrategyState
from paramarket_jax.mechanisms.base import Knobs
from paramarket_jax.models import Model, make_model
from paramarket_jax.models.lora import lora
from paramarket_jax.population import AgentData, Population, Trainer, make_trainer

MARKET = 0


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
            of their model (:func:`~paramarket_jax.market.trade.hostile_offers`):
            ``random``, ``stale`` or ``poisoned``; "" when no agent is hostile (nothing is
            replaced, nothing extra computed).
        pad: dead agents appended to fill the devices (:mod:`~paramarket_jax.market.sharding`): the
            real agents are the first ``n - pad``; the padded ones are never alive, and
            every random draw of the real agents is the same as without them.
        devices: devices the market runs on (1: no sharding); shard: how it is split over
            them, ``agents`` (the population) or ``runs`` (the batch path's run axis).
        solver: the weight matching's assignment solver
            (:func:`~paramarket_jax.broker.align.hungarian`, ``broker.solver``):
            ``optax`` (inside the program, so the compilation cache can keep it; always on
            several devices, where a host callback would pull the split work onto one) or
            ``callback`` (scipy on the host: faster rounds on a CPU, compiled again by
            every process, since JAX never caches a program holding a host callback).
        heads: how weight matching treats attention heads (``broker.heads``): ``grouped``
            (whole heads, then units inside each head) or ``flat`` (each head set's units
            as one group, mixing heads: the ablation); the model's spec carries it.
        vocab, targets: the dataset's input token ids (0 for features) and whether it has
            one target per example (``last``) or per position (``all``).
        pretrain: steps of the shared base's training inside :func:`~paramarket_jax.market.
            round.init` (0: no base, every agent starts from its own initialisation);
            pretrain_batch: its minibatch size.
        goods: what sellers sell (``broker.goods``): ``model``, ``delta`` (the task vector,
            fine-tuned minus base) or ``adapter`` (LoRA adapters of rank ``rank`` on the
            kernels ``adapt`` names, trained with the base frozen).
        merge: the broker's merge method (``broker.merge``, :data:`~paramarket_jax.broker.
            methods.METHODS`); second: entries of its second knob's grid (0: none);
            fit: ``none`` or ``layerwise``; fit_steps: the fit's gradient steps;
            fisher_rows: training rows each agent's diagonal Fisher is computed on.
        valuation: how a buyer values a purchase (``broker.valuation``): ``myopic`` (its
            rivals stand still) or ``anticipating`` (against the purchases the round's
            other buyers make, :func:`~paramarket_jax.market.trade.anticipate`); passes:
            the anticipating valuation's most passes.
        entry: the round ends with an entry stage (``agents.entry``,
            :func:`~paramarket_jax.market.round.admit`): newcomers may take free slots.
            Static, as the FedAvg twin is: a market without it compiles no entrants'
            fresh models (a quarter of a small market's compile time); within it the
            knobs ``MarketParams.entry``, ``entry_profit`` and ``entry_max`` are traced.
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
    pad: int = 0
    devices: int = 1
    shard: str = "agents"
    solver: str = "optax"
    heads: str = "grouped"
    vocab: int = 0
    targets: str = "last"
    pretrain: int = 0
    pretrain_batch: int = 64
    goods: str = "model"
    merge: str = "linear"
    second: int = 0
    rank: int = 4
    adapt: tuple[str, ...] = ("*kernel",)
    fit: str = "none"
    fit_steps: int = 10
    fisher_rows: int = 64
    valuation: str = "myopic"
    passes: int = 3
    entry: bool = False

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
        """The agents' model (one per model setting: equal specs share its jitted
        functions): the registered model, or it with LoRA adapters (``goods = adapter``)."""
        base = self.make_base_model()
        if self.goods == "adapter":
            return _adapted(base, self.rank, self.adapt)
        return base

    def make_base_model(self) -> Model:
        """The registered model itself (what the shared base and the merges are)."""
        return _model(
            self.model, self.input_shape, self.num_classes, self.model_options, self.data_keys
        )

    def make_base_trainer(self) -> Trainer:
        """The trainer of the shared base (every parameter trains, minibatch
        ``pretrain_batch``)."""
        return _trainer(
            self.model, self.input_shape, self.num_classes, self.model_options,
            self.data_keys, self.optimizer, self.pretrain_batch, "model", self.rank, self.adapt,
        )  # fmt: skip

    @property
    def data_keys(self) -> tuple:
        """What the model takes from the dataset and the broker (hashable)."""
        return (self.vocab, self.targets, self.heads)

    def make_trainer(self) -> Trainer:
        """The population's trainer (one per setting, so every piece of a round that
        trains or evaluates calls the same jitted functions and traces them once)."""
        return _trainer(
            self.model, self.input_shape, self.num_classes, self.model_options,
            self.data_keys, self.optimizer, self.batch_size, self.goods, self.rank, self.adapt,
        )  # fmt: skip


@functools.cache
def _adapted(model: Model, rank: int, adapt: tuple[str, ...]) -> Model:
    return lora(model, rank=rank, targets=adapt)


@functools.cache
def _model(name: str, input_shape, num_classes: int, options, data_keys) -> Model:
    vocab, targets, heads = data_keys
    model = make_model(
        name, input_shape, num_classes, vocab=vocab, targets=targets, **dict(options)
    )
    if heads == "flat":
        return dataclasses.replace(model, spec=model.spec.unblocked())
    return model


@functools.cache
def _trainer(name, input_shape, num_classes, options, data_keys, optimizer, batch_size, goods,
             rank, adapt) -> Trainer:  # fmt: skip
    model = _model(name, input_shape, num_classes, options, data_keys)
    if goods == "adapter":
        model = _adapted(model, rank, adapt)
    return make_trainer(model, optimizer, batch_size)


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
            slots that entrants take, see :func:`~paramarket_jax.market.round.enter`).
        bankruptcy: () bool an agent whose cash falls below zero leaves the market.
        diverge_loss: () an agent whose training loss after a round's local training
            exceeds this times its initial loss has diverged (see
            :func:`~paramarket_jax.market.round.diverging`).
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
        second: (D,) the merge method's second knob's grid (TIES' density, DARE's drop
            rate), tried with every weight of ``alphas``.
        fit_lr: () the layer-wise fit's learning rate.
        pretrain_lr: () the shared base's learning rate.
        transfer_cost: () money per parameter shipped to a buyer (paid by the buyer to the
            broker, which ships it).
        compensation: () share in [0, 1] of the third parties' estimated revenue loss a
            buyer pays them for its purchase (0: none; 1: the rivals a trade hurts are
            made whole, so only trades that grow total revenue clear).
        entry: () bool newcomers enter free slots at the end of a round while the market
            looks profitable (:func:`~paramarket_jax.market.round.admit`; only in a market
            whose spec has the entry stage, ``MarketSpec.entry``: there, switching it
            off, as a Mesa-side rule may, recompiles nothing).
        entry_profit: () the market looks profitable when the mean profit of this round's
            agents is above this.
        entry_max: () int32 most slots that take entrants after one round.
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
    second: jax.Array
    fit_lr: jax.Array
    pretrain_lr: jax.Array
    transfer_cost: jax.Array
    compensation: jax.Array
    entry: jax.Array
    entry_profit: jax.Array
    entry_max: jax.Array


class MarketData(NamedTuple):
    """One seed's data: shared arrays plus index views (see ``AgentData``).

    Attributes:
        agents: shared features and each agent's shard, validation and test rows.
        pool_rows: (R,) int32 every row some agent owns, once (the centralized baseline's
            data), padded; pool_size: () int32 how many are real.
        public_rows: (P,) int32 the public training rows the shared base is trained on
            (None without a base).
    """

    agents: AgentData
    pool_rows: jax.Array
    pool_size: jax.Array
    public_rows: jax.Array | None = None


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
            :func:`~paramarket_jax.market.round.diverging`): frozen at their last finite
            model, they never train or trade again, but stay in the market (evaluated,
            earning with that model).
        initial_loss: (T, N) the loss of each agent's freshly initialised model, on its
            first minibatch before its first update (NaN until the agent first trains; an
            entrant's is measured when it first trains).
        initial_params: the market agents' initial parameters, leaves (N, ...), what a
            ``stale`` hostile seller offers (an entrant's are its fresh ones); None unless
            ``MarketSpec.hostile`` is ``stale``.
        base: the shared pretrained base, one model's parameters (no agent axis): every
            agent's first weights, and what task vectors are taken from; None without one.
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
    base: Any = None


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
        second: the merge's second knob (TIES' density, DARE's drop rate; 0: none).
        shipped: parameters shipped to the buyer (a model's, its task vector's kept
            entries, or its adapter's); transfer: what the buyer paid for shipping them.
        compensation: what the buyer paid the third parties of its trade
            (``economics.compensation``).
        social_value: the trade's effect on all agents' total revenue over the horizon,
            on test, with the round's other trades standing (``value`` and
            ``realized_value`` hold the rivals fixed); external_value: the part of it
            that fell on the other agents (negative: the trade took their revenue).
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
    second: jax.Array
    shipped: jax.Array
    transfer: jax.Array
    compensation: jax.Array
    social_value: jax.Array
    external_value: jax.Array

    @classmethod
    def empty(cls, n: int) -> Trades:
        """No trade for any of ``n`` buyers: masks False, seller -1, every amount 0."""
        no, zero = jnp.zeros(n, bool), jnp.zeros(n, jnp.float32)
        amounts = {f: zero for f in cls._fields if f not in ("mask", "seller", "hostile")}
        return cls(mask=no, seller=jnp.full(n, -1, jnp.int32), hostile=no, **amounts)


class Flows(NamedTuple):
    """Money moved by one round, per agent (N,) of the market twin, plus the broker's take.

    Attributes:
        payment: paid as a buyer; receipt: received as a seller.
        fees: broker fees paid (valuation queries as a buyer, trade fees as a seller).
        broker: () the broker's take this round.
        compensation: compensation received from buyers as a third party, less what
            the agent paid as a buyer (sums to zero over the agents).
    """

    payment: jax.Array
    receipt: jax.Array
    fees: jax.Array
    broker: jax.Array
    compensation: jax.Array

    @classmethod
    def empty(cls, n: int) -> Flows:
        """No money moved: every agent's flows and the broker's take are 0."""
        zero = jnp.zeros(n, jnp.float32)
        return cls(zero, zero, zero, jnp.zeros((), jnp.float32), zero)


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
        alive: (T, N) bool agents in the market after the round (after its exits, before
            its entries: an entrant is in from the next round on).
        endowment: (T, N) cash put into each slot so far (see ``MarketState``).
        diverged: (T, N) bool agents whose training has diverged, this round or before.
        entered: (N,) bool slots that took an entrant at the end of the round (in every
            twin: fresh model, the initial cash; ``cash``, ``alive``, ``endowment`` and
            ``trade_count`` above are the accounts before it came).
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
    entered: jax.Array


# ---------------------------------------------------------------------------------------
# which leaves are per agent or per seed, declared once


@dataclasses.dataclass(frozen=True)
class Axes:
    """What a leaf's leading axes are in one run's arrays (a declaration, not a pytree).

    Attributes:
        agent: position of the agent axis (None: the leaf has none, it is shared by every
            agent); padding the population for devices pads it, sharding splits it.
        per_seed: the leaf differs between seeds (``MarketData`` only): the batch path
            stacks it on a seed axis; the other data leaves are the shared feature arrays.
    """

    agent: int | None = None
    per_seed: bool = False


SHARED = Axes()
AGENT = Axes(agent=0)
TWIN_AGENT = Axes(agent=1)  # (T, N, ...): twin axis first
SEED = Axes(per_seed=True)
SEED_AGENT = Axes(agent=0, per_seed=True)

#: ``MarketParams``: the per-agent knobs (N,); everything else is one value for all.
PARAM_AXES = MarketParams(
    learning_rate=AGENT,
    alphas=SHARED,
    knobs=Knobs(reserve=SHARED, beta=SHARED, posted=AGENT, roles=AGENT),
    economy=Economy(
        value_per_quality=AGENT,
        market_size=SHARED,
        gamma=SHARED,
        outside=SHARED,
        horizon=SHARED,
        step_cost=SHARED,
        query_fee=SHARED,
        trade_fee=SHARED,
        fee_share=SHARED,
    ),
    strategy=StrategyParams(
        kind=AGENT, shade=AGENT, markup=AGENT, grid=SHARED, eta=SHARED, explore=SHARED
    ),
    initial_cash=SHARED,
    trade_start=SHARED,
    trade_every=SHARED,
    seller_only=AGENT,
    initial_alive=AGENT,
    bankruptcy=SHARED,
    diverge_loss=SHARED,
    hostile=AGENT,
    min_gain=SHARED,
    confidence=SHARED,
    second=SHARED,
    fit_lr=SHARED,
    pretrain_lr=SHARED,
    transfer_cost=SHARED,
    compensation=SHARED,
    entry=SHARED,
    entry_profit=SHARED,
    entry_max=SHARED,
)

#: ``MarketData``: index arrays differ between seeds (a seed's partition), feature arrays
#: are shared by every seed; the per-agent index arrays have a leading agent axis.
DATA_AXES = MarketData(
    agents=AgentData(
        x_train=SHARED,
        y_train=SHARED,
        train_rows=SEED,
        train_start=SEED_AGENT,
        train_size=SEED_AGENT,
        x_val=SHARED,
        y_val=SHARED,
        val_idx=SEED_AGENT,
        x_test=SHARED,
        y_test=SHARED,
        test_idx=SEED_AGENT,
    ),
    pool_rows=SEED,
    pool_size=SEED,
    public_rows=SEED,
)

#: ``MarketState``: where each leaf's agent axis is (a label covers a whole subtree).
STATE_AXES = MarketState(
    twins=TWIN_AGENT,
    central=SHARED,  # a population of one
    cash=TWIN_AGENT,
    strategy=AGENT,
    trade_count=AGENT,
    alive=TWIN_AGENT,
    endowment=TWIN_AGENT,
    diverged=TWIN_AGENT,
    initial_loss=TWIN_AGENT,
    initial_params=AGENT,
    base=SHARED,
)


def over_axes(fn, axes, tree):
    """``fn(axes, leaf)`` for every leaf of ``tree``, ``axes`` a declaration above (its
    labels cover whole subtrees of ``tree``; None subtrees stay None). Raises ValueError
    when ``tree`` does not have the declaration's structure (an undeclared leaf)."""

    def subtree(label, sub):
        return jax.tree.map(lambda leaf: fn(label, leaf), sub)

    try:
        return jax.tree.map(subtree, axes, tree, is_leaf=lambda x: isinstance(x, Axes))
    except ValueError as err:
        raise ValueError(f"a leaf without a declared axis: {err}") from None
