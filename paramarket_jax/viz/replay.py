"""A replay of a run folder (or a sweep cell) from its tables only: the rounds and trades
tables cut at a round, nothing recomputed."""

from __future__ import annotations

import os
import pathlib
from typing import NamedTuple

import numpy as np
import pandas as pd

from paramarket_jax.errors import ParamarketError
from paramarket_jax.results.report import folder_kind, load_tables


class Replay(NamedTuple):
    """A run folder's tables, checked (:func:`~paramarket_jax.results.report.load_tables`).

    Attributes:
        folder: the folder; rounds, trades: its tables; scenario: its scenario.toml text.
        n: agents; seeds: the seeds run; total: rounds per seed.
    """

    folder: pathlib.Path
    rounds: pd.DataFrame
    trades: pd.DataFrame
    scenario: str
    n: int
    seeds: tuple[int, ...]
    total: int

    def at(self, seed: int, done: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Seed ``seed``'s rounds and trades tables after its first ``done`` rounds."""
        r, t = self.rounds, self.trades
        rounds = r[(r["seed"] == seed) & (r["round"] < done)]
        trades = t[(t["seed"] == seed) & (t["round"] < done)]
        return rounds, trades


def load(folder: str | os.PathLike) -> Replay:
    """A run folder's (or a sweep cell's) tables; a sweep folder, a foreign or empty folder
    or a damaged table is a one-line ParamarketError."""
    path = pathlib.Path(folder)
    if folder_kind(path) == "sweep":
        cells = sorted(p.parent.name for p in path.glob("*/rounds.parquet"))
        example = f" such as {path / cells[0]}" if cells else ""
        raise ParamarketError(
            f"{path} is a sweep folder; replay one of its cells{example} (a folder with "
            "rounds.parquet)"
        )
    rounds, trades, scenario = load_tables(path)
    n = int(rounds["agent"].max()) + 1
    seeds = tuple(int(s) for s in np.unique(rounds["seed"].to_numpy(np.int64)))
    total = int(rounds["round"].max()) + 1
    return Replay(path, rounds, trades, scenario, n, seeds, total)
