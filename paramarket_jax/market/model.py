"""The market as a Mesa model: `MarketModel` owns the populations, `TraderAgent`s are views.

Device work happens in a fixed handful of jitted calls per `step()` (the round kernels);
agents only read per-agent values copied to the host once per round, so Mesa's
DataCollector and per-agent Python code see plain numbers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import mesa
import numpy as np

from paramarket_jax.data import Dataset, load_dataset, partition
from paramarket_jax.errors import ParamarketError
from paramarket_jax.market.round import (
    FEDAVG,
    MARKET,
    SILOED,
    Flows,
    RoundKernels,
    economy_of,
    knobs_of,
    make_round,
    strategy_of,
)
from paramarket_jax.models import Model, make_model
from paramarket_jax.population import AgentData, Trainer, agent_data, make_trainer
from paramarket_jax.scenario import static_key


class Prepared(NamedTuple):
    """What every seed of a scenario shares: model, trainer and compiled round kernels."""

    scenario: Any
    model: Model
    trainer: Trainer
    kernels: RoundKernels


_LAST_DATASET: dict[str, Dataset] = {}


def seed_data(scenario, seed: int) -> tuple[Dataset, Any, jax.Array]:
    """Dataset and partition of one seed, and the key for everything after them.

    The last dataset built is kept, so :func:`prepare` (which needs the first seed's input
    shape) and that seed's :class:`MarketModel` load or generate it once.
    """
    k_data, k_split, k_run = jax.random.split(jax.random.key(seed), 3)
    d = scenario.data
    options = dict(d.options) | ({"path": d.path} if d.path else {})
    cache_key = repr((d.dataset, sorted(options.items()), seed))
    if cache_key not in _LAST_DATASET:
        _LAST_DATASET.clear()
        _LAST_DATASET[cache_key] = load_dataset(d.dataset, k_data, **options)
    dataset = _LAST_DATASET[cache_key]
    part = partition(
        d.split.name,
        k_split,
        dataset,
        scenario.agents.n,
        eval_size=d.split.eval_size,
        eval_mix=d.split.eval_mix,
        **dict(d.split.options),
    )
    return dataset, part, k_run


_COMPILED: dict[str, Prepared] = {}


def prepare(scenario) -> Prepared:
    """Build the model, trainer and kernels; raises ParamarketError on any bad input.

    Scenarios that differ only in numeric knobs (see ``scenario.NUMERIC_KEYS``) share the
    compiled kernels of the first one, so a sweep over prices, powers or learning rates
    compiles once.
    """
    dataset, _, _ = seed_data(scenario, scenario.seeds[0])
    key = static_key(scenario)
    if key not in _COMPILED:
        model = make_model(
            scenario.model.name,
            dataset.input_shape,
            dataset.num_classes,
            **dict(scenario.model.options),
        )
        trainer = make_trainer(model, scenario.train.optimizer, scenario.train.batch_size)
        if len(_COMPILED) >= 8:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = Prepared(scenario, model, trainer, make_round(scenario, model, trainer))
    cached = _COMPILED[key]
    kernels = cached.kernels._replace(
        economy=economy_of(scenario), strategy=strategy_of(scenario), knobs=knobs_of(scenario)
    )
    return cached._replace(scenario=scenario, kernels=kernels)


def padded_data(dataset: Dataset, part) -> AgentData:
    """Agent data with shards padded to the whole training set, so every seed has one shape."""
    width = len(dataset.y_train)
    idx = np.asarray(part.train_idx)
    pad = np.repeat(idx[:, :1], width - idx.shape[1], axis=1)
    return agent_data(dataset, part._replace(train_idx=np.concatenate([idx, pad], axis=1)))


def pooled_data(data: AgentData, part) -> AgentData:
    """One shard holding every row any agent owns: the centralized baseline's data."""
    rows = np.unique(
        np.concatenate(
            [
                np.asarray(part.train_idx[i, : part.train_size[i]])
                for i in range(len(part.train_size))
            ]
        )
    )
    width = data.train_idx.shape[1]
    rows = np.concatenate([rows, np.repeat(rows[:1], width - len(rows))])
    return data._replace(
        train_idx=jnp.asarray(rows[None], jnp.int32),
        train_size=jnp.asarray([len(np.unique(rows))], jnp.int32),
    )


