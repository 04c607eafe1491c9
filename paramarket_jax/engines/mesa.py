"""The market as a Mesa model: a view of the pure round, not a second engine.

``MarketModel.step()`` calls the same jitted ``round.step`` that ``round.simulate`` scans,
once, and copies the round's record and the accounts after it to the host once;
``TraderAgent``s are thin views of them (Mesa's bulk-values-in-arrays habit), and the
DataCollector reads from them. Exits (bankruptcy) and entry happen inside the pure round;
the model reads them off the record (``entered``, ``exited``, ``entrants``, ``leavers``,
and the AgentSets ``alive_traders``, ``entered_traders``, ``exited_traders``).

Per-agent Python behaviour belongs here, between the compiled rounds: after each round the
model calls :meth:`MarketModel.between_rounds`, which by default has the traders act in a
random order (``shuffle_do("act")``); a subclass of ``TraderAgent`` overrides ``act`` and
writes its decision into the knobs (:meth:`TraderAgent.set_knob`, pushed to the device
before the next round: traced values, nothing recompiles). Such runs go through this model
(:func:`paramarket_jax.runs.run_mesa` with ``model=``), not the batch path; see
docs/mesa_behaviour.md. The DataCollector keeps one table per agent type
(``get_agenttype_vars_dataframe(TraderAgent)``, ``...(BrokerAgent)``).

The model runs under :func:`mesa.batch_run`: ``MarketModel(scenario="paper_two_agent",
seed=0, **{"train.rounds": 3})`` takes dotted scenario overrides as keyword arguments, and
the DataCollector collects once at construction (step 0, before any round) and after every
round, so Mesa's step ``s`` is the market after ``s`` rounds. From Mesa 3.4.1 on,
``batch_run`` gives a row per agent of each run (the traders' and the broker's columns);
Mesa 3.3, the one Python 3.11 gets, leaves agent-type rows out (mesa#2804): one row per
run, the model's.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import mesa
import numpy as np
from mesa.agent import AgentSet  # mesa.agent re-exports it in 3.5 too

from paramarket_jax import scenario as sc
from paramarket_jax.errors import ParamarketError
from paramarket_jax.experiment import Experiment, experiment_of, seed_data
from paramarket_jax.market.round import init_jit, profit, step_jit
from paramarket_jax.market.types import MARKET, PARAM_AXES, RoundRecord
from paramarket_jax.results.tables import diverged, market_lost

NAN = float("nan")


class Accounts(NamedTuple):
    """The market between rounds, host copies: what the last round left, after entries.

    Attributes:
        alive: (T, N) bool slots in each twin's market.
        cash: (T, N) cash; endowment: (T, N) cash put into each slot so far.
        trade_count: (N,) int purchases so far (an entrant starts from 0).
    """

    alive: np.ndarray
    cash: np.ndarray
    endowment: np.ndarray
    trade_count: np.ndarray


def _replaced(tree, path: list[str], value):
    """``tree`` (nested NamedTuples) with the leaf at ``path`` replaced by ``value``."""
    head, *rest = path
    return tree._replace(**{head: _replaced(getattr(tree, head), rest, value) if rest else value})


def _accounts(state) -> Accounts:
    """The state's small per-agent arrays (device arrays: copy them with the record)."""
    return Accounts(state.alive, state.cash, state.endowment, state.trade_count)


