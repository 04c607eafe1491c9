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
from paramarket_jax.market.round import FEDAVG, MARKET, SILOED, RoundKernels, make_round
from paramarket_jax.models import Model, make_model
from paramarket_jax.population import AgentData, Trainer, agent_data, make_trainer


class Prepared(NamedTuple):
    """What every seed of a scenario shares: model, trainer and compiled round kernels."""

    scenario: Any
    model: Model
    trainer: Trainer
    kernels: RoundKernels


def seed_data(scenario, seed: int) -> tuple[Dataset, Any, jax.Array]:
    """Dataset and partition of one seed, and the key for everything after them."""
    k_data, k_split, k_run = jax.random.split(jax.random.key(seed), 3)
    d = scenario.data
    options = dict(d.options) | ({"path": d.path} if d.path else {})
    dataset = load_dataset(d.dataset, k_data, **options)
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


def prepare(scenario) -> Prepared:
    """Build the model, trainer and kernels; raises ParamarketError on any bad input."""
    dataset, _, _ = seed_data(scenario, scenario.seeds[0])
    model = make_model(
        scenario.model.name,
        dataset.input_shape,
        dataset.num_classes,
        **dict(scenario.model.options),
    )
    trainer = make_trainer(model, scenario.train.optimizer, scenario.train.batch_size)
    return Prepared(scenario, model, trainer, make_round(scenario, model, trainer))


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
        self.metrics = jax.device_get(
            prepared.kernels.evaluate(self.twins, self.central, self.data)
        )
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
            )
        }
        self.datacollector = mesa.DataCollector(
            model_reporters={
                "market_accuracy": lambda m: float(m.metrics.test_acc[MARKET].mean()),
                "siloed_accuracy": lambda m: float(m.metrics.test_acc[SILOED].mean()),
                "trades": lambda m: int(sum(t["round"] == m.round - 1 for t in m.trade_log)),
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
        if self.is_trading_round(self.round):
            self.twins, trades = kern.trade(self.twins, k_trade, self.data)
            self._record_trades(jax.device_get(trades))
        self.metrics = jax.device_get(kern.evaluate(self.twins, self.central, self.data))
        if not np.isfinite(self.metrics.test_loss).all():
            raise ParamarketError(
                f"training diverged (non-finite loss) at round {self.round}, seed "
                f"{self.seed_value}; lower train.learning_rate "
                f"(now {self.scenario.train.learning_rate})"
            )
        self.round += 1
        self.datacollector.collect(self)

    def _record_trades(self, trades) -> None:
        for i in np.flatnonzero(trades.mask):
            self.trade_count[i] += 1
            self.trade_log.append(
                dict(
                    seed=self.seed_value,
                    round=self.round,
                    buyer=int(i),
                    seller=int(trades.seller[i]),
                    alpha=float(trades.alpha[i]),
                    predicted_gain=float(trades.predicted_gain[i]),
                    realized_gain=float(trades.realized_gain[i]),
                    price=float(trades.price[i]),
                )
            )

    def run(self, progress=None) -> None:
        """All the scenario's rounds; ``progress()`` after each."""
        for _ in range(self.scenario.train.rounds):
            self.step()
            if progress is not None:
                progress()