def no_flows(n: int) -> Flows:
    """A round without trades: no money moved."""
    zeros = np.zeros(n, np.float32)
    return Flows(zeros, zeros, zeros, np.float32(0.0))


class TraderAgent(mesa.Agent):
    """A thin view of agent ``index`` in the market's population (read-only properties)."""

    def __init__(self, model: MarketModel, index: int):
        super().__init__(model)
        self.index = index

    def _get(self, name: str, twin: int = MARKET) -> float:
        return float(getattr(self.model.metrics, name)[twin, self.index])

    @property
    def accuracy(self) -> float:
        """Market model's test accuracy."""
        return self._get("test_acc")

    @property
    def loss(self) -> float:
        return self._get("test_loss")

    @property
    def val_accuracy(self) -> float:
        return self._get("val_acc")

    @property
    def siloed_accuracy(self) -> float:
        """Test accuracy of this agent's siloed twin (same seeds and data, no trading)."""
        return self._get("test_acc", SILOED)

    @property
    def siloed_loss(self) -> float:
        return self._get("test_loss", SILOED)

    @property
    def fedavg_accuracy(self) -> float:
        return self._get("test_acc", FEDAVG) if self.model.twins_n > FEDAVG else float("nan")

    @property
    def central_accuracy(self) -> float:
        return float(self.model.metrics.central_test_acc[self.index])

    @property
    def trades(self) -> int:
        """Trades this agent made as a buyer so far."""
        return int(self.model.trade_count[self.index])

    @property
    def shard_size(self) -> int:
        return int(self.model.shard_size[self.index])

    @property
    def revenue(self) -> float:
        """Revenue earned this round from the market model's test quality."""
        return float(self.model.accounts.revenue[MARKET, self.index])

    @property
    def cost(self) -> float:
        return float(self.model.accounts.cost[MARKET, self.index])

    @property
    def payment(self) -> float:
        """Paid as a buyer this round."""
        return float(self.model.flows.payment[self.index])

    @property
    def receipt(self) -> float:
        """Received as a seller this round (before fees)."""
        return float(self.model.flows.receipt[self.index])

    @property
    def fees(self) -> float:
        return float(self.model.flows.fees[self.index])

    @property
    def cash(self) -> float:
        return float(self.model.cash[MARKET, self.index])

    @property
    def utility(self) -> float:
        """Cumulative utility: revenue - costs - payments + receipts - fees so far."""
        return self.cash - self.model.initial_cash

    @property
    def siloed_revenue(self) -> float:
        return float(self.model.accounts.revenue[SILOED, self.index])

    @property
    def siloed_cash(self) -> float:
        return float(self.model.cash[SILOED, self.index])

    @property
    def siloed_utility(self) -> float:
        return self.siloed_cash - self.model.initial_cash