class TraderAgent(mesa.Agent):
    """A thin view of market slot ``index`` (read-only properties), and its behaviour
    between rounds (:meth:`act`, nothing here: override it in a subclass).

    Model quality (accuracy, loss) comes from the last round's record; the accounts (cash,
    utility, trades, alive) from the market as it stands after that round's entries, so an
    entrant shows its fresh cash at once.
    """

    def __init__(self, model: MarketModel, index: int):
        super().__init__(model)
        self.index = index

    def _get(self, name: str, twin: str = "market") -> float:
        names = self.model.spec.twin_names
        record = self.model.record
        if twin not in names or record is None:
            return NAN
        return float(getattr(record, name)[names.index(twin), self.index])

    def _account(self, name: str, twin: str = "market") -> float:
        names = self.model.spec.twin_names
        if twin not in names:
            return NAN
        return float(getattr(self.model.accounts, name)[names.index(twin), self.index])

    @property
    def accuracy(self) -> float:
        """Market model's test accuracy (NaN before the first round)."""
        return self._get("test_acc")

    @property
    def loss(self) -> float:
        return self._get("test_loss")

    @property
    def siloed_accuracy(self) -> float:
        """Test accuracy of this agent's siloed twin (same seeds and data, no trading)."""
        return self._get("test_acc", "siloed")

    @property
    def fedavg_accuracy(self) -> float:
        return self._get("test_acc", "fedavg")

    @property
    def trades(self) -> int:
        """Purchases this slot's agent made so far."""
        return int(self.model.accounts.trade_count[self.index])

    @property
    def cash(self) -> float:
        return self._account("cash")

    @property
    def utility(self) -> float:
        """Cumulative utility: revenue - costs - payments + receipts - fees so far
        (cash less what was put into the slot)."""
        return self.cash - self._account("endowment")

    @property
    def siloed_utility(self) -> float:
        return self._account("cash", "siloed") - self._account("endowment", "siloed")

    @property
    def alive(self) -> bool:
        """In the market (the market twin): not bankrupt, or entered."""
        return bool(self.model.accounts.alive[MARKET, self.index])

    @property
    def diverged(self) -> bool:
        """Its training diverged (market twin): frozen, it no longer trains or trades."""
        record = self.model.record
        return record is not None and bool(record.diverged[MARKET, self.index])

    @property
    def entered(self) -> bool:
        """A newcomer took this slot at the end of the last round."""
        record = self.model.record
        return record is not None and bool(record.entered[self.index])

    @property
    def exited(self) -> bool:
        """This slot's agent left the market in the last round (bankrupt)."""
        return bool(self.model.leavers) and self.index in self.model.leavers[-1]

    @property
    def sold(self) -> int:
        """Buyers that bought from this slot in the last round."""
        return 0 if self.model.record is None else int(self.model.sales[self.index])

    @property
    def profit(self) -> float:
        """This slot's profit in the last round (``round.profit``; NaN before)."""
        return NAN if self.model.record is None else float(self.model.profits[self.index])

    def knob(self, name: str):
        """This agent's value of a per-agent knob (a dotted ``MarketParams`` field such as
        ``knobs.posted`` or ``learning_rate``), as the next round will see it."""
        return self.model.knob(name)[self.index]

    def set_knob(self, name: str, value) -> None:
        """Set this agent's value of a per-agent knob for the next rounds
        (:meth:`MarketModel.set_knob`)."""
        self.model.set_knob(name, value, agent=self.index)

    def act(self) -> None:
        """The agent's Python behaviour, run after every compiled round
        (:meth:`MarketModel.between_rounds`): read the views above, write decisions with
        :meth:`set_knob`. Nothing here; override it in a subclass."""


# the DataCollector's columns for each agent type: attributes, read at every collection
TRADER_VIEWS = ("accuracy", "siloed_accuracy", "trades", "cash", "utility", "siloed_utility")
TRADER_FLAGS = ("alive", "diverged", "entered", "exited")
TRADER_REPORTERS = {"slot": "index"} | {v: v for v in (*TRADER_VIEWS, *TRADER_FLAGS)}


class BrokerAgent(mesa.Agent):
    """The broker (one per market, not a trader): its take and its valuations' record.

    Attributes:
        take: cumulative broker take (fees and price margins); round_take: this round's.
        pairs: buyer-seller pairs settled this round; trades: settled pairs so far.
        predicted_gain, realized_gain: mean relative loss gain the broker predicted for the
            settled trades and what they realised on test (NaN without trades).
        price: mean price of this round's trades (NaN without trades).
    """

    def __init__(self, model: MarketModel):
        super().__init__(model)
        self.take = 0.0
        self.round_take = 0.0
        self.trades = 0
        self.pairs = 0
        self.predicted_gain = self.realized_gain = self.price = NAN

    def observe(self, record: RoundRecord) -> None:
        """Book one round's record."""
        t = record.trades
        mask = np.asarray(t.mask, bool)
        self.round_take = float(record.flows.broker)
        self.take += self.round_take
        self.pairs = int(mask.sum())
        self.trades += self.pairs

        def mean(a) -> float:
            return float(np.asarray(a, np.float64)[mask].mean()) if self.pairs else NAN

        self.predicted_gain = mean(t.predicted_gain)
        self.realized_gain = mean(t.realized_gain)
        self.price = mean(t.price)


