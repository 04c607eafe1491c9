"""Run a scenario over its seeds and gather its tables, summary and plots."""

from __future__ import annotations

import dataclasses
import functools

import pandas as pd

from paramarket_jax import plots, results
from paramarket_jax.market.model import MarketModel, prepare
from paramarket_jax.scenario import Scenario, dumps


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Everything a run writes: the resolved scenario, tables and summary."""

    scenario: Scenario
    rounds: pd.DataFrame
    trades: pd.DataFrame
    summary: dict

    def files(self) -> dict[str, object]:
        """Run-folder contents for :func:`paramarket_jax.results.write_run`."""
        title = f"{self.scenario.name} ({len(self.scenario.seeds)} seeds)"
        return {
            "scenario.toml": dumps(self.scenario),
            "rounds.parquet": self.rounds,
            "trades.parquet": self.trades,
            "summary.json": self.summary,
            "accuracy.png": functools.partial(plots.accuracy_per_round, self.rounds, title=title),
            "mean_accuracy.png": functools.partial(
                plots.mean_accuracy_per_round, self.rounds, title=title
            ),
        }


def run_scenario(scenario: Scenario, progress=None) -> RunResult:
    """Run every seed of ``scenario`` (kernels compiled once, reused across seeds)."""
    prepared = prepare(scenario)
    rounds, trades = [], []
    for seed in scenario.seeds:
        market = MarketModel(prepared, seed)
        market.run(progress)
        rounds.append(results.rounds_table(market))
        trades.append(results.trades_table(market))
    rounds_df = pd.concat(rounds, ignore_index=True)
    trades_df = pd.concat(trades, ignore_index=True)
    return RunResult(scenario, rounds_df, trades_df, results.summarize(rounds_df, trades_df))
