"""The market as a Mesa model: a view of the pure round, not a second engine.

``MarketModel.step()`` calls the same jitted ``round.step`` that ``round.simulate`` scans,
once, and copies the round's record to the host once; ``TraderAgent``s are thin views of
that record (Mesa's bulk-values-in-arrays habit), and the DataCollector reads from it.
Per-agent Python behaviour between rounds belongs here and reaches the kernels only as
changes to the state or the knobs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mesa
import numpy as np

from paramarket_jax.experiment import Experiment, seed_data
from paramarket_jax.results import diverged
from paramarket_jax.round import MARKET, RoundRecord, init_jit, step_jit


class TraderAgent(mesa.Agent):
    """A thin view of agent ``index`` in the last round's record (read-only properties)."""

    def __init__(self, model: MarketModel, index: int):
        super().__init__(model)
        self.index = index

    def _get(self, name: str, twin: str = "market") -> float:
        names = self.model.spec.twin_names
        if twin not in names:
            return float("nan")
        return float(getattr(self.model.record, name)[names.index(twin), self.index])

    @property
    def accuracy(self) -> float:
        """Market model's test accuracy."""
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
        """Purchases this agent made so far."""
        return int(self.model.record.trade_count[self.index])

    @property
    def cash(self) -> float:
        return self._get("cash")

    @property
    def utility(self) -> float:
        """Cumulative utility: revenue - costs - payments + receipts - fees so far."""
        return self.cash - self.model.initial_cash

    @property
    def siloed_utility(self) -> float:
        return self._get("cash", "siloed") - self.model.initial_cash


AGENT_VIEWS = ("accuracy", "siloed_accuracy", "trades", "cash", "utility", "siloed_utility")


class MarketModel(mesa.Model):
    """One seed of a scenario: a Mesa model whose ``step()`` is one market round."""

    def __init__(self, experiment: Experiment, seed: int):
        super().__init__(seed=seed)
        self.experiment, self.seed_value = experiment, seed
        self.config = experiment.scenario  # Mesa >= 3.5 reserves `scenario`
        self.spec, self.params = experiment.spec, experiment.params
        self.data, k_run = seed_data(experiment, seed)
        k_init, self.k_rounds = jax.random.split(k_run)
        self.state = init_jit(self.spec, self.params, k_init)
        self.round = 0
        self.initial_cash = float(self.config.economics.initial_cash)
        self.record: RoundRecord | None = None
        self._records: list[RoundRecord] = []
        self.traders = [TraderAgent(self, i) for i in range(self.spec.n)]
        total_cash = self.initial_cash * self.spec.n
        siloed = self.spec.twin_names.index("siloed") if self.spec.siloed else None
        nan = float("nan")
        self.datacollector = mesa.DataCollector(
            model_reporters={
                "market_accuracy": lambda m: float(m.record.test_acc[MARKET].mean()),
                "siloed_accuracy": lambda m: (
                    nan if siloed is None else float(m.record.test_acc[siloed].mean())
                ),
                "welfare": lambda m: float(
                    m.record.cash[MARKET].sum() - total_cash + m.broker_take
                ),
                "siloed_welfare": lambda m: (
                    nan if siloed is None else float(m.record.cash[siloed].sum() - total_cash)
                ),
                "broker_take": lambda m: m.broker_take,
                "trades": lambda m: int(m.record.trades.mask.sum()),
            },
            agent_reporters={k: k for k in AGENT_VIEWS},
        )
        self.broker_take = 0.0

    def step(self) -> None:
        """One round: the jitted pure step, one copy of its record to the host, collect."""
        key = jax.random.fold_in(self.k_rounds, self.round)
        r = jnp.asarray(self.round, jnp.int32)
        self.state, record = step_jit(self.spec, self.params, self.data, self.state, key, r)
        self.record = jax.device_get(record)
        if not np.isfinite(self.record.test_loss).all():
            raise diverged(self.round, self.seed_value, self.config.train.learning_rate)
        self._records.append(self.record)
        self.broker_take += float(self.record.flows.broker)
        self.round += 1
        self.datacollector.collect(self)

    def records(self) -> RoundRecord:
        """Every round's record so far, host arrays with a leading axis (rounds,)."""
        return jax.tree.map(lambda *xs: np.stack(xs), *self._records)

    def run(self, progress=None) -> None:
        """All the scenario's rounds; ``progress()`` after each."""
        for _ in range(self.config.train.rounds):
            self.step()
            if progress is not None:
                progress()