class MarketModel(mesa.Model):
    """One seed of a scenario: a Mesa model whose ``step()`` is one market round."""

    def __init__(self, prepared: Prepared, seed: int):
        super().__init__(seed=seed)
        sc = prepared.scenario
        self.prepared, self.scenario, self.seed_value = prepared, sc, seed
        self.round = 0
        n = sc.agents.n
        dataset, part, k_run = seed_data(sc, seed)
        self.data = padded_data(dataset, part)
        self.pooled = pooled_data(self.data, part) if sc.baselines.centralized else None
        self.shard_size = np.asarray(part.train_size)
        k_init, self.k_rounds = jax.random.split(k_run)
        pop = prepared.trainer.init(k_init, n, sc.train.learning_rate)
        self.twins_n = 3 if sc.baselines.fedavg else 2
        self.twins = jax.tree.map(lambda v: jnp.stack([v] * self.twins_n), pop)
        self.central = (
            prepared.trainer.init(jax.random.fold_in(k_init, n), 1, sc.train.learning_rate)
            if sc.baselines.centralized
            else None
        )
        self.trade_count = np.zeros(n, np.int64)
        self.trade_log: list[dict] = []
        self.last_trade_count = 0
        kern = prepared.kernels
        self.ledger = kern.init_ledger(self.twins_n, sc.economics.initial_cash)
        self.initial_cash = float(sc.economics.initial_cash)
        self.broker_take = 0.0
        self.flows = no_flows(n)
        metrics, _, accounts = kern.evaluate(
            self.twins, self.central, self.ledger, self.data, kern.economy
        )
        self.metrics = jax.device_get(metrics)
        self.accounts = jax.tree.map(np.zeros_like, jax.device_get(accounts))
        self.cash = np.asarray(self.ledger.cash)
        self.traders = [TraderAgent(self, i) for i in range(n)]
        reporters = {
            k: k
            for k in (
                "accuracy",
                "loss",
                "val_accuracy",
                "siloed_accuracy",
                "siloed_loss",
                "fedavg_accuracy",
                "central_accuracy",
                "trades",
                "shard_size",
                "revenue",
                "cost",
                "payment",
                "receipt",
                "fees",
                "cash",
                "utility",
                "siloed_revenue",
                "siloed_cash",
                "siloed_utility",
            )
        }
        self.datacollector = mesa.DataCollector(
            model_reporters={
                "market_accuracy": lambda m: float(m.metrics.test_acc[MARKET].mean()),
                "welfare": lambda m: float(
                    m.cash[MARKET].sum() - m.initial_cash * n + m.broker_take
                ),
                "siloed_welfare": lambda m: float(m.cash[SILOED].sum() - m.initial_cash * n),
                "broker_take": lambda m: m.broker_take,
                "siloed_accuracy": lambda m: float(m.metrics.test_acc[SILOED].mean()),
                "trades": lambda m: m.last_trade_count,
            },
            agent_reporters=reporters,
        )

    def is_trading_round(self, r: int) -> bool:
        """The paper's schedule: trade when ``r >= start`` and ``r % every == 0``."""
        t = self.scenario.trading
        return r >= t.start and r % t.every == 0

    def step(self) -> None:
        """One round: train all twins, trade (on schedule), evaluate, record."""
        kern = self.prepared.kernels
        key = jax.random.fold_in(self.k_rounds, self.round)
        k_train, k_trade = jax.random.split(key)
        self.twins, self.central = kern.train(
            self.twins, self.central, k_train, self.data, self.pooled
        )
        self.flows = no_flows(self.scenario.agents.n)
        self.last_trade_count = 0
        if self.is_trading_round(self.round):
            self.twins, self.ledger, trades, flows = kern.trade(
                self.twins,
                self.ledger,
                k_trade,
                self.data,
                kern.economy,
                kern.strategy,
                kern.knobs,
            )
            trades, self.flows = jax.device_get((trades, flows))
            self.broker_take += float(self.flows.broker)
            self._record_trades(trades)
        metrics, self.ledger, accounts = kern.evaluate(
            self.twins, self.central, self.ledger, self.data, kern.economy
        )
        self.metrics, self.accounts, self.cash = jax.device_get(
            (metrics, accounts, self.ledger.cash)
        )
        if not np.isfinite(self.metrics.test_loss).all():
            raise ParamarketError(
                f"training diverged (non-finite loss) at round {self.round}, seed "
                f"{self.seed_value}; lower train.learning_rate "
                f"(now {self.scenario.train.learning_rate})"
            )
        self.round += 1
        self.datacollector.collect(self)

    def _record_trades(self, trades) -> None:
        buyers = np.flatnonzero(trades.mask)
        self.trade_count[buyers] += 1
        columns = ("seller", "alpha", "predicted_gain", "realized_gain", "value",
                   "realized_value", "reservation", "bid", "ask", "price", "fee")  # fmt: skip
        self.last_trade_count = len(buyers)
        for i in buyers:
            row = {c: getattr(trades, c)[i].item() for c in columns}
            self.trade_log.append(dict(seed=self.seed_value, round=self.round, buyer=int(i), **row))

    def run(self, progress=None) -> None:
        """All the scenario's rounds; ``progress()`` after each."""
        for _ in range(self.scenario.train.rounds):
            self.step()
            if progress is not None:
                progress()