BROKER_VIEWS = ("take", "round_take", "pairs", "trades", "predicted_gain", "realized_gain")
BROKER_REPORTERS = {v: v for v in (*BROKER_VIEWS, "price")}


def gini(values) -> float:
    """Gini coefficient of amounts, in [0, 1 - 1/n]; debts (negative amounts) count as 0.

    0 when everyone holds the same (or nothing); NaN for no one.
    """
    x = np.sort(np.clip(np.asarray(values, np.float64).ravel(), 0.0, None))
    n = x.size
    if n == 0:
        return NAN
    total = x.sum()
    if total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(2.0 * (ranks * x).sum() / (n * total) - (n + 1) / n)


class MarketModel(mesa.Model):
    """One seed of a scenario: a Mesa model whose ``step()`` is one market round.

    ``MarketModel(experiment, seed)``, or for :func:`mesa.batch_run`
    ``MarketModel(scenario=name_or_path_or_Scenario, seed=0, **{"economics.gamma": 2.0})``
    (keyword arguments beyond these are dotted scenario overrides). ``seed`` defaults to
    the scenario's first seed. Steps past ``train.rounds`` do nothing but set ``running``
    to False, so ``batch_run``'s last step (Mesa 3.3 reports step ``model.steps - 1``, 3.5
    the last collection) is the market after its final round.

    Subclass it for Python behaviour between rounds: ``trader_class`` names the traders'
    class (a ``TraderAgent`` subclass with its own ``act``), and :meth:`between_rounds`
    runs after every round (docs/mesa_behaviour.md).

    Attributes:
        record: the last round's record (host arrays), None before the first round.
        accounts: the market now (after the last round's exits and entries).
        traders: the N ``trader_class`` slots, ``agents_by_type[trader_class]`` (insertion
            order = slot index); broker: the ``BrokerAgent``.
        entered, exited: per round, how many agents entered after it / left in it;
        entrants, leavers: per round, the slots that entered after it / left in it.
        profits, sales: (N,) each slot's profit (``round.profit``) and sales in the last
            round, worked out once a round for the traders' views.
        params: the knobs the next round runs with (:meth:`set_knob` changes them).
    """

    trader_class: type[TraderAgent] = TraderAgent

    def __init__(
        self,
        experiment: Experiment | sc.Scenario | str | os.PathLike | None = None,
        seed: int | None = None,
        *,
        scenario: sc.Scenario | str | os.PathLike | None = None,
        **kwargs: Any,  # named so: Mesa's SolaraViz accepts extra keywords only as "kwargs"
    ):
        if experiment is not None and scenario is not None:
            raise ParamarketError("give a market an experiment or a scenario, not both")
        experiment = experiment_of(experiment if scenario is None else scenario, kwargs)
        if seed is None:
            seed = experiment.scenario.seeds[0]
        super().__init__(seed=seed)
        self.experiment, self.seed_value = experiment, seed
        self.config = experiment.scenario  # Mesa >= 3.5 reserves `scenario`
        self.spec, self.params = experiment.spec, experiment.params
        self.data, k_run = seed_data(experiment, seed)
        k_init, self.k_rounds = jax.random.split(k_run)
        self.state = init_jit(self.spec, k_init, self.params, self.data)
        self.round = 0
        self.record: RoundRecord | None = None
        self._records: list[RoundRecord] = []
        self.accounts = jax.device_get(_accounts(self.state))
        # host copies of the knobs (read by knob, written by set_knob), and those changed
        self._knobs = jax.tree.map(np.array, jax.device_get(self.params))
        self._changed: set[str] = set()
        self.entered: list[int] = []
        self.exited: list[int] = []
        self.entrants: list[tuple[int, ...]] = []
        self.leavers: list[tuple[int, ...]] = []
        for i in range(self.spec.n):
            self.trader_class(self, i)  # registered with the model: agents_by_type
        self.broker = BrokerAgent(self)
        names = self.spec.twin_names
        siloed = names.index("siloed") if "siloed" in names else None
        self.datacollector = mesa.DataCollector(
            model_reporters={
                "market_accuracy": lambda m: m._mean_acc(MARKET, alive_only=False),
                "siloed_accuracy": lambda m: m._mean_acc(siloed, alive_only=False),
                "mean_accuracy": lambda m: m._mean_acc(MARKET, alive_only=True),
                "welfare": lambda m: m.welfare,
                "siloed_welfare": lambda m: m._utility(siloed),
                "broker_take": lambda m: m.broker.take,
                "trades": lambda m: m.broker.pairs,
                "mean_price": lambda m: m.broker.price,
                "predicted_gain": lambda m: m.broker.predicted_gain,
                "realized_gain": lambda m: m.broker.realized_gain,
                "gini": lambda m: m.gini,
                "alive": lambda m: int(m.accounts.alive[MARKET].sum()),
                "diverged": lambda m: m.diverged,
                "entered": lambda m: m.entered[-1] if m.entered else 0,
                "exited": lambda m: m.exited[-1] if m.exited else 0,
            },
            agenttype_reporters={
                self.trader_class: TRADER_REPORTERS,
                BrokerAgent: BROKER_REPORTERS,
            },
        )
        self.datacollector.collect(self)  # step 0: the market before any round

    @property
    def traders(self) -> AgentSet:
        """The N trader slots in slot order (Mesa's ``agents_by_type``)."""
        return self.agents_by_type[self.trader_class]

    @property
    def alive_traders(self) -> AgentSet:
        """The traders in the market now (after the last round's exits and entries)."""
        return self.traders.select(lambda t: t.alive)

    @property
    def entered_traders(self) -> AgentSet:
        """The traders that entered at the end of the last round."""
        return self.traders.select(lambda t: t.entered)

    @property
    def exited_traders(self) -> AgentSet:
        """The traders that left the market in the last round (bankrupt)."""
        return self.traders.select(lambda t: t.exited)

    # ---- reporters ----

    def _utility(self, twin: int | None) -> float:
        """A twin's agents' total utility, sum(cash - endowment) over every slot (a
        bankrupt slot's losses stay counted)."""
        if twin is None:
            return NAN
        a = self.accounts
        return float((a.cash[twin].astype(np.float64) - a.endowment[twin]).sum())

    @property
    def welfare(self) -> float:
        """The market agents' total utility plus the broker's take."""
        return self._utility(MARKET) + self.broker.take

    def _mean_acc(self, twin: int | None, *, alive_only: bool) -> float:
        """Mean test accuracy of a twin's slots (all, or those in the market after the
        round: entrants, not evaluated yet, are left out); NaN before the first round."""
        r = self.record
        if twin is None or r is None:
            return NAN
        acc = np.asarray(r.test_acc[twin], np.float64)
        if alive_only:
            acc = acc[np.asarray(r.alive[twin], bool)]
        return float(acc.mean()) if acc.size else NAN

    @property
    def diverged(self) -> int:
        """Market agents whose training has diverged so far (entrants start afresh)."""
        r = self.record
        return 0 if r is None else int(np.asarray(r.diverged[MARKET]).sum())

    @property
    def gini(self) -> float:
        """Gini of the market agents' cash, over the agents in the market (debts count as 0)."""
        a = self.accounts
        return gini(a.cash[MARKET][a.alive[MARKET]])

    # ---- knobs ----

    def _leaf(self, name: str):
        """The host copy of the knob ``name`` (a dotted ``MarketParams`` field) and its
        declared axes."""
        leaf, axes = self._knobs, PARAM_AXES
        for part in name.split("."):
            if not hasattr(leaf, "_fields") or part not in leaf._fields:
                raise ParamarketError(f"no knob {name!r} (a dotted MarketParams field)")
            leaf, axes = getattr(leaf, part), getattr(axes, part)
        if not isinstance(leaf, np.ndarray):
            raise ParamarketError(f"{name!r} is a group of knobs, not one")
        return leaf, axes

    def knob(self, name: str) -> np.ndarray:
        """A knob as the next round will see it (a host copy: do not write to it)."""
        return self._leaf(name)[0]

    def set_knob(self, name: str, value, agent: int | None = None) -> None:
        """Set a knob for the next rounds: for everyone, or one ``agent``'s entry of a
        per-agent knob (``knobs.posted``, ``learning_rate``, ``strategy.markup``, ...).

        The value is cast to the knob's dtype and sent to the device once, before the next
        round (:meth:`step`); knobs are traced, so nothing recompiles.
        """
        leaf, axes = self._leaf(name)
        if agent is None:
            leaf[...] = value
        elif axes.agent is None:
            raise ParamarketError(f"{name!r} is one value for every agent, not a per-agent knob")
        else:
            leaf[agent] = value
        self._changed.add(name)

    def _send_knobs(self) -> None:
        """The changed knobs to the device, in one transfer."""
        if not self._changed:
            return
        names = sorted(self._changed)
        # copies: on a CPU the device array may share the host buffer set_knob writes to
        sent = jax.device_put([np.array(self.knob(name)) for name in names])
        for name, value in zip(names, sent, strict=True):
            self.params = _replaced(self.params, name.split("."), value)
        self._changed.clear()

    # ---- rounds ----

    def step(self) -> None:
        """One round: the changed knobs to the device, the jitted pure step (exits and
        entry inside it), one copy of its record and the accounts after it to the host,
        :meth:`between_rounds`, collect. Past ``train.rounds`` it only sets ``running`` to
        False."""
        if self.round >= self.config.train.rounds:
            self.running = False
            return
        self._send_knobs()
        key = jax.random.fold_in(self.k_rounds, self.round)
        r = jnp.asarray(self.round, jnp.int32)
        self.state, record = step_jit(self.spec, key, self.state, self.params, self.data, r)
        was_in = self.accounts.alive[MARKET]
        self.record, self.accounts = jax.device_get((record, _accounts(self.state)))
        if market_lost(self.record.diverged, self.record.alive, self.record.test_loss):
            raise diverged(self.round, self.seed_value, self.config.train.learning_rate)
        self._records.append(self.record)
        self.broker.observe(self.record)
        left = was_in & ~self.record.alive[MARKET]
        self.leavers.append(tuple(int(i) for i in np.flatnonzero(left)))
        r, t = self.record, self.record.trades
        self.profits = np.asarray(profit(r.revenue, r.cost, r.flows), np.float64)
        self.sales = np.bincount(t.seller[t.mask], minlength=self.spec.n)
        self.entrants.append(tuple(int(i) for i in np.flatnonzero(self.record.entered)))
        self.exited.append(len(self.leavers[-1]))
        self.entered.append(len(self.entrants[-1]))
        self.round += 1
        self.between_rounds()
        self.datacollector.collect(self)

    def between_rounds(self) -> None:
        """Python behaviour after every compiled round, before the collection: each trader
        ``act``s once, in a random order (Mesa's ``shuffle_do``). Override it for a rule of
        the whole market; write decisions with :meth:`set_knob`."""
        self.traders.shuffle_do("act")

    def records(self) -> RoundRecord:
        """Every round's record so far, host arrays with a leading axis (rounds,)."""
        return jax.tree.map(lambda *xs: np.stack(xs), *self._records)

    def run(self, progress=None) -> None:
        """All the scenario's remaining rounds; ``progress()`` after each."""
        while self.round < self.config.train.rounds:
            self.step()
            if progress is not None:
                progress()
